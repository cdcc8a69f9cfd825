"""Every (seed, learning rate) of one config trained at once, as one vmapped program.

The study's runs are small models on a CPU, where one run at a time leaves the cores
waiting on dispatch; stacked along a leading "member" axis they share every step.
The learning rate reaches each member through `optax.inject_hyperparams` (it is part
of the optimizer state, so one compiled step serves all rates), the seed through the
member's initial parameters, rng and batch order (`batch_indices(seed, step)`, as in
`train_and_evaluate`). Members are independent: one that diverges is marked with the
step where its loss or gradient norm turned non-finite, and the others go on.

With `validation_fraction`, the members train on the training data minus a fixed
validation split carved from it (`experiments.dataset.validation_split`) and are
scored on both the validation split (`val/<name>`, for choosing a rate) and the test
split (`test/<name>`); the test set never chooses anything.

Runs on one device (the default one), unsharded; `experiments.train` is the trainer
for meshes, checkpoints and resumption (a sweep is short: the study resumes between
sweeps).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from experiments import data as data_lib
from experiments import dataset as dataset_lib
from experiments import memory, metrics, parallel, schema, steps, tasks


def _member_task(flat: dict, dataset) -> tasks.Task:
    """The task of `flat` with its peak learning rate as an optimizer-state value."""
    task = tasks.build_task(None, dataset, flat)
    factory = functools.partial(tasks.make_optimizer, schema.optimizer_fields(flat),
                                flat["num_train_steps"])
    tx = optax.inject_hyperparams(factory)(
        learning_rate=flat["optimizer.learning_rate"])
    return dataclasses.replace(task, tx=tx)


def _init_member(task: tasks.Task, sample_x, seed, learning_rate) -> dict:
    state = tasks.init_state(task, seed, sample_x)
    opt_state = state["opt_state"]
    hyperparams = {**opt_state.hyperparams,
                   "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
    return {**state, "opt_state": opt_state._replace(hyperparams=hyperparams)}


def _train_steps(state, train_arrays, idx, *, task):
    """One step of every member; `idx` [members, batch] picks each one's examples."""
    batch = jax.tree.map(lambda a: a[idx], train_arrays)
    return jax.vmap(functools.partial(steps.train_step, task=task))(state, batch)


def _eval_all(params, batch, *, task):
    return jax.vmap(functools.partial(steps.eval_step, task=task),
                    in_axes=(0, None))(params, batch)


class _Scores:
    """One split's padded device batch and its host arrays; scores every member."""

    def __init__(self, prefix: str, arrays: dict, eval_fn, adapter):
        self.prefix, self.arrays, self.eval_fn = prefix, arrays, eval_fn
        self.host = adapter.host_metrics
        self.batch = jax.device_put(parallel.padded(arrays, 1))

    def __call__(self, params) -> list[dict[str, float]]:
        values = metrics.to_host(self.eval_fn(params, self.batch))
        out = []
        for m in range(len(next(iter(jax.tree.leaves(values))))):
            member = jax.tree.map(lambda x, m=m: x[m], values)
            if self.host is not None:
                member = self.host(member, self.arrays)
            out.append({f"{self.prefix}/{k}": float(v) for k, v in member.items()})
        return out


def run(config: mlc.ConfigDict, seeds, learning_rates, *,
        validation_fraction: float | None = None, cache_dir=None) -> list[dict]:
    """Trains `config` at every (seed, learning rate) at once; one record per member.

    Args:
      config: a run's config; its `seed` and `optimizer.learning_rate` are replaced
        by each member's.
      seeds, learning_rates: the members are their product (rates outer).
      validation_fraction: carve this share of the training data as a validation
        split (None: train on all of it, test metrics only).
      cache_dir: where generated data sets are cached.

    Returns:
      Per member: `seed`, `learning_rate`, `diverged_at` (the first non-finite step,
      or None), `summary` (final `val/*` and `test/*` metrics, `wall_seconds`: the
      sweep's wall time per member, `first_step_seconds`: the vmapped step's compile,
      `steps_per_sec`: vmapped steps per second, `members`, and XLA's memory
      analysis of the vmapped step per member, `memory/xla_temp_mib` ...), `curve`
      ([[step, test metrics]]), `val_curve` and `train_curve` ([[step, train loss]]).
    """
    start = time.perf_counter()
    flat = schema.validate_config(config)
    dataset = data_lib.load(flat["data.name"], cache_dir=cache_dir,
                            **dict(flat["data.kwargs"]))
    train_set = (dataset if validation_fraction is None else
                 dataset_lib.validation_split(dataset, validation_fraction))
    members = [(int(s), float(lr)) for lr in learning_rates for s in seeds]
    task = _member_task(flat, dataset)
    state = jax.jit(jax.vmap(functools.partial(_init_member, task,
                                               dataset.x_train[:1])))(
        np.array([s for s, _ in members], np.int32),
        np.array([lr for _, lr in members], np.float32))
    step_fn = jax.jit(functools.partial(_train_steps, task=task), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(_eval_all, task=task))
    scores = [_Scores("test", dataset.arrays("test"), eval_fn, task.adapter)]
    if validation_fraction is not None:
        scores.insert(0, _Scores("val", train_set.arrays("test"), eval_fn,
                                 task.adapter))
    train_arrays = jax.device_put(train_set.arrays("train"))

    num_steps, batch_size = flat["num_train_steps"], flat["batch_size"]
    log_every, eval_every = flat["log_every_steps"], flat["eval_every_steps"]
    records = [{"seed": s, "learning_rate": lr, "diverged_at": None, "curve": [],
                "val_curve": [], "train_curve": [], "summary": {}}
               for s, lr in members]
    pending, first_step_seconds, train_seconds, timed = [], 0.0, 0.0, 0
    step_memory = None
    window = time.perf_counter()
    for i in range(num_steps):
        t0 = time.perf_counter()
        by_seed = {s: dataset_lib.batch_indices(s, i, train_set.num_train, batch_size)
                   for s in seeds}
        idx = jax.device_put(np.stack([by_seed[s] for s, _ in members])
                             .astype(np.int32))
        if i == 0:
            inputs = memory.abstract((state, train_arrays, idx))
        state, step_metrics = step_fn(state, train_arrays, idx)
        pending.append(step_metrics)
        done, last = i + 1, i + 1 == num_steps
        if i == 0:
            jax.block_until_ready(step_metrics)
            first_step_seconds = time.perf_counter() - t0
            step_memory = memory.step_memory(step_fn, *inputs)
            pending, window = [], time.perf_counter()
            _log(records, done, [metrics.to_host(step_metrics)])
        if pending and (done % log_every == 0 or last):
            host = metrics.to_host(pending)
            train_seconds += time.perf_counter() - window
            timed += len(pending)
            _log(records, done, host)
            pending = []
        if done % eval_every == 0 or last:
            jax.block_until_ready(state)
            for score in scores:
                for r, values in zip(records, score(state["params"]), strict=True):
                    r["curve" if score.prefix == "test" else "val_curve"].append(
                        [done, values])
                    r["summary"] |= values
        if not pending:
            window = time.perf_counter()
    wall = time.perf_counter() - start
    shared = {"wall_seconds": wall / len(members), "sweep_seconds": wall,
              "first_step_seconds": first_step_seconds,
              "steps_per_sec": timed / train_seconds if train_seconds else float("nan"),
              "members": len(members), "num_train": train_set.num_train,
              "memory/peak_rss_mib": memory.peak_rss_mib(),
              **{f"memory/{k}": v / len(members)
                 for k, v in (step_memory or {}).items()}}
    for r in records:
        r["summary"] |= shared
    return records


def _log(records: list[dict], step: int, host: list[dict]) -> None:
    """Appends each member's mean training loss since the last log; marks the
    members whose loss or gradient norm turned non-finite."""
    losses = np.stack([m["loss"] for m in host])  # [steps, members]
    finite = np.isfinite(losses) & np.isfinite(np.stack([m["grad_norm"]
                                                         for m in host]))
    for j, r in enumerate(records):
        if r["diverged_at"] is None and not finite[:, j].all():
            r["diverged_at"] = step - len(host) + 1 + int(np.argmin(finite[:, j]))
        r["train_curve"].append([step, float(losses[:, j].mean())])
