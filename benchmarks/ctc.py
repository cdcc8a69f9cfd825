"""CTC loss: lossjax vs optax vs torch (CPU), forward and forward+backward.

    python -m benchmarks.ctc                  # every case, 3 fresh processes each
    python -m benchmarks.ctc --processes 1    # quicker
    python -m benchmarks.ctc --only B16-T200-K32-L40   # one size (or whole case names)
    CTC_BASELINE=DIR python -m benchmarks.ctc --only B16-T200-K32-L40
        # also "lossjax@base": lossjax imported from the source tree DIR
        # (e.g. `git archive REV | tar -x -C DIR`), interleaved with the
        # others: a before/after ratio measured in one run

Implementations, each on the same float32 logits `[B, T, K]` (log_softmax included),
summed over the batch:
- lossjax: `lossjax.ctc_loss(..., reduction="sum")` (analytic custom_vjp gradient);
- optax: `optax.ctc_loss` with padding masks (autodiff through its scan);
- torch: `F.ctc_loss(log_softmax(x).transpose(0, 1), ...)` on CPU (its native kernel);
- lossjax@base (with `CTC_BASELINE`): lossjax's `ctc_loss` from another source tree.

"fwd" is the loss alone, "fwd+bwd" the loss and its gradient w.r.t. the logits. Each
case runs in a fresh process (benchmarks/common.py); the table reports the median wall
time, XLA's compiled temp size (jax only) and the process's peak RSS. With a baseline,
the processes of one size alternate between the implementations (`interleave`), and
`vs_base` is the median over repetitions of the paired ratio to lossjax@base.
"""

from __future__ import annotations

import os
import statistics
import sys

import numpy as np

from benchmarks import common

SIZES = {"B16-T200-K32-L40": (16, 200, 32, 40), "B32-T800-K64-L100": (32, 800, 64, 100)}
BASELINE = os.environ.get("CTC_BASELINE")
IMPLS = ("lossjax", "optax", "torch") + (("lossjax@base",) if BASELINE else ())
MODES = ("fwd", "fwd+bwd")
CASES = [f"{s}/{i}/{m}" for s in SIZES for i in IMPLS for m in MODES]


def _data(batch, num_t, num_classes, max_len):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 1.0, (batch, num_t, num_classes)).astype(np.float32)
    logit_lengths = rng.integers(3 * num_t // 4, num_t + 1, batch).astype(np.int32)
    logit_lengths[0] = num_t
    label_lengths = rng.integers(max_len // 2, max_len + 1, batch).astype(np.int32)
    label_lengths[0] = max_len
    labels = rng.integers(1, num_classes, (batch, max_len)).astype(np.int32)
    labels = np.where(np.arange(max_len) < label_lengths[:, None], labels, 0)
    return logits, logit_lengths, labels, label_lengths


def _measure_jax(impl, mode, data):
    import jax
    import jax.numpy as jnp

    logits, logit_lengths, labels, label_lengths = (jnp.asarray(a) for a in data)
    if impl in ("lossjax", "lossjax@base"):
        if impl == "lossjax@base":
            sys.path.insert(0, os.path.abspath(BASELINE))
        import lossjax

        if impl == "lossjax@base":
            assert lossjax.__file__.startswith(os.path.abspath(BASELINE)), \
                lossjax.__file__

        def loss(x):
            return lossjax.ctc_loss(x, logit_lengths, labels, label_lengths,
                                    reduction="sum")
    else:
        import optax

        # optax takes padding masks (1.0 = padded) instead of lengths.
        logit_pad = jnp.arange(logits.shape[1])[None] >= logit_lengths[:, None]
        label_pad = jnp.arange(labels.shape[1])[None] >= label_lengths[:, None]

        def loss(x):
            return jnp.sum(optax.ctc_loss(x, logit_pad.astype(jnp.float32), labels,
                                          label_pad.astype(jnp.float32)))

    fn = jax.jit(jax.value_and_grad(loss) if mode == "fwd+bwd" else loss)
    temp = common.compiled_temp_mib(fn, logits)
    seconds = common.median_time(lambda: fn(logits), repeats=9, warmup=2)
    return {"time_ms": 1e3 * seconds, "temp_mib": temp,
            "device": jax.devices()[0].device_kind}


def _measure_torch(mode, data):
    import torch
    import torch.nn.functional as F

    logits, logit_lengths, labels, label_lengths = (torch.from_numpy(a) for a in data)
    logit_lengths, labels, label_lengths = (
        a.long() for a in (logit_lengths, labels, label_lengths))
    grad = mode == "fwd+bwd"

    def run():
        x = logits.detach().requires_grad_(grad)
        lp = torch.log_softmax(x, -1).transpose(0, 1)
        loss = F.ctc_loss(lp, labels, logit_lengths, label_lengths, reduction="sum")
        if grad:
            loss.backward()
            return x.grad
        return loss

    if not grad:
        run_ = run

        def run():
            with torch.no_grad():
                return run_()

    seconds = common.median_time(run, repeats=9, warmup=2)
    return {"time_ms": 1e3 * seconds, "device": f"torch cpu ({torch.get_num_threads()} "
            "threads)"}


def measure(case: str) -> dict:
    size, impl, mode = case.split("/")
    data = _data(*SIZES[size])
    if impl == "torch":
        result = _measure_torch(mode, data)
    else:
        result = _measure_jax(impl, mode, data)
    result.update(size=size, impl=impl, mode=mode, peak_rss_mib=common.peak_rss_mib())
    return result


def _table(results):
    by_key = {(r.get("size"), r.get("impl"), r.get("mode")): r for r in results}
    rows = []
    for r in results:
        row = dict(r)
        for other in ("optax", "torch"):
            base = by_key.get((r.get("size"), other, r.get("mode")), {})
            if "time_ms" in r and "time_ms" in base:
                row[f"vs_{other}"] = r["time_ms"] / base["time_ms"]
        base = by_key.get((r.get("size"), "lossjax@base", r.get("mode")), {})
        pairs = [(a["time_ms"], b["time_ms"]) for a, b in
                 zip(r.get("runs", ()), base.get("runs", ()), strict=False)
                 if "time_ms" in a and "time_ms" in b]
        if pairs:  # the repetitions ran side by side: paired ratios
            row["vs_base"] = statistics.median(a / b for a, b in pairs)
        rows.append(row)
    columns = ["size", "impl", "mode", "time_ms", "vs_optax", "vs_torch", "vs_base",
               "temp_mib", "peak_rss_mib", "device", "error"]
    return common.markdown_table(rows, columns)


if __name__ == "__main__":
    results = common.main("benchmarks.ctc", CASES, measure,
                          interleave=BASELINE is not None)
    if results is not None:
        print(_table(results))
