"""SIGTERM as a flag: the loop checks it after each step, saves and stops."""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
    """Turns SIGTERM into `requested`, inside a `with` block (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int, sync_every: int) -> bool:
        """Whether to stop after `step`. With several processes all must stop at the
        same step (saving is collective): they agree on the flag every `sync_every`
        steps only, where a host sync happens anyway."""
        if jax.process_count() == 1:
            return self.requested
        return step % sync_every == 0 and bool(np.any(
            multihost_utils.process_allgather(np.array(self.requested))))
