"""Memory of a run: XLA's analysis of the compiled train step and the process peak RSS.

`step_memory(jitted, state, batch)` asks the jitted step for its compiled program at
the run's abstract input types. Called after the step has run once, `lower().compile()`
hits jax's in-process caches (no second trace, no second compile: a few milliseconds)
and returns the very executable the loop calls.

The numbers are per device (one SPMD program per device) and in MiB:
`xla_temp_mib`, the step's scratch buffers (activations kept for the backward pass,
logits and their gradient, ...: what a fused head loss saves), `xla_argument_mib` and
`xla_output_mib` (state and batch in, state and metrics out; donated state aliases its
output). Backends that report no analysis give None.
"""

from __future__ import annotations

import resource
from typing import Any

import jax

_MIB = 2**20


def abstract(tree) -> Any:
    """Shapes, dtypes and shardings of a tree of arrays (taken before donation)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def step_memory(jitted, *abstract_args) -> dict[str, float] | None:
    """XLA's compiled memory analysis of `jitted` at `abstract_args`, in MiB, or None.

    Call it after `jitted` has run with arguments of these types, so that it reuses
    the compiled program. Functions without `.lower` (a `chex.chexify` wrapper) and
    backends without an analysis give None.
    """
    if not hasattr(jitted, "lower"):
        return None
    try:
        analysis = jitted.lower(*abstract_args).compile().memory_analysis()
    except Exception:  # Some backends and wrappers report no memory analysis.
        return None
    if analysis is None:
        return None
    return {"xla_temp_mib": analysis.temp_size_in_bytes / _MIB,
            "xla_argument_mib": analysis.argument_size_in_bytes / _MIB,
            "xla_output_mib": analysis.output_size_in_bytes / _MIB}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB).

    Process-wide and monotone: in a process that ran several trainings (the study, the
    tests) it is the largest of them so far, not this run's own.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM"), in MiB (Linux only)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mib() -> float | None:
    """Resident memory of this process now, in MiB (Linux; None elsewhere)."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Restarts the kernel's peak-RSS record from the current RSS (Linux).

    `peak_rss_since_reset_mib()` then reports the peak of what ran since (not of
    compiling before it, say). False where not supported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mib() -> float | None:
    """Peak resident memory since `reset_peak_rss()`, in MiB (Linux; None elsewhere)."""
    return _status_mib("VmHWM")
