"""Metrics on the host: one fetch every `log_every_steps`, checked for non-finite
values before anything is written, JSONL in the workdir, a progress bar.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np


def to_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


class MetricWriter:
    """JSONL rows `{"step": s, ...}` in the workdir, written by process 0 only."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled and path.exists():
            # Drop what a killed run logged after its last checkpoint: those steps
            # run again now.
            lines = path.read_text().splitlines()
            kept = [ln for ln in lines if ln.strip()
                    and _json_step(ln) is not None and _json_step(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, step: int, values: dict):
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": int(step), **values}) + "\n")


def _json_step(line: str):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class TrainLog:
    """The training metrics between host fetches, and the loop's throughput.

    `add` keeps a step's device metrics; `flush` fetches them in one transfer, raises
    FloatingPointError on the first non-finite loss or gradient norm, and writes
    their mean as `train/<name>` with `steps_per_sec`. Throughput counts the steps
    between fetches only: not the first (compiling) step, evaluations or saves
    (`restart` opens a new window after them).

    Args:
      writer: where rows go.
      first: picks one replica's metrics (`CompiledStep.first`).
      describe: called for the error message: which run, which last checkpoint.
      bar: a tqdm bar to update, or None.
    """

    def __init__(self, writer: MetricWriter, first: Callable,
                 describe: Callable[[], str], bar=None):
        self.writer, self.first, self.describe, self.bar = writer, first, describe, bar
        self.pending: list[tuple[int, dict]] = []
        self.first_step_seconds, self.train_seconds, self.timed_steps = 0.0, 0.0, 0
        self.restart()

    def restart(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def first_step(self, seconds: float) -> None:
        """The first step (the compile) took `seconds`; it is timed apart."""
        self.first_step_seconds = seconds
        self.restart()

    def flush(self, step: int) -> None:
        if not self.pending:
            return
        host = to_host([(s, self.first(m)) for s, m in self.pending])
        for s, m in host:
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                raise FloatingPointError(
                    f"non-finite training loss ({m['loss']}) or gradient norm "
                    f"({m['grad_norm']}) at step {s} of {self.describe()}")
        elapsed = time.perf_counter() - self.window_start
        self.train_seconds += elapsed
        self.timed_steps += self.window_steps
        mean = {f"train/{k}": float(np.mean([m[k] for _, m in host]))
                for k in host[0][1]}
        sps = self.window_steps / elapsed if elapsed > 0 else float("nan")
        self.writer.write(step, {**mean, "steps_per_sec": sps})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean['train/loss']:.4f}", steps_s=f"{sps:.0f}")
        self.pending = []
        self.restart()

    @property
    def steps_per_sec(self) -> float:
        if self.train_seconds > 0:
            return self.timed_steps / self.train_seconds
        return float("nan")


def progress_bar(enabled: bool, total: int, initial: int, name: str):
    """A tqdm bar on the terminal, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step",
                dynamic_ncols=True, leave=False)
