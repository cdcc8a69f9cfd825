"""What a run compiles (init, train step, eval step), cached across runs that differ
only in their seed and bookkeeping, so the seeds of a study share one compilation.

The state is created from `jax.eval_shape` and initialised already sharded
(`init` is jitted with the state's shardings as outputs).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import metrics, parallel, sharding, steps, tasks
from experiments.dataset import Dataset
from experiments.tasks import Task


@dataclasses.dataclass(frozen=True)
class Programs:
    """The compiled pieces of a run and the layouts they expect."""

    task: Task
    mesh: jax.sharding.Mesh
    abstract: Any  # the state's shapes and dtypes
    state_sharding: Any
    init: Callable  # seed (int32) -> state, initialised already sharded
    step: parallel.CompiledStep
    eval: Callable  # (params, test batch) -> device metrics

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def data_sharding(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)


    def test_batch(self, arrays: dict) -> dict:
        """The whole test split as one global batch, padded for the devices."""
        return parallel.global_batch(parallel.padded(arrays, self.mesh.devices.size),
                                     self.data_sharding)

    def evaluate(self, state, test_batch: dict, arrays: dict) -> dict[str, float]:
        """`test/<name>` metrics of the state's parameters on `test_batch` (made by
        `test_batch(arrays)`), finished on the host by the task's adapter."""
        params = self.step.to_saved(state)["params"]
        values = metrics.to_host(self.eval(params, test_batch))
        host = self.task.adapter.host_metrics
        if host is not None:
            values = host(values, arrays)
        return {f"test/{k}": float(v) for k, v in values.items()}


# Fields that do not change the compiled programs: runs differing only in these (the
# seeds of a study) reuse one compilation.
_RUN_ONLY = ("seed", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
             "keep_checkpoints", "init_from", "progress_bar")
_CACHE: collections.OrderedDict = collections.OrderedDict()
_KEEP = 4


def clear() -> None:
    """Forgets every cached program (the next run compiles again)."""
    _CACHE.clear()


def get(flat: dict, dataset: Dataset) -> Programs:
    """The programs of validated config fields `flat` on `dataset`, from the cache."""
    key = json.dumps({k: v for k, v in flat.items() if k not in _RUN_ONLY},
                     sort_keys=True, default=str) + repr(jax.devices())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    mesh = sharding.make_mesh({a: flat[f"mesh.{a}"] for a in sharding.AXES})
    task = tasks.build_task(None, dataset, flat, mesh=mesh)
    sample = dataset.x_train[:1]
    # The seed is an argument, not a constant, so all seeds share one compilation.
    init = lambda seed: tasks.init_state(task, seed, sample)
    abstract = jax.eval_shape(init, np.int32(0))
    if flat["parallel"] == "jit":
        state_sharding = sharding.state_shardings(
            abstract, tasks.logical_axes(task, sample), mesh)
    else:  # pmap: the saved layout is replicated
        state_sharding = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
    _CACHE[key] = Programs(
        task=task, mesh=mesh, abstract=abstract, state_sharding=state_sharding,
        init=jax.jit(init, out_shardings=state_sharding),
        step=parallel.make_train_step(task, mesh, state_sharding,
                                      parallel=flat["parallel"],
                                      checks=flat["checks"]),
        eval=jax.jit(functools.partial(steps.eval_step, task=task),
                     in_shardings=(state_sharding["params"],
                                   sharding.batch_sharding(mesh)),
                     out_shardings=NamedSharding(mesh, P())))
    while len(_CACHE) > _KEEP:
        _CACHE.popitem(last=False)
    return _CACHE[key]
