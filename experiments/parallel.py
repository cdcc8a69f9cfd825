"""Global batches and the compiled train step (jit over a mesh, or pmap).

Mesh choice (conventions, section 5). `jax.make_mesh` builds Explicit-axes meshes by
default in jax 0.10; lossjax's experiments build theirs with Auto axes everywhere
(`experiments.sharding.make_mesh`) and never install a global mesh with
`jax.set_mesh`: shardings are stated on `jax.jit`'s inputs and outputs and GSPMD
propagates them through flax layers and losses, which need no `out_sharding`
annotations. A run thus changes no process-wide state, so tests can run several
trainers in one process.

`parallel="jit"` (the default): one `jax.jit` over the (data, fsdp, model) mesh, the
state laid out by `experiments.sharding.state_shardings` (replicated on a pure data
mesh, split with fsdp or model > 1), the batch split over ("data", "fsdp").
`parallel="pmap"`: the same `train_step` under `jax.pmap` with `lax.pmean` of loss and
gradients over the local devices, for code bases still on pmap (a 1-D data mesh).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import sharding, steps
from experiments.tasks import Task
from lossjax import _checks


def process_rows(sharding: NamedSharding, n: int) -> np.ndarray:
    """The rows of an `n`-row global batch that land on this process's devices
    (sorted), under `sharding` of the batch's first axis."""
    index_map = sharding.addressable_devices_indices_map((n,))
    spans = sorted({(s[0].start or 0, n if s[0].stop is None else s[0].stop)
                    for s in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in spans])


def from_process_rows(local: dict, sharding: NamedSharding, n: int) -> dict:
    """Global `n`-row arrays from this process's rows (`process_rows`) of each."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (n, *v.shape[1:]))
            for k, v in local.items()}


def global_batch(arrays: dict, sharding: NamedSharding) -> dict:
    """Global arrays from the full batch, each process contributing the rows it owns
    (every process holds the whole batch: the test set)."""
    n = len(next(iter(arrays.values())))
    rows = process_rows(sharding, n)
    return from_process_rows({k: v[rows] for k, v in arrays.items()}, sharding, n)


def padded(arrays: dict, multiple: int) -> dict:
    """`arrays` padded with zero rows to a multiple of `multiple`, plus `mask` (bool
    `[n]`, True on the real rows): an evaluation batch any device count splits."""
    n = len(arrays["x"])
    pad = -n % multiple
    out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
           for k, v in arrays.items()}
    return out | {"mask": np.arange(n + pad) < n}


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The compiled step and how host data and checkpoints meet its layout.

    fn(state, batch) -> (state, metrics); rows(n) -> the rows of an n-row batch
    this process feeds; put_rows(local numpy dict, n) -> the device batch from those
    rows; to_saved / from_saved convert between the step's state layout and the
    checkpoint layout (the jit layout); first(metrics) picks one replica's metrics;
    batch_shards is how many pieces a batch is split into (it must divide the
    batch size).
    """

    fn: Callable
    rows: Callable
    put_rows: Callable
    to_saved: Callable
    from_saved: Callable
    first: Callable
    batch_shards: int

    def put_batch(self, batch: dict) -> dict:
        """The device batch of a whole numpy batch (every process holds all of it)."""
        n = len(next(iter(batch.values())))
        rows = self.rows(n)
        return self.put_rows({k: v[rows] for k, v in batch.items()}, n)


def make_train_step(task: Task, mesh, state_sharding=None, *, parallel: str = "jit",
                    checks: bool = False) -> CompiledStep:
    """`train_step` compiled for `mesh`: jit over the mesh, or pmap over its devices.

    `state_sharding` is the state's layout under jit (None: replicated). With
    `checks=True` the step is traced with lossjax's value assertions on and wrapped
    in `chex.chexify` (synchronous), so a bad value (a label out of range, a
    non-finite input) raises an error naming the loss and the rule.
    """
    replicated = NamedSharding(mesh, P())
    if parallel == "jit":
        step_impl = functools.partial(steps.train_step, task=task)
        if checks:
            step_impl = _with_value_checks(step_impl)
        data_sharding = sharding.batch_sharding(mesh)
        state_sharding = replicated if state_sharding is None else state_sharding
        fn = jax.jit(step_impl, in_shardings=(state_sharding, data_sharding),
                     out_shardings=(state_sharding, replicated), donate_argnums=0)
        if checks:
            fn = chex.chexify(fn, async_check=False)
        identity = lambda s: s
        return CompiledStep(
            fn, rows=functools.partial(process_rows, data_sharding),
            put_rows=lambda local, n: from_process_rows(local, data_sharding, n),
            to_saved=identity, from_saved=identity, first=identity,
            batch_shards=sharding.batch_shards(mesh))
    if checks:
        raise ValueError("config.checks=True needs config.parallel='jit' "
                         "(chex.chexify wraps jit-compiled functions).")
    if jax.process_count() > 1:
        raise ValueError("config.parallel='pmap' runs on one host; use 'jit'.")
    if sharding.batch_shards(mesh) != mesh.devices.size:
        raise ValueError(f"config.parallel='pmap' splits the batch only: it needs "
                         f"config.mesh.fsdp=1 and model=1, not {dict(mesh.shape)}.")
    return _pmap_step(task, mesh, replicated)


def _pmap_step(task: Task, mesh, replicated) -> CompiledStep:
    num_devices = mesh.devices.size
    pmap_task = dataclasses.replace(task, axis_name="batch")
    fn = jax.pmap(functools.partial(steps.train_step, task=pmap_task),
                  axis_name="batch", devices=list(mesh.devices.flat), donate_argnums=0)
    # Inputs laid out as pmap lays out its outputs (a leading axis split over the
    # devices), so the second call does not compile again for a new input layout.
    stacked = NamedSharding(
        jax.sharding.Mesh(mesh.devices.reshape(-1), ("batch",),
                          axis_types=(jax.sharding.AxisType.Auto,)), P("batch"))
    return CompiledStep(
        fn,
        rows=np.arange,  # one process feeds every row
        put_rows=lambda b, n: jax.device_put(
            {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in b.items()},
            stacked),
        to_saved=lambda s: jax.device_put(jax.tree.map(lambda x: x[0], s), replicated),
        from_saved=lambda s: jax.device_put(jax.tree.map(
            lambda x: np.broadcast_to(np.asarray(x), (num_devices,) + x.shape), s),
            stacked),
        first=lambda m: jax.tree.map(lambda x: x[0], m),
        batch_shards=num_devices,
    )


def _with_value_checks(step_impl):
    """Traces `step_impl` with lossjax's chex value assertions switched on.

    (`lossjax.checked` does the same but jits without this step's shardings and
    donation, so the trainer switches the checks on itself.)
    """

    @functools.wraps(step_impl)
    def checked_step(state, batch):
        with _checks.value_checks():
            return step_impl(state, batch)

    return checked_step
