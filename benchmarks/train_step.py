"""The harness's train step against the same step written by hand with flax + optax.

    python -m benchmarks.train_step                 # 3 fresh processes per case
    python -m benchmarks.train_step --processes 5 --batch-size 256

Both cases train the digits CNN (`experiments.models.CNN`) from the same initial
parameters with Adam at a constant learning rate on the same batch:
- `optax_handwritten`: a plain `jax.jit(step, donate_argnums=0)` computing
  `optax.softmax_cross_entropy_with_integer_labels(...).mean()` and the Adam update;
- `lossjax_harness`: `experiments.programs`' compiled step for `configs/digits.py` with
  `lossjax.cross_entropy`, as `train_and_evaluate` runs it (mesh shardings, donation,
  step counter, per-step key, loss, gradient norm and accuracy metrics).

Timed: `STEPS` consecutive steps per call (dispatch included, as in training), median
over calls, then median over fresh processes. The `paired` case builds both steps in
one process and alternates them, reporting the median per-round ratio: on a shared
machine whose load drifts, it is the number to trust. Goal: harness / hand-written
<= 1.02.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np

from benchmarks import common

CASES = ["optax_handwritten", "lossjax_harness", "paired"]
STEPS = 20
LEARNING_RATE = 3e-3


def _batch_size() -> int:
    return int(os.environ.get("LOSSJAX_BENCH_BATCH", "64"))


def _harness(batch):
    from configs import digits
    from experiments import data as data_lib
    from experiments import programs, schema

    config = digits.get_config()
    with config.unlocked():
        config.optimizer.schedule = "constant"
        config.optimizer.learning_rate = LEARNING_RATE
        config.batch_size = len(batch["y"])
    prog = programs.get(schema.validate_config(config), data_lib.digits())
    state = prog.init(np.int32(0))
    device_batch = prog.step.put_batch(batch)
    return prog.step.fn, state, device_batch


def _handwritten(batch):
    import jax
    import jax.numpy as jnp
    import optax

    from experiments import models

    model = models.CNN(num_outputs=10)
    tx = optax.adam(LEARNING_RATE)
    # The harness's initial parameters (`tasks.init_state` with seed 0): the step's
    # speed on CPU depends on the values (ReLU sparsity), so both start alike.
    init_key, _ = jax.random.split(jax.random.key(0))
    params = model.init(init_key, jnp.asarray(batch["x"][:1]))["params"]
    state = {"params": params, "opt_state": tx.init(params)}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch["x"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, batch["y"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}, {"loss": loss}

    return step, state, jax.device_put(batch)


def _runner(step, state, device_batch):
    holder = {"state": state}

    def run():
        s = holder["state"]
        for _ in range(STEPS):
            s, metrics = step(s, device_batch)
        holder["state"] = s
        return metrics["loss"]

    return run


def measure(case: str) -> dict:
    import time

    import jax

    from experiments import data as data_lib

    ds = data_lib.digits()
    idx = data_lib.batch_indices(0, 0, ds.num_train, _batch_size())
    batch = {"x": ds.x_train[idx], "y": ds.y_train[idx]}
    info = {"devices": jax.device_count(), "batch": _batch_size()}
    if case == "paired":
        # Both steps in one process, timed in alternation: a change in machine load
        # hits both alike, so the median of per-round ratios is the robust number.
        hand_parts, harness_parts = _handwritten(batch), _harness(batch)
        same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                            hand_parts[1]["params"], harness_parts[1]["params"])
        assert all(jax.tree.leaves(same)), "the two cases must start from one init"
        hand, harness = _runner(*hand_parts), _runner(*harness_parts)
        for fn in (hand, harness) * 3:
            common.block(fn())
        ratios = []
        for i in range(41):
            times = {}
            # Alternate which goes first: the second of a pair runs on warmer caches.
            for name, fn in (("hand", hand), ("harness", harness))[::(-1) ** i]:
                start = time.perf_counter()
                common.block(fn())
                times[name] = time.perf_counter() - start
            ratios.append(times["harness"] / times["hand"])
        return {"ratio": float(np.median(ratios)), **info}
    make = _harness if case == "lossjax_harness" else _handwritten
    seconds = common.median_time(_runner(*make(batch)), repeats=15, warmup=3)
    return {"us_per_step": seconds / STEPS * 1e6, **info}


def jax_backend() -> str:
    import jax

    return f"{jax.default_backend()} ({jax.devices()[0].device_kind})"


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "--batch-size" in sys.argv:
        i = sys.argv.index("--batch-size")
        os.environ["LOSSJAX_BENCH_BATCH"] = sys.argv[i + 1]
        del sys.argv[i:i + 2]
    results = common.main("benchmarks.train_step", CASES, measure)
    if results is not None:
        by_case = {r["case"]: r for r in results}
        hand = by_case["optax_handwritten"].get("us_per_step")
        for r in results:
            if hand and "us_per_step" in r and "ratio" not in r:
                r["ratio"] = r["us_per_step"] / hand
        print(f"\ndigits CNN train step, batch {_batch_size()}, Adam, float32, "
              f"{jax_backend()}; median of {STEPS}-step calls; ratio = / hand-written "
              "(goal <= 1.02)\n")
        print(common.markdown_table(results, ["case", "us_per_step", "ratio",
                                              "devices", "batch"]))
