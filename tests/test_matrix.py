"""The cross-device matrix: every registered loss, exact on 8 devices as on one.

Driven by the registry: each family's test module lists `MATRIX_CASES` (see
`loss_cases.MatrixCase`), and a registered loss without a case fails
`test_every_registered_loss_has_a_case`. For each case, on the 8 fake CPU devices of
conftest.py, with a global batch of 16 (2 entries per device), different data on every
shard and a `where` and `weights` that differ per shard (the first shard keeps nothing):

- shard_map with the batch sharded over "data" and `axis_name="data"`;
- pmap over the same 8 devices with `axis_name`;
- jit on batch-sharded inputs (no `axis_name`: GSPMD partitions the global call);

each give, for "none", "sum", "mean" and "sum_and_weight", the single-device values on
the global batch, and the gradients w.r.t. every float input (data, weights, batch-
sharded and replicated keyword arrays): each device's slice of the global gradient
for what it holds; for a replicated input the global gradient (shard_map sums it over
the devices itself; under pmap `lax.psum(grads, axis_name)`, as `reduce_loss`'s
docstring states). Checked mode returns the same values with the case's keywords and
catches a NaN in a kept entry; every `traced` hyperparameter works as a traced array
under jit and has the finite-difference gradient.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_classification
import test_contrastive
import test_distillation
import test_divergence
import test_large_vocab
import test_pairwise
import test_preference
import test_regression
import test_sequence
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lossjax

REDUCTIONS = ("none", "sum", "mean", "sum_and_weight")
DEVICES = 8
BATCH = 16  # two entries per device
_FAMILIES = (
    test_classification,
    test_regression,
    test_divergence,
    test_sequence,
    test_large_vocab,
    test_contrastive,
    test_pairwise,
    test_preference,
    test_distillation,
)
CASES = [case for family in _FAMILIES for case in getattr(family, "MATRIX_CASES", ())]
_IDS = [case.label for case in CASES]


def test_every_registered_loss_has_a_case():
    missing = sorted(set(lossjax.LOSSES) - {case.name for case in CASES})
    assert not missing, f"registered losses with no MatrixCase: {missing}"
    assert len(set(_IDS)) == len(_IDS), "two cases share a label"


# --- one case's inputs, as a flat dict of named arrays --------------------------------


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _by_label(fn):
    """Caches `fn(case)` per case label (a case holds dicts, so it is not hashable)."""
    cache = {}

    @functools.wraps(fn)
    def cached(case):
        if case.label not in cache:
            cache[case.label] = fn(case)
        return cache[case.label]

    return cached


@_by_label
def _inputs(case):
    """(inputs, sharded): every array the loss takes, keyed "arg{i}" for positional
    and "kw:{name}" for keyword arrays, and which of them are sharded on the batch."""
    rng = np.random.default_rng(zlib.crc32(case.label.encode()))
    data = case.data(rng, BATCH)
    batch_kw = case.batch_kwargs(rng, BATCH) if case.batch_kwargs else {}
    replicated_kw = case.replicated_kwargs(rng) if case.replicated_kwargs else {}
    inputs = {f"arg{i}": np.asarray(a) for i, a in enumerate(data)}
    inputs.update({f"kw:{k}": np.asarray(v) for k, v in batch_kw.items()})
    inputs.update({f"kw:{k}": np.asarray(v) for k, v in replicated_kw.items()})
    sharded = {f"arg{i}" for i in range(len(data)) if i not in case.replicated}
    sharded |= {f"kw:{k}" for k in batch_kw}
    shape = jax.eval_shape(lambda: _call(case, inputs, "none")).shape
    assert shape and shape[0] == BATCH, f"loss shape {shape} is not batch-first"
    where = rng.random(shape) < 0.7
    where[: BATCH // DEVICES] = False  # the first shard keeps nothing
    inputs["kw:where"] = where
    inputs["kw:weights"] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    inputs["cotangent"] = rng.normal(size=shape).astype(np.float32)
    sharded |= {"kw:where", "kw:weights", "cotangent"}
    return inputs, frozenset(sharded)


def _call(case, inputs, reduction, axis_name=None, fn=None, **hyper):
    n = sum(k.startswith("arg") for k in inputs)
    args = [inputs[f"arg{i}"] for i in range(n)]
    kw = {k[3:]: v for k, v in inputs.items() if k.startswith("kw:")}
    fn = fn or lossjax.get(case.name)
    return fn(
        *args,
        **{**case.kwargs, **hyper},
        **kw,
        reduction=reduction,
        axis_name=axis_name,
    )


def _scalar(reduction, out, cotangent):
    """A scalar whose gradient exercises the reduction's whole output."""
    if reduction == "none":
        return jnp.sum(out * cotangent)
    if reduction == "sum_and_weight":
        return out[0] - 0.3 * out[1]
    return out


def _losses_and_grads(case, inputs, axis_name=None):
    """{reduction: (value, grads w.r.t. every float input)}."""
    floats = {k: v for k, v in inputs.items() if _is_float(v) and k != "cotangent"}
    rest = {k: v for k, v in inputs.items() if k not in floats}

    def one(reduction):
        def f(fl):
            out = _call(case, {**fl, **rest}, reduction, axis_name)
            return _scalar(reduction, out, rest["cotangent"]), out

        (_, out), grads = jax.value_and_grad(f, has_aux=True)(floats)
        return out, grads

    return {r: one(r) for r in REDUCTIONS}


@_by_label
def _single_device(case):
    inputs, _ = _inputs(case)
    return jax.device_get(jax.jit(functools.partial(_losses_and_grads, case))(inputs))


def _assert_close(case, got, want, what):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = functools.reduce(
            lambda t, k: t[k.key if hasattr(k, "key") else k.idx], path, want
        )
        np.testing.assert_allclose(
            np.asarray(g, np.float64),
            np.asarray(w, np.float64),
            rtol=case.rtol,
            atol=case.atol,
            err_msg=f"{case.label}: {what} {jax.tree_util.keystr(path)}",
        )


def _mesh():
    return jax.make_mesh(
        (DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )


# --- the matrix -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_shard_map_equals_one_device(case):
    inputs, sharded = _inputs(case)
    specs = {k: P("data") if k in sharded else P() for k in inputs}
    float_specs = {
        k: s for k, s in specs.items() if _is_float(inputs[k]) and k != "cotangent"
    }
    out_specs = {
        "none": (P("data"), float_specs),
        "sum": (P(), float_specs),
        "mean": (P(), float_specs),
        "sum_and_weight": ((P(), P()), float_specs),
    }
    run = jax.shard_map(
        functools.partial(_losses_and_grads, case, axis_name="data"),
        mesh=_mesh(),
        in_specs=(specs,),
        out_specs=out_specs,
    )
    got = jax.device_get(jax.jit(run)(inputs))
    _assert_close(case, got, _single_device(case), "shard_map")


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_pmap_equals_one_device(case):
    inputs, sharded = _inputs(case)
    per_device = {
        k: (v.reshape(DEVICES, -1, *v.shape[1:]) if k in sharded else v)
        for k, v in inputs.items()
    }
    in_axes = {k: 0 if k in sharded else None for k in inputs}

    def step(x):
        out = _losses_and_grads(case, x, axis_name="data")
        # Each device holds its share of a replicated input's gradient.
        return {
            r: (
                v,
                {
                    k: g if k in sharded else jax.lax.psum(g, "data")
                    for k, g in grads.items()
                },
            )
            for r, (v, grads) in out.items()
        }

    got = jax.device_get(
        jax.pmap(step, axis_name="data", in_axes=(in_axes,))(per_device)
    )
    want = _single_device(case)
    for r in REDUCTIONS:
        value, grads = got[r]
        if r == "none":
            value = value.reshape(-1, *value.shape[2:])
        else:  # the global value, on every device
            for d in range(DEVICES):
                _assert_close(
                    case,
                    jax.tree.map(lambda v, d=d: v[d], value),
                    want[r][0],
                    f"pmap {r} value on device {d}",
                )
            value = jax.tree.map(lambda v: v[0], value)
        grads = {
            k: (g.reshape(-1, *g.shape[2:]) if k in sharded else g[DEVICES - 1])
            for k, g in grads.items()
        }
        _assert_close(case, (value, grads), want[r], f"pmap {r}")


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_jit_on_batch_sharded_inputs_equals_one_device(case):
    inputs, sharded = _inputs(case)
    mesh = _mesh()
    placed = {
        k: jax.device_put(v, NamedSharding(mesh, P("data") if k in sharded else P()))
        for k, v in inputs.items()
    }
    got = jax.device_get(jax.jit(functools.partial(_losses_and_grads, case))(placed))
    _assert_close(case, got, _single_device(case), "batch-sharded jit")


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_checked_mode_with_the_case_keywords(case):
    inputs, _ = _inputs(case)
    inputs = {k: v for k, v in inputs.items() if k != "cotangent"}
    fn = lossjax.checked(lossjax.get(case.name))
    want = _single_device(case)
    for r in REDUCTIONS:
        got = _call(case, inputs, r, fn=fn)
        _assert_close(case, jax.device_get(got), want[r][0], f"checked {r}")
    # A NaN in a kept entry of the first data argument is caught, naming the loss.
    where = inputs["kw:where"]
    index = tuple(np.argwhere(where)[0])
    bad = np.array(inputs["arg0"], copy=True)
    if not _is_float(bad):
        return  # integer first argument: the families test their own label rules
    bad[index + (0,) * (bad.ndim - len(index))] = np.nan
    with pytest.raises(AssertionError, match=f"lossjax.{case.name}"):
        _call(case, {**inputs, "arg0": bad}, "mean", fn=fn)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.traced], ids=[c.label for c in CASES if c.traced]
)
def test_traced_hyperparameters_under_jit_and_grad(case):
    inputs, _ = _inputs(case)
    inputs = {k: v for k, v in inputs.items() if k != "cotangent"}
    for name, value in case.traced.items():
        eager = _call(case, inputs, "mean", **{name: value})
        traced = jax.jit(lambda h, name=name: _call(case, inputs, "mean", **{name: h}))
        np.testing.assert_allclose(
            traced(jnp.float32(value)),
            eager,
            rtol=1e-6,
            atol=1e-7,
            err_msg=f"{case.label}: traced {name}",
        )
        with jax.enable_x64(True):
            wide = {
                k: (np.asarray(v, np.float64) if _is_float(v) else v)
                for k, v in inputs.items()
            }

            def loss(h, name=name, wide=wide):
                return _call(case, wide, "mean", **{name: h})

            h = jnp.float64(value)
            grad = jax.grad(loss)(h)
            eps = 1e-6 * max(1.0, abs(value))
            fd = (loss(h + eps) - loss(h - eps)) / (2 * eps)
            assert np.isfinite(grad), f"{case.label}: d/d{name} is {grad}"
            np.testing.assert_allclose(
                grad, fd, rtol=1e-5, atol=1e-7, err_msg=f"{case.label}: d/d{name}"
            )
