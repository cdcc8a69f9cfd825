"""Contrastive losses: loss+grad time against hand-written / optax forms, and the
per-device XLA temp memory of the gathered vs ring SigLIP over 1, 2, 4, 8 devices.

    python -m benchmarks.contrastive                 # both tables, 3 processes per case
    python -m benchmarks.contrastive --processes 5   # more repetitions for the ratios
    python -m benchmarks.contrastive --only memory   # the memory table alone

Time (batch 4096, dim 256, float32, one device; jit of value_and_grad w.r.t. every
embedding input, median of 7 calls per process, each case in a fresh process, the
implementations of one loss interleaved so that each repetition pairs them in the same
minute of machine load):
- clip/lossjax `lossjax.clip_loss(a, b, temperature=0.07)` vs clip/jnp, the usual
  hand-written CLIP loss (`a @ b.T / t`, logsumexp over rows and columns, the diagonal);
- ntxent/lossjax `lossjax.ntxent(views, labels)` vs ntxent/optax `optax.ntxent` on two
  views of 2048 examples (4096 embeddings), and of 512 (1024 embeddings): optax's
  `ntxent` broadcasts through [n, n, dim] arrays and runs out of memory at n = 4096.
The ratio is the median over repetitions of lossjax / baseline (goal <= 1.05).

Memory (local batch 512, dim 256 per device): `jax.shard_map` over a 1-, 2-, 4- and
8-device mesh of fake CPU devices (`jax_num_cpu_devices=8` in the case's own process),
loss + gradients w.r.t. both towers, `compiled.memory_analysis().temp_size_in_bytes`
(per device: the SPMD program of one device). Compile only, nothing runs.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

BATCH, DIM = 4096, 256
LOCAL_BATCH, LOCAL_DIM = 512, 256
DEVICE_COUNTS = (1, 2, 4, 8)
# optax.ntxent broadcasts its cosine similarities through [n, n, dim] arrays (it asked
# for 34.8 GB at n = 4096, dim 256: RESOURCE_EXHAUSTED), so NT-Xent is also timed at
# n = 1024.
TIME_CASES = ["clip/lossjax", "clip/jnp", "ntxent/lossjax", "ntxent/optax",
              "ntxent1024/lossjax", "ntxent1024/optax"]
MEMORY_CASES = ["memory/siglip_ring", "memory/siglip_gather", "memory/clip_loss"]
CASES = TIME_CASES + MEMORY_CASES


def _clip_jnp(a, b, temperature=0.07):
    logits = a @ b.T / temperature
    diag = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    return jnp.mean((i2t + t2i) / 2)


def _time_case(loss, impl):
    import lossjax

    batch = 1024 if loss.endswith("1024") else BATCH

    rng = np.random.default_rng(0)
    if loss == "clip":
        a = rng.normal(size=(BATCH, DIM)).astype(np.float32)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b = a + 0.3 * rng.normal(size=a.shape).astype(np.float32)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        fn = lossjax.clip_loss if impl == "lossjax" else _clip_jnp
        step = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, temperature=0.07),
                                          argnums=(0, 1)))
        args = (a, b)
    else:
        import optax

        e = rng.normal(size=(batch, DIM)).astype(np.float32)
        labels = np.tile(np.arange(batch // 2), 2).astype(np.int32)
        fn = lossjax.ntxent if impl == "lossjax" else optax.ntxent
        step = jax.jit(jax.value_and_grad(
            lambda e: fn(e, labels, temperature=0.07)))
        args = (e,)
    args = tuple(jnp.asarray(x) for x in args)
    return {"time_ms": 1e3 * common.median_time(lambda: step(*args)),
            "device": jax.devices()[0].device_kind}


def _memory_case(impl):
    jax.config.update("jax_num_cpu_devices", max(DEVICE_COUNTS))
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import lossjax

    def loss(a, b):
        if impl == "clip_loss":
            return lossjax.clip_loss(a, b, axis_name="data")
        return lossjax.sigmoid_contrastive_loss(
            a, b, implementation=impl.split("_")[1], axis_name="data")

    out = {}
    for n in DEVICE_COUNTS:
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        run = jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh,
                            in_specs=(P("data"), P("data")),
                            out_specs=(P("data"), P("data")))
        x = jax.ShapeDtypeStruct((n * LOCAL_BATCH, LOCAL_DIM), jnp.float32)
        analysis = jax.jit(run).lower(x, x).compile().memory_analysis()
        out[f"temp_mib_n{n}"] = analysis.temp_size_in_bytes / 2**20
    return out


def measure(case: str) -> dict:
    group, impl = case.split("/")
    if group == "memory":
        return _memory_case(impl)
    return _time_case(group, impl)


def _paired_ratio(by_case, loss, baseline):
    ours = by_case[f"{loss}/lossjax"].get("runs", [])
    base = by_case[f"{loss}/{baseline}"].get("runs", [])
    ratios = [o["time_ms"] / b["time_ms"] for o, b in zip(ours, base, strict=False)
              if "time_ms" in o and "time_ms" in b]
    return statistics.median(ratios) if ratios else None


def _tables(results) -> str:
    by_case = {r["case"]: r for r in results}
    rows = []
    for loss, baseline in (("clip", "jnp"), ("ntxent", "optax"),
                           ("ntxent1024", "optax")):
        if f"{loss}/lossjax" not in by_case or f"{loss}/{baseline}" not in by_case:
            continue
        rows.append({
            "loss": loss.replace("1024", ""),
            "batch": 1024 if loss.endswith("1024") else BATCH,
            "lossjax ms": by_case[f"{loss}/lossjax"].get("time_ms"),
            "baseline": baseline,
            "baseline ms": by_case[f"{loss}/{baseline}"].get(
                "time_ms", by_case[f"{loss}/{baseline}"].get("error", "")[:60]),
            "ratio (paired median)": _paired_ratio(by_case, loss, baseline),
            "device": by_case[f"{loss}/lossjax"].get("device"),
        })
    out = []
    if rows:
        out.append(common.markdown_table(rows, list(rows[0])))
    mem = [dict(impl=r["case"].split("/")[1], **{
        f"{n} dev": r.get(f"temp_mib_n{n}") for n in DEVICE_COUNTS})
        for r in results if r["case"].startswith("memory/")]
    if mem:
        out.append("Per-device XLA temp MiB, loss + grad, local batch 512, dim 256:\n"
                   + common.markdown_table(mem, list(mem[0])))
    return "\n\n".join(out)


if __name__ == "__main__":
    results = common.main("benchmarks.contrastive", CASES, measure, interleave=True)
    if results is not None:
        print(_tables(results))
