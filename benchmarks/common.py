"""Shared benchmark machinery: one fresh process per case, medians, markdown tables.

A benchmark module defines `CASES` (a list of case names) and `measure(case) -> dict`
(numbers for that case, measured in the current process), and calls
`common.main("benchmarks.<name>", CASES, measure, ...)` from its `__main__` block.
`main` re-runs the module once per case and repetition in a fresh interpreter
(`--case NAME`), so no case inherits another's compilation cache, allocator state or
peak memory, and reports the median over processes.

With `interleave=True`, cases that share a group (the part of the name before '/', e.g.
the implementations of one loss) run in turns: process 1 of every case in the group,
then process 2 in the reverse order, and so on. The cases of a group are then measured
in the same minute of machine load, each repetition's `runs` entry can be compared with
the other cases' entry of the same repetition (paired ratios), and a slow spell hits
every case of the group rather than one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax

from experiments import memory


def block(x):
    """Waits for every array in a pytree (JAX or torch) to be computed."""
    return jax.tree.map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def median_time(
    fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2,
    warmup_seconds: float = 0.3,
) -> float:
    """Median wall time in seconds of `fn()`, after warming up.

    Warm-up is at least `warmup` calls (compilation) and at least `warmup_seconds`:
    the first few hundred milliseconds of a fresh process run measurably slower (thread
    pools and clocks spinning up; seen as 2x on millisecond calls), whichever
    implementation comes first.
    """
    start = time.perf_counter()
    calls = 0
    while calls < warmup or time.perf_counter() - start < warmup_seconds:
        block(fn())
        calls += 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# The trainer's own measures, so that benchmarks and experiment reports agree.
peak_rss_mib = memory.peak_rss_mib
current_rss_mib = memory.current_rss_mib
reset_peak_rss = memory.reset_peak_rss
peak_rss_since_reset_mib = memory.peak_rss_since_reset_mib


def compiled_temp_mib(jitted, *args) -> float | None:
    """XLA's temporary buffer size for `jitted(*args)`, in MiB, where XLA reports it."""
    analysis = memory.step_memory(jitted, *args)
    return None if analysis is None else analysis["xla_temp_mib"]


def run_case_in_fresh_process(module: str, case: str, timeout: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", module, "--case", case],
        capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _schedule(cases: Sequence[str], processes: int, interleave: bool):
    """(case, repetition) pairs in the order their processes run."""
    if not interleave:
        return [(c, r) for c in cases for r in range(processes)]
    groups: dict[str, list[str]] = {}
    for c in cases:
        groups.setdefault(c.split("/")[0], []).append(c)
    order = []
    for group in groups.values():
        for r in range(processes):
            order += [(c, r) for c in (group if r % 2 == 0 else group[::-1])]
    return order


def median_over_processes(results: Sequence[dict]) -> dict:
    """Per key, the median of the numeric values over the processes that produced it."""
    merged: dict = {}
    for key in dict.fromkeys(k for r in results for k in r):
        values = [r[key] for r in results if key in r]
        numbers = [v for v in values if isinstance(v, (int, float)) and v is not None]
        merged[key] = statistics.median(numbers) if numbers else values[0]
    return merged


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(
    module: str,
    cases: Sequence[str],
    measure: Callable[[str], dict],
    *,
    processes: int = 3,
    timeout: float = 600,
    interleave: bool = False,
) -> list[dict] | None:
    """Entry point of a benchmark module.

    With `--case NAME`, measures that case here and prints its JSON. Otherwise runs
    every case (or those named with `--only`) in `processes` fresh interpreters each
    and returns one merged result dict per case, with "case" set. With `interleave`,
    the processes of a group's cases alternate (see the module docstring) and each
    merged dict also holds `runs`: the per-process dicts in repetition order.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("--case", help="measure one case in this process (JSON out)")
    parser.add_argument(
        "--only", nargs="*", help="cases to run: whole names, or their part before '/'"
    )
    parser.add_argument("--processes", type=int, default=processes)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case)))
        return None
    only = set(args.only or ())
    selected = [c for c in cases if not only or c in only or c.split("/")[0] in only]
    runs: dict[str, list[dict]] = {c: [] for c in selected}
    merged = []
    for case, rep in _schedule(selected, args.processes, interleave):
        runs[case].append(run_case_in_fresh_process(module, case, timeout))
        if rep + 1 < args.processes:
            continue
        ok = [r for r in runs[case] if "error" not in r]
        result = median_over_processes(ok) if ok else runs[case][0]
        result["case"] = case
        print(f"  {case}: {result}", file=sys.stderr, flush=True)
        if interleave:
            result["runs"] = runs[case]
        merged.append(result)
    return sorted(merged, key=lambda r: selected.index(r["case"]))
