"""Fused linear cross-entropy vs materialized logits: time and peak memory.

    python -m benchmarks.fused_ce                  # CPU shapes, 3 processes per case
    python -m benchmarks.fused_ce --processes 1    # one process per case (quicker)
    python -m benchmarks.fused_ce --gemma          # Gemma-2-2B's head (for a GPU)
    python -m benchmarks.fused_ce --only f32-N4096-d1024-V32768  # one shape

Implementations, each as loss + gradient (w.r.t. hidden and kernel) and loss only, mean
over tokens:
- lossjax: `lossjax.linear_cross_entropy(hidden, kernel, labels)`;
- optax: `optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, labels)`,
  the materialized `[tokens, vocab]` logits;
- tokamax: `tokamax.linear_softmax_cross_entropy_loss(..., implementation="xla")`;
  tokamax 0.0.12 ships "xla" (which materializes the logits and their one-hot) and
  "mosaic_tpu" (TPU only), and no "chunked_xla".

Each case runs in a fresh process (benchmarks/common.py) and reports the median wall
time, XLA's compiled temp size and two RSS figures: `peak_rss_mib`, the process's peak
while the timed calls run (Linux lets the peak be reset after compiling), and
`call_rss_mib`, that peak minus the RSS just before the first call (runtime, compiled
code and inputs are most of the process's peak at the small shape). On a GPU also the
device allocator's peak (`device_peak_mib`, which includes compiling), which is what
the fused loss saves there. A case whose compiled temp size would not fit in 60% of
the memory available is reported as skipped instead of run, so that it cannot push
the machine into the OOM killer.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import common

# (dtype, tokens, hidden size, vocab)
SHAPES = [("f32", 4096, 1024, 32768), ("f32", 8192, 1024, 131072),
          ("bf16", 8192, 1024, 131072)]
GEMMA_SHAPES = [("bf16", 8192, 2304, 256000)]
IMPLS = ("lossjax", "optax", "tokamax")
MODES = ("loss+grad", "loss")


def _cases(shapes):
    return [f"{dt}-N{n}-d{d}-V{v}/{impl}/{mode}"
            for dt, n, d, v in shapes for impl in IMPLS for mode in MODES]


CASES = _cases(SHAPES)
GEMMA_CASES = _cases(GEMMA_SHAPES)


def _parse(case):
    shape, impl, mode = case.split("/")
    dt, n, d, v = shape.split("-")
    return (jnp.float32 if dt == "f32" else jnp.bfloat16, int(n[1:]), int(d[1:]),
            int(v[1:]), impl, mode)


def _loss_fn(impl, labels):
    if impl == "lossjax":
        import lossjax

        return lambda h, w: lossjax.linear_cross_entropy(h, w, labels)
    if impl == "optax":
        import optax

        def naive(h, w):
            logits = (h @ w).astype(jnp.float32)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return losses.mean()

        return naive
    import tokamax
    from absl import flags

    # tokamax reads absl flags when called; ours (--case) are not absl flags.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return lambda h, w: tokamax.linear_softmax_cross_entropy_loss(
        h, labels, w, reduction="mean", implementation="xla")


def _available_mib():
    stats = jax.devices()[0].memory_stats()
    if jax.default_backend() != "cpu" and stats and "bytes_limit" in stats:
        return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2**20
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def measure(case: str) -> dict:
    dtype, n, d, v, impl, mode = _parse(case)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    # Drawn by one jitted function each, straight in `dtype`, so that no f32 copy
    # of the kernel raises the device's peak memory before the measured call.
    hidden = jax.jit(lambda k: jax.random.normal(k, (n, d), dtype))(k1)
    kernel = jax.jit(lambda k: jax.random.normal(k, (d, v), dtype) / d**0.5)(k2)
    labels = jax.random.randint(k3, (n,), 0, v)
    common.block((hidden, kernel, labels))  # in memory before `rss_before` is read
    fn = _loss_fn(impl, labels)
    if mode == "loss+grad":
        fn = jax.value_and_grad(fn, argnums=(0, 1))
    compiled = jax.jit(fn).lower(hidden, kernel).compile()
    try:
        temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # Some backends report no memory analysis.
        temp_mib = None
    result = {"impl": impl, "mode": mode, "shape": case.split("/")[0],
              "device": jax.devices()[0].device_kind, "temp_mib": temp_mib}
    if temp_mib is not None and temp_mib > 0.6 * _available_mib():
        result["note"] = f"skipped: needs {temp_mib / 1024:.1f} GiB temp"
        return result
    # The calls' own memory: their peak above what the process holds now (runtime,
    # compiled code, inputs), which at the small shape are most of the peak.
    rss_before = common.current_rss_mib() if common.reset_peak_rss() else None
    big = n * v >= 2**29 and jax.default_backend() == "cpu"
    # Big shapes take minutes per call on two CPU cores: one timed call of the already
    # compiled function, which also pays for first-touch of its fresh buffers (as the
    # first step of a training run does).
    seconds = common.median_time(lambda: compiled(hidden, kernel),
                                 repeats=1 if big else 5, warmup=0 if big else 2)
    if rss_before is None:
        result.update(time_s=seconds, peak_rss_mib=common.peak_rss_mib())
    else:
        peak = common.peak_rss_since_reset_mib()
        result.update(time_s=seconds, peak_rss_mib=peak, call_rss_mib=peak - rss_before)
    stats = jax.devices()[0].memory_stats()
    if jax.default_backend() != "cpu" and stats and "peak_bytes_in_use" in stats:
        # On an accelerator the host RSS says little: the device allocator's peak is
        # what a fused loss saves (inputs included, as in a training step).
        result["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return result


def _table(results):
    base = {}
    for r in results:
        if r.get("impl") == "optax" and r.get("mode") == "loss+grad" and "time_s" in r:
            base[r["shape"]] = r
    rows = []
    for r in results:
        row = dict(r)
        b = base.get(r.get("shape"))
        if b and "time_s" in r:
            row["time_vs_naive_lg"] = r["time_s"] / b["time_s"]
            row["rss_vs_naive_lg"] = r["peak_rss_mib"] / b["peak_rss_mib"]
            if "call_rss_mib" in r and b.get("call_rss_mib"):
                row["call_rss_vs_naive_lg"] = r["call_rss_mib"] / b["call_rss_mib"]
            if "device_peak_mib" in r and "device_peak_mib" in b:
                row["device_peak_vs_naive_lg"] = (r["device_peak_mib"]
                                                  / b["device_peak_mib"])
        rows.append(row)
    columns = ["shape", "impl", "mode", "time_s", "time_vs_naive_lg", "peak_rss_mib",
               "rss_vs_naive_lg", "call_rss_mib", "call_rss_vs_naive_lg",
               "device_peak_mib", "device_peak_vs_naive_lg", "temp_mib", "device",
               "note", "error"]
    return common.markdown_table(rows, columns)


if __name__ == "__main__":
    cases = CASES
    if "--gemma" in sys.argv:
        sys.argv.remove("--gemma")
        cases = GEMMA_CASES
    results = common.main("benchmarks.fused_ce", cases, measure, timeout=1800)
    if results is not None:
        print(_table(results))
