"""Fused vs materialized preference (DPO) and distillation losses: time and memory.

    python -m benchmarks.preference                    # issue 15's shapes, 3 processes
    python -m benchmarks.preference --processes 1      # one process per case
    python -m benchmarks.preference --small            # 1/4-size shapes (a quick look)
    python -m benchmarks.preference --only dpo-f32-P8-S1024-d1024-V32768

Cases, each loss + gradient:
- DPO (sigmoid, beta 0.1) at (pairs, seq, d, V), w.r.t. the policy's chosen and rejected
  hidden states and the head kernel, reference log-probs precomputed:
  `fused` is `lossjax.linear_dpo_loss` (no `[2 * pairs * seq, V]` logits);
  `materialized` computes `log_softmax(hidden @ kernel)`, gathers the labels' entries,
  sums per sequence and calls `lossjax.dpo_loss`.
- Distillation (T = 2) at (tokens, d, V), student and teacher with the same d, the
  teacher frozen (gradient w.r.t. the student's hidden states and kernel only):
  `fused` is `lossjax.linear_distillation_loss`, `materialized` is
  `lossjax.distillation_loss(student_hidden @ student_kernel, teacher_hidden @
  teacher_kernel)`.

Every case runs in a fresh process, the two implementations of a shape in turns
(benchmarks/common.py, `interleave=True`), and reports the median wall time, XLA's
compiled temp size and the process's peak RSS while the timed calls run; the table
gives each fused case's ratios to the materialized case of its shape. Shapes whose
logits exceed 2^29 entries take one timed call per process on CPU.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import common

# ("dpo", dtype, pairs, seq, d, V) and ("kd", dtype, tokens, d, V)
SHAPES = [("dpo", "f32", 8, 1024, 1024, 32768), ("dpo", "bf16", 8, 1024, 1024, 32768),
          ("kd", "f32", 8192, 1024, 32768)]
SMALL_SHAPES = [("dpo", "f32", 4, 512, 512, 16384), ("dpo", "bf16", 4, 512, 512, 16384),
                ("kd", "f32", 2048, 512, 16384)]
IMPLS = ("fused", "materialized")


def _name(shape):
    if shape[0] == "dpo":
        _, dt, p, s, d, v = shape
        return f"dpo-{dt}-P{p}-S{s}-d{d}-V{v}"
    _, dt, n, d, v = shape
    return f"kd-{dt}-N{n}-d{d}-V{v}"


def _cases(shapes):
    return [f"{_name(s)}/{impl}" for s in shapes for impl in IMPLS]


CASES = _cases(SHAPES)
SMALL_CASES = _cases(SMALL_SHAPES)


def _parse(case):
    shape, impl = case.split("/")
    parts = shape.split("-")
    dtype = jnp.float32 if parts[1] == "f32" else jnp.bfloat16
    nums = [int(p[1:]) for p in parts[2:]]
    return parts[0], dtype, nums, impl


def _materialized_logps(h, w, y):
    logp = jax.nn.log_softmax((h @ w).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, y[..., None], -1)[..., 0].sum(-1)


def _dpo(dtype, nums, impl):
    import lossjax

    p, s, d, v = nums
    ks = jax.random.split(jax.random.key(0), 5)
    draw = jax.jit(lambda k: jax.random.normal(k, (p, s, d), dtype))
    hc, hr = draw(ks[0]), draw(ks[1])
    w = jax.jit(lambda k: jax.random.normal(k, (d, v), dtype) / d**0.5)(ks[2])
    yc, yr = (jax.random.randint(k, (p, s), 0, v) for k in ks[3:])
    ref_c = ref_r = jnp.full((p,), -float(s) * 10.0)
    if impl == "fused":
        def loss(hc, hr, w):
            return lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r)
    else:
        def loss(hc, hr, w):
            return lossjax.dpo_loss(_materialized_logps(hc, w, yc),
                                    _materialized_logps(hr, w, yr), ref_c, ref_r)
    return jax.value_and_grad(loss, argnums=(0, 1, 2)), (hc, hr, w), 2 * p * s * v


def _kd(dtype, nums, impl):
    import lossjax

    n, d, v = nums
    ks = jax.random.split(jax.random.key(0), 4)
    draw_h = jax.jit(lambda k: jax.random.normal(k, (n, d), dtype))
    draw_w = jax.jit(lambda k: jax.random.normal(k, (d, v), dtype) / d**0.5)
    sh, th = draw_h(ks[0]), draw_h(ks[1])
    sk, tk = draw_w(ks[2]), draw_w(ks[3])
    if impl == "fused":
        def loss(sh, sk):
            return lossjax.linear_distillation_loss(sh, sk, th, tk, temperature=2.0)
    else:
        def loss(sh, sk):
            return lossjax.distillation_loss(sh @ sk, th @ tk, temperature=2.0)
    return jax.value_and_grad(loss, argnums=(0, 1)), (sh, sk), n * v


def measure(case: str) -> dict:
    kind, dtype, nums, impl = _parse(case)
    fn, args, logits_entries = (_dpo if kind == "dpo" else _kd)(dtype, nums, impl)
    common.block(args)
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # Some backends report no memory analysis.
        temp_mib = None
    result = {"shape": case.split("/")[0], "impl": impl, "temp_mib": temp_mib,
              "device": jax.devices()[0].device_kind}
    rss_before = common.current_rss_mib() if common.reset_peak_rss() else None
    big = logits_entries >= 2**29 and jax.default_backend() == "cpu"
    seconds = common.median_time(lambda: compiled(*args), repeats=1 if big else 3,
                                 warmup=0 if big else 1)
    result["time_s"] = seconds
    if rss_before is None:
        result["peak_rss_mib"] = common.peak_rss_mib()
    else:
        peak = common.peak_rss_since_reset_mib()
        result.update(peak_rss_mib=peak, call_rss_mib=peak - rss_before)
    return result


def _table(results):
    base = {r["shape"]: r for r in results
            if r.get("impl") == "materialized" and "time_s" in r}
    rows = []
    for r in results:
        row = dict(r)
        b = base.get(r.get("shape"))
        if b and "time_s" in r:
            row["time_ratio"] = r["time_s"] / b["time_s"]
            row["rss_ratio"] = r["peak_rss_mib"] / b["peak_rss_mib"]
            if r.get("call_rss_mib") and b.get("call_rss_mib"):
                row["call_rss_ratio"] = r["call_rss_mib"] / b["call_rss_mib"]
            if r.get("temp_mib") is not None and b.get("temp_mib"):
                row["temp_ratio"] = r["temp_mib"] / b["temp_mib"]
        rows.append(row)
    columns = ["shape", "impl", "time_s", "time_ratio", "peak_rss_mib", "rss_ratio",
               "call_rss_mib", "call_rss_ratio", "temp_mib", "temp_ratio", "device",
               "error"]
    return common.markdown_table(rows, columns)


if __name__ == "__main__":
    cases = CASES
    if "--small" in sys.argv:
        sys.argv.remove("--small")
        cases = SMALL_CASES
    results = common.main("benchmarks.preference", cases, measure, timeout=1800,
                          interleave=True)
    if results is not None:
        print(_table(results))
