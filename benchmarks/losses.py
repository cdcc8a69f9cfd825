"""Every lossjax loss against optax and torch (CPU): forward and forward+grad.

    python -m benchmarks.losses                 # all losses, 5 fresh processes per case
    python -m benchmarks.losses --only cross_entropy huber_loss --processes 3

One case is one (loss, implementation) pair measured in a fresh interpreter: the jitted
forward (mean reduction) and the jitted gradient with respect to the first input, on
the same float32 inputs for every implementation. The table gives median times and the
ratio of lossjax to the faster baseline (< 1 means lossjax is faster).

How the numbers are kept steady on a small shared machine, where one call takes about
a millisecond and other processes come and go:

- Many timed calls per process (`REPEATS`), median: a single slow call (a scheduler
  tick, another process waking) moves a median of 101 calls by nothing.
- The three implementations of one loss run interleaved, one fresh process each per
  repetition (lossjax, optax, torch, then torch, optax, lossjax, ...;
  `common.main(..., interleave=True)`), so they see the same minute of machine load
  instead of one of them catching a busy spell.
- The ratio is paired: lossjax over the faster baseline within each repetition, then
  the median over 5 repetitions (`PROCESSES`). A load change between repetitions then
  cancels in each ratio instead of landing on one side of a ratio of medians.
- Wall time, not CPU time: torch and XLA both use every core for one call, and CPU time
  would charge a parallel kernel for its threads' spinning and credit a serial one for
  leaving a core idle, which is not what a user waits for.

What none of this removes is other work on the machine: it slows torch's thread pool
far more than XLA's (huber_loss forward went from 0.3 ms to 16 ms at a load average of
6 on 2 cores, XLA's from 0.9 to 1.6 ms), so the table header prints the load average
at the start and the end of the run; compare ratios only from a quiet run.
"""

from __future__ import annotations

import os
import statistics

import numpy as np

from benchmarks import common

# Classification inputs [rows, classes]; elementwise inputs [rows * classes].
ROWS, CLASSES = 4096, 512
ELEMENTS = ROWS * CLASSES
# Each call takes about a millisecond, where scheduler noise on a small machine is
# large: many timed calls per process keep the median steady (see the module docstring).
REPEATS = 101
# A whole process can run slow (another process's busy spell; under a load of 7 on 2
# cores, one of 5 paired ratios of two identical programs was 2x): the median over 5
# processes shrugs off two such outliers, over 3 only one.
PROCESSES = 5


def _inputs(kind: str):
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.normal(size=s).astype(np.float32)
    if kind == "int_labels":
        return f32(ROWS, CLASSES), rng.integers(0, CLASSES, ROWS).astype(np.int32)
    if kind == "binary":
        labels = rng.integers(0, 2, (ROWS, CLASSES)).astype(np.float32)
        return f32(ROWS, CLASSES), labels
    if kind == "signs":
        return f32(ELEMENTS), np.sign(f32(ELEMENTS)).astype(np.float32)
    if kind == "regression":
        return f32(ELEMENTS), f32(ELEMENTS)
    if kind == "positive_targets":
        return f32(ELEMENTS), rng.poisson(2.0, ELEMENTS).astype(np.float32)
    if kind == "gaussian":
        scale = rng.uniform(0.5, 2, ELEMENTS).astype(np.float32)
        return f32(ELEMENTS), f32(ELEMENTS), scale
    if kind == "distributions":
        x = f32(ROWS, CLASSES)
        log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
        target = rng.dirichlet(np.ones(CLASSES), ROWS).astype(np.float32)
        return log_p.astype(np.float32), target
    if kind == "two_logits":
        return f32(ROWS, CLASSES), f32(ROWS, CLASSES)
    if kind == "vectors":
        return f32(ROWS, CLASSES), f32(ROWS, CLASSES)
    raise ValueError(kind)


def _optax(name):
    import jax.numpy as jnp
    import optax.losses as ol

    table = {
        "cross_entropy": ol.softmax_cross_entropy_with_integer_labels,
        "binary_cross_entropy": ol.sigmoid_binary_cross_entropy,
        "sigmoid_focal_loss": ol.sigmoid_focal_loss,
        "hinge_loss": ol.hinge_loss,
        "squared_error": ol.squared_error,
        "huber_loss": ol.huber_loss,
        "log_cosh": ol.log_cosh,
        "kl_divergence": ol.kl_divergence,
        "cosine_similarity_loss": ol.cosine_distance,
    }
    fn = table.get(name)
    return None if fn is None else (lambda *a: jnp.mean(fn(*a)))


def _torch(name):
    import torch.nn.functional as F

    return {
        "cross_entropy": lambda x, y: F.cross_entropy(x, y.long()),
        "binary_cross_entropy": F.binary_cross_entropy_with_logits,
        "multiclass_hinge_loss": lambda x, y: F.multi_margin_loss(x, y.long()),
        "squared_error": F.mse_loss,
        "absolute_error": F.l1_loss,
        "huber_loss": F.huber_loss,
        "smooth_l1_loss": F.smooth_l1_loss,
        "poisson_nll": F.poisson_nll_loss,
        "gaussian_nll": F.gaussian_nll_loss,
        "kl_divergence": lambda x, y: F.kl_div(x, y, reduction="batchmean"),
        "cosine_similarity_loss": lambda x, y: (1 - F.cosine_similarity(x, y)).mean(),
    }.get(name)


# lossjax name -> kind of inputs. Losses with their own benchmark (ctc_loss in
# benchmarks.ctc, linear_cross_entropy in benchmarks.fused_ce) are not repeated here.
INPUTS = {
    "cross_entropy": "int_labels",
    "focal_loss": "int_labels",
    "multiclass_hinge_loss": "int_labels",
    "binary_cross_entropy": "binary",
    "sigmoid_focal_loss": "binary",
    "hinge_loss": "signs",
    "squared_error": "regression",
    "absolute_error": "regression",
    "huber_loss": "regression",
    "smooth_l1_loss": "regression",
    "log_cosh": "regression",
    "quantile_loss": "regression",
    "poisson_nll": "positive_targets",
    "gaussian_nll": "gaussian",
    "kl_divergence": "distributions",
    "js_divergence": "two_logits",
    "cosine_similarity_loss": "vectors",
}
IMPLEMENTATIONS = ("lossjax", "optax", "torch")
CASES = [f"{name}/{impl}" for name in INPUTS for impl in IMPLEMENTATIONS]


def _measure_jax(fn, inputs):
    import jax

    args = [jax.device_put(a) for a in inputs]
    forward = jax.jit(fn)
    grad = jax.jit(jax.grad(fn))
    return {
        "forward_ms": 1e3 * common.median_time(lambda: forward(*args), repeats=REPEATS),
        "grad_ms": 1e3 * common.median_time(lambda: grad(*args), repeats=REPEATS),
    }


def _measure_torch(fn, inputs):
    import torch

    args = [torch.from_numpy(a) for a in inputs]
    x = args[0].clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            return fn(*args)

    def grad():
        x.grad = None
        fn(x, *args[1:]).backward()
        return x.grad

    return {
        "forward_ms": 1e3 * common.median_time(forward, repeats=REPEATS),
        "grad_ms": 1e3 * common.median_time(grad, repeats=REPEATS),
    }


def measure(case: str) -> dict:
    name, impl = case.split("/")
    inputs = _inputs(INPUTS[name])
    if impl == "lossjax":
        import lossjax

        if name not in lossjax.LOSSES:
            return {"missing": True}
        loss = lossjax.get(name)
        return _measure_jax(lambda *a: loss(*a), inputs)
    if impl == "optax":
        fn = _optax(name)
        return {"missing": True} if fn is None else _measure_jax(fn, inputs)
    fn = _torch(name)
    return {"missing": True} if fn is None else _measure_torch(fn, inputs)


def _paired_ratio(by_case: dict, name: str, key: str) -> float | None:
    """Median over repetitions of lossjax / faster baseline, within each repetition."""
    runs = {impl: by_case.get(f"{name}/{impl}", {}).get("runs", [])
            for impl in IMPLEMENTATIONS}
    ratios = []
    for rep, ours in enumerate(runs["lossjax"]):
        baselines = [r[rep].get(key) for impl, r in runs.items()
                     if impl != "lossjax" and rep < len(r)]
        baselines = [b for b in baselines if b]
        if ours.get(key) and baselines:
            ratios.append(ours[key] / min(baselines))
    return statistics.median(ratios) if ratios else None


def summarize(results: list[dict]) -> list[dict]:
    by_case = {r["case"]: r for r in results}
    rows = []
    for name in INPUTS:
        get = lambda impl, key, name=name: by_case.get(f"{name}/{impl}", {}).get(key)
        if get("lossjax", "forward_ms") is None:
            continue
        row = {"loss": name}
        for mode in ("forward", "grad"):
            key = f"{mode}_ms"
            ours = get("lossjax", key)
            row[f"{mode} lossjax ms"] = ours
            row[f"{mode} optax ms"] = get("optax", key)
            row[f"{mode} torch ms"] = get("torch", key)
            row[f"{mode} ratio"] = _paired_ratio(by_case, name, key)
        rows.append(row)
    return rows


COLUMNS = [
    "loss",
    "forward lossjax ms", "forward optax ms", "forward torch ms", "forward ratio",
    "grad lossjax ms", "grad optax ms", "grad torch ms", "grad ratio",
]

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_before = os.getloadavg()[0]
    results = common.main("benchmarks.losses", CASES, measure,
                          processes=PROCESSES, interleave=True)
    if results is not None:
        print(f"\nload average {load_before:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores")
        print(f"float32, classification [{ROWS}, {CLASSES}], elementwise [{ELEMENTS}]; "
              "times: median over processes of the median of "
              f"{REPEATS} calls; ratio = median over processes of lossjax / faster of "
              "optax and torch in the same repetition (< 1: lossjax faster)\n")
        print(common.markdown_table(summarize(results), COLUMNS))
