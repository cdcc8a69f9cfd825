"""Every (seed, learning rate) of one config trained at once, sharing one compile.

The study's runs are small models on a CPU, where one run at a time leaves the cores
waiting on dispatch and every run pays its own compile. A sweep trains all its
members side by side through one compiled step, in one of two ways (`STRATEGIES`):
`Vmapped` stacks them along a leading "member" axis in one vmapped program (dense
models: every step shared), `Looped` calls one single-member step for each in turn
(convolutions, which vmapped over per-member kernels run slower on XLA:CPU than one
after another). The learning rate reaches each member through
`optax.inject_hyperparams` (it is part of the optimizer state, so one compiled step
serves all rates), the seed through the member's initial parameters, rng and batch
order (`batch_indices(seed, step)`, as in `train_and_evaluate`). Members are
independent: one that diverges is marked with the step where its loss or gradient
norm turned non-finite, and the others go on.

With `validation_fraction`, the members train on the training data minus a fixed
validation split carved from it (`experiments.dataset.validation_split`) and are
scored on both the validation split (`val/<name>`, for choosing a rate) and the test
split (`test/<name>`); the test set never chooses anything.

Runs on one device (the default one), unsharded, with the plain step: a config that
asks for `checks` or `parallel="pmap"` is refused rather than silently run without
them (`experiments.train` is the trainer for meshes, checked runs, checkpoints and
resumption; a sweep is short, and the study resumes between sweeps).
"""

from __future__ import annotations

import concurrent.futures
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


def _train_step(state, train_arrays, idx, *, task):
    """One member's step; `idx` [batch] picks its examples."""
    batch = jax.tree.map(lambda a: a[idx], train_arrays)
    return steps.train_step(state, batch, task=task)


class Vmapped:
    """Every member in one vmapped program: the state stacked along a leading member
    axis, one dispatch per step. Dense layers become batched matrix products, which
    run all members at once about as fast as one."""

    def __init__(self, task: tasks.Task, sample_x):
        self._init = jax.jit(jax.vmap(functools.partial(_init_member, task, sample_x)))
        self._step = jax.jit(jax.vmap(functools.partial(_train_step, task=task),
                                      in_axes=(0, None, 0)), donate_argnums=0)
        self._eval = jax.jit(jax.vmap(functools.partial(steps.eval_step, task=task),
                                      in_axes=(0, None)))

    def init(self, seeds, rates):
        return self._init(np.asarray(seeds, np.int32), np.asarray(rates, np.float32))

    def step(self, state, train_arrays, idx: np.ndarray):
        """One step of every member; `idx` [members, batch] picks each one's
        examples. Returns the new state and the metrics, stacked over members."""
        return self._step(state, train_arrays, jax.device_put(idx))

    def evaluate(self, state, batch):
        """Every member's metrics, stacked along a leading member axis."""
        return self._eval(state["params"], batch)

    def compiled_step(self, state, train_arrays, idx: np.ndarray):
        """(the compiled step, its abstract inputs, how many members it runs): for
        its memory analysis, taken before the first step donates `state`."""
        return (self._step, memory.abstract((state, train_arrays,
                                             jax.device_put(idx))), len(idx))


class Looped:
    """The members in turn through one compiled single-member step (a list of
    states), two in flight at a time.

    For convolutions: vmapped over per-member kernels, a convolution becomes a
    grouped one, which XLA:CPU runs slower than the plain ones in turn. And XLA:CPU
    runs a small program on the thread that dispatches it, leaving the other core
    idle: two dispatching threads keep both busy. Measured with nine members by
    `python -m benchmarks.sweep_members` (the study's configs name the faster way).
    """

    def __init__(self, task: tasks.Task, sample_x):
        self._init = jax.jit(functools.partial(_init_member, task, sample_x))
        self._step = jax.jit(functools.partial(_train_step, task=task),
                             donate_argnums=0)
        self._eval = jax.jit(functools.partial(steps.eval_step, task=task))
        self._traced = False

    def init(self, seeds, rates):
        return [self._init(np.int32(s), np.float32(lr))
                for s, lr in zip(seeds, rates, strict=True)]

    def step(self, states, train_arrays, idx: np.ndarray):
        rows = jax.device_put(list(idx))
        out = _in_flight(lambda m: self._step(states[m], train_arrays, rows[m]),
                         len(states), first_alone=not self._traced)
        self._traced = True
        return [s for s, _ in out], _stack([m for _, m in out])

    def evaluate(self, states, batch):
        # The first member alone: each split's batch shape compiles once.
        return _stack(_in_flight(lambda m: self._eval(states[m]["params"], batch),
                                 len(states), first_alone=True))

    def compiled_step(self, states, train_arrays, idx: np.ndarray):
        return (self._step, memory.abstract((states[0], train_arrays,
                                             jax.device_put(idx[0]))), 1)


# Dispatching threads of `Looped`: one per core of the 2-core machines the study
# targets (a larger step parallelizes inside XLA instead).
_DISPATCH = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="sweep")


def _in_flight(call, n: int, *, first_alone: bool) -> list:
    """[call(0), ..., call(n - 1)], two at a time; `first_alone`: call(0) before the
    others start (so that one thread traces and compiles, and the rest reuse it)."""
    first = [call(0)] if first_alone else []
    return first + list(_DISPATCH.map(call, range(len(first), n)))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


STRATEGIES = {"vmap": Vmapped, "loop": Looped}


class _Scores:
    """One split's padded device batch and its host arrays; scores every member."""

    def __init__(self, prefix: str, arrays: dict, evaluate, adapter):
        self.prefix, self.arrays, self.evaluate = prefix, arrays, evaluate
        self.host = adapter.host_metrics
        self.batch = jax.device_put(parallel.padded(arrays, 1))

    def __call__(self, state) -> list[dict[str, float]]:
        values = metrics.to_host(self.evaluate(state, self.batch))
        out = []
        for m in range(len(next(iter(jax.tree.leaves(values))))):
            member = jax.tree.map(lambda x, m=m: x[m], values)
            if self.host is not None:
                member = self.host(member, self.arrays)
            out.append({f"{self.prefix}/{k}": float(v) for k, v in member.items()})
        return out


def run(config: mlc.ConfigDict, seeds, learning_rates, *,
        validation_fraction: float | None = None, cache_dir=None,
        strategy: str = "vmap") -> list[dict]:
    """Trains `config` at every (seed, learning rate) at once; one record per member.

    Args:
      config: a run's config; its `seed` and `optimizer.learning_rate` are replaced
        by each member's.
      seeds, learning_rates: the members are their product (rates outer).
      validation_fraction: carve this share of the training data as a validation
        split (None: train on all of it, test metrics only).
      cache_dir: where generated data sets are cached.
      strategy: how the members share the machine (`STRATEGIES`): "vmap" (one
        vmapped program) or "loop" (one compiled step, members in turn). Either
        trains each member exactly as its own run would.

    Returns:
      Per member: `seed`, `learning_rate`, `diverged_at` (the first non-finite step,
      or None), `summary` (final `val/*` and `test/*` metrics, `wall_seconds`: the
      sweep's wall time per member, `first_step_seconds`: the first step (its
      compile), `steps_per_sec`: steps of all members per second, `members`, and
      XLA's memory analysis of the compiled step per member,
      `memory/xla_temp_mib` ...), `curve` ([[step, test metrics]]), `val_curve` and
      `train_curve` ([[step, train loss]]).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sweep strategy {strategy!r}; valid: "
                         f"{', '.join(STRATEGIES)}.")
    start = time.perf_counter()
    flat = schema.validate_config(config)
    if flat["checks"] or flat["parallel"] != "jit":
        raise ValueError(
            "a sweep runs the plain step on one device: checks=False and "
            f"parallel='jit' (got checks={flat['checks']}, parallel="
            f"{flat['parallel']!r}); train one run with experiments.main for those.")
    if flat["data.train_source"]:
        raise ValueError("a sweep trains on the data set's own training split; "
                         "config.data.train_source is for experiments.main.")
    dataset = data_lib.load(flat["data.name"], cache_dir=cache_dir,
                            **dict(flat["data.kwargs"]))
    train_set = (dataset if validation_fraction is None else
                 dataset_lib.validation_split(dataset, validation_fraction))
    runs = [(int(s), float(lr)) for lr in learning_rates for s in seeds]
    task = _member_task(flat, train_set)
    members = STRATEGIES[strategy](task, train_set.x_train[:1])
    state = members.init([s for s, _ in runs], [lr for _, lr in runs])
    scores = [_Scores("test", dataset.arrays("test"), members.evaluate, task.adapter)]
    if validation_fraction is not None:
        scores.insert(0, _Scores("val", train_set.arrays("test"), members.evaluate,
                                 task.adapter))
    train_arrays = jax.device_put(train_set.arrays("train"))

    num_steps, batch_size = flat["num_train_steps"], flat["batch_size"]
    log_every, eval_every = flat["log_every_steps"], flat["eval_every_steps"]
    records = [{"seed": s, "learning_rate": lr, "diverged_at": None, "curve": [],
                "val_curve": [], "train_curve": [], "summary": {}}
               for s, lr in runs]
    pending, first_step_seconds, train_seconds, timed = [], 0.0, 0.0, 0
    step_memory = {}
    window = time.perf_counter()
    for i in range(num_steps):
        t0 = time.perf_counter()
        by_seed = {s: dataset_lib.batch_indices(s, i, train_set.num_train, batch_size)
                   for s in seeds}
        idx = np.stack([by_seed[s] for s, _ in runs]).astype(np.int32)
        if i == 0:
            compiled, inputs, per_step = members.compiled_step(state, train_arrays,
                                                                idx)
        state, step_metrics = members.step(state, train_arrays, idx)
        pending.append(step_metrics)
        done, last = i + 1, i + 1 == num_steps
        if i == 0:
            jax.block_until_ready(step_metrics)
            first_step_seconds = time.perf_counter() - t0
            step_memory = {k: v / per_step for k, v in
                           (memory.step_memory(compiled, *inputs) or {}).items()}
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
                for r, values in zip(records, score(state), strict=True):
                    r["curve" if score.prefix == "test" else "val_curve"].append(
                        [done, values])
                    r["summary"] |= values
        if not pending:
            window = time.perf_counter()
    wall = time.perf_counter() - start
    shared = {"wall_seconds": wall / len(runs), "sweep_seconds": wall,
              "first_step_seconds": first_step_seconds,
              "steps_per_sec": timed / train_seconds if train_seconds else float("nan"),
              "members": len(runs),
              "num_train": train_set.num_train,
              "memory/peak_rss_mib": memory.peak_rss_mib(),
              **{f"memory/{k}": v for k, v in step_memory.items()}}
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
