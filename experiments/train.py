"""The trainer: `train_and_evaluate(config, workdir)`, read top to bottom.

Validate the config (`experiments.schema`), load the data, get the compiled programs
(`experiments.programs`: the task's model, optimizer and loss adapter from
`experiments.tasks`, the pure steps of `experiments.steps` compiled by
`experiments.parallel` for the mesh of `experiments.sharding`), restore (this
workdir, else `config.init_from`, else from scratch; `experiments.checkpoints`),
then loop: batch of step s (a pure function of `(seed, s)`, read through grain by
`experiments.pipeline`), step, and every `log_every_steps` one host fetch of the
metrics, which are checked for non-finite values before anything is written or saved
(`experiments.metrics`); test metrics every `eval_every_steps`, checkpoints every
`checkpoint_every_steps`, at the end and on SIGTERM (`experiments.preemption`).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import chex
import jax
import ml_collections as mlc
import numpy as np

from experiments import (
    checkpoints,
    memory,
    metrics,
    models,
    pipeline,
    programs,
    schema,
)
from experiments import data as data_lib
from experiments.preemption import Preemption

log = logging.getLogger("experiments.train")

# Summary fields of the run that trained; a later call that only finds the finished
# checkpoint keeps them.
_TIMINGS = ("first_step_seconds", "wall_seconds", "steps_per_sec")


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> dict:
    """Trains and evaluates `config`, checkpointing into `workdir`; resumes if possible.

    Returns a summary: final test metrics, the step reached, `first_step_seconds` (the
    compile), `wall_seconds` (the whole loop, with evaluations and saves),
    `steps_per_sec` (training steps only), `preempted` (True if SIGTERM stopped
    the run after saving), and memory in MiB (`experiments.memory`):
    `memory/xla_temp_mib`, `memory/xla_argument_mib`, `memory/xla_output_mib` (XLA's
    analysis of the compiled step, per device; absent where the backend or the
    checked mode gives none) and `memory/peak_rss_mib` (the process's peak so far).

    Raises:
      FloatingPointError: a non-finite training loss or gradient norm, naming the first
        bad step; nothing from that step on is saved or logged.
      ValueError / KeyError: a bad config (see `experiments.schema.validate_config`).
    """
    flat = schema.validate_config(config)
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")

    # Data sets generated on first use (speech) are cached in the workdir.
    dataset = data_lib.load(flat["data.name"], cache_dir=workdir / "data",
                            **dict(flat["data.kwargs"]))
    seed, num_steps, batch_size = flat["seed"], flat["num_train_steps"], \
        flat["batch_size"]
    prog = programs.get(flat, dataset)
    compiled = prog.step
    if batch_size % compiled.batch_shards:
        raise ValueError(f"batch_size={batch_size} is not divisible into the "
                         f"{compiled.batch_shards} batch shards of the mesh.")

    # Restore: this workdir first, then config.init_from, else from scratch.
    manager = checkpoints.manager(workdir, flat["keep_checkpoints"])
    found = checkpoints.restore_latest(
        manager, checkpoints.abstract_like(prog.abstract, prog.state_sharding),
        quarantine=workdir / "checkpoints_corrupt")
    if found is not None:
        start_step, state = found
        log.info("resuming from %s at step %d", workdir / "checkpoints", start_step)
    else:
        start_step, state = 0, prog.init(np.int32(seed))
        if flat["init_from"]:
            params = jax.device_put(checkpoints.read_init_from(
                flat["init_from"], prog.abstract["params"], prog.replicated),
                prog.state_sharding["params"])
            opt_init = jax.jit(prog.task.tx.init,
                               out_shardings=prog.state_sharding["opt_state"])
            state = {**state, "params": params, "opt_state": opt_init(params)}
            log.info("initialised parameters from %s", flat["init_from"])
    state = compiled.from_saved(state)

    test_arrays = dataset.arrays("test")
    test_batch = prog.test_batch(test_arrays)
    # Training batches through grain (experiments.pipeline): this process reads only
    # its rows of step s's batch, a function of (seed, s).
    source = (pipeline.load_source(flat["data.train_source"])
              if flat["data.train_source"]
              else pipeline.ArraySource(dataset.arrays("train")))
    batches = pipeline.TrainBatches(source, seed=seed, batch_size=batch_size,
                                    rows=compiled.rows(batch_size))

    def batch_of(step):
        return compiled.put_rows(batches(step), batch_size)

    writer = metrics.MetricWriter(workdir / "metrics.jsonl", start_step)
    bar = metrics.progress_bar(is_main and flat["progress_bar"], num_steps, start_step,
                               workdir.name)
    train_log = metrics.TrainLog(
        writer, compiled.first, bar=bar,
        describe=lambda: (f"{workdir}; nothing from this step on was saved (last "
                          f"checkpoint: {manager.latest_step()})."))
    log_every, eval_every = flat["log_every_steps"], flat["eval_every_steps"]
    ckpt_every = flat["checkpoint_every_steps"]
    step_memory = None  # XLA's memory analysis of the compiled step (MiB per device)
    last_eval: dict[str, float] = {}
    done, preempted, wall_seconds = start_step, False, 0.0
    train_start = time.perf_counter()
    try:
        with Preemption() as preemption:
            for i in range(start_step, num_steps):
                t0 = time.perf_counter()
                batch = batch_of(i)
                if i == start_step:  # the step's input types, before donation
                    step_inputs = memory.abstract((state, batch))
                state, step_metrics = compiled.fn(state, batch)
                done = i + 1
                train_log.add(done, step_metrics)
                if i == start_step:
                    jax.block_until_ready(step_metrics)  # the compile, timed apart
                    train_log.first_step(time.perf_counter() - t0)
                    # The step just compiled: this reuses it (no trace, no compile).
                    step_memory = memory.step_memory(compiled.fn, *step_inputs)
                stop = preemption.should_stop(done, log_every)
                last = done == num_steps
                if done % log_every == 0 or done % ckpt_every == 0 or stop or last:
                    train_log.flush(done)
                if done % eval_every == 0 or last:
                    last_eval = prog.evaluate(state, test_batch, test_arrays)
                    writer.write(done, last_eval)
                if done % ckpt_every == 0 or last or stop:
                    checkpoints.save(manager, done, compiled.to_saved(state))
                if not train_log.pending:  # throughput windows exclude evals and saves
                    train_log.restart()
                if stop:
                    preempted = True
                    log.warning("SIGTERM: saved step %d in %s; stopping.", done,
                                workdir)
                    break
            wall_seconds = time.perf_counter() - train_start
    finally:
        if flat["checks"]:
            chex.block_until_chexify_assertions_complete()
        if bar is not None:
            bar.close()
        manager.wait_until_finished()
        manager.close()

    if not last_eval:  # resumed at the end: evaluate the restored state
        last_eval = prog.evaluate(state, test_batch, test_arrays)
    summary = {
        "step": int(num_steps if not preempted else done), "preempted": preempted,
        "first_step_seconds": train_log.first_step_seconds,
        "wall_seconds": wall_seconds,
        "steps_per_sec": train_log.steps_per_sec,
        "num_params": models.param_count(prog.abstract["params"]),
        **{f"memory/{k}": v for k, v in (step_memory or {}).items()},
        "memory/peak_rss_mib": memory.peak_rss_mib(),
        **last_eval,
    }
    summary_path = workdir / "summary.json"
    if start_step == num_steps and summary_path.exists():
        # Nothing ran now: keep the timings and memory of the run that did the
        # training.
        previous = json.loads(summary_path.read_text())
        for key in (*_TIMINGS, *(k for k in previous if k.startswith("memory/"))):
            if key in previous:
                summary[key] = previous[key]
    if is_main and not preempted:
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
