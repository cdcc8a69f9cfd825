"""Tests for lossjax._reduce: the one implementation of where / weights / reduction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from lossjax import _reduce
from lossjax._reduce import compute_dtype, kept_mask, reduce_loss, sanitize

REDUCTIONS = ("none", "sum", "mean")


def _data(seed=0, shape=(4, 3)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape), rng.random(shape) < 0.6,
            rng.uniform(0.5, 2.0, shape), rng.uniform(0.5, 2.0, shape))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_match_plain_numpy(reduction):
    loss, kept, weights, norm = _data()
    with jax.enable_x64(True):
        for kw in ({}, {"kept": kept}, {"weights": weights},
                   {"kept": kept, "weights": weights},
                   {"kept": kept, "weights": weights, "normalizer": norm}):
            got = reduce_loss(jnp.asarray(loss), reduction=reduction,
                              **{k: jnp.asarray(v) for k, v in kw.items()})
            want = ref.reduce(loss, reduction=reduction, **kw)
            np.testing.assert_allclose(got, want, rtol=1e-12)
    # Spelled out once, independently of references.reduce.
    w = np.where(kept, weights, 0.0)
    got = reduce_loss(jnp.asarray(loss, jnp.float32), kept=jnp.asarray(kept),
                      weights=jnp.asarray(weights, jnp.float32), reduction=reduction)
    want = {"none": w * loss, "sum": (w * loss).sum(),
            "mean": (w * loss).sum() / w.sum()}[reduction]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_normalizer_is_the_mean_denominator_only():
    loss, kept, weights, norm = _data(1)
    args = {"kept": jnp.asarray(kept), "weights": jnp.asarray(weights, jnp.float32)}
    with_norm = {**args, "normalizer": jnp.asarray(norm, jnp.float32)}
    for reduction in ("none", "sum"):
        np.testing.assert_array_equal(
            reduce_loss(jnp.asarray(loss, jnp.float32), reduction=reduction, **args),
            reduce_loss(jnp.asarray(loss, jnp.float32), reduction=reduction,
                        **with_norm))
    got = reduce_loss(jnp.asarray(loss, jnp.float32), **with_norm)
    want = (np.where(kept, weights * loss, 0)).sum() / np.where(kept, norm, 0).sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A normalizer without weights: plain sum over the kept entries, divided by it.
    got = reduce_loss(jnp.asarray(loss, jnp.float32), kept=jnp.asarray(kept),
                      normalizer=jnp.asarray(norm, jnp.float32))
    want = np.where(kept, loss, 0).sum() / np.where(kept, norm, 0).sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_excluded_entries_are_zero_even_when_nan():
    loss, kept, weights, _ = _data(2)
    loss = np.where(kept, loss, np.nan)
    weights = np.where(kept, weights, np.inf)  # an excluded weight may be bad too
    for reduction in REDUCTIONS:
        f = lambda l, w, r=reduction: jnp.sum(reduce_loss(
            l, kept=jnp.asarray(kept), weights=w, reduction=r))
        args = (jnp.asarray(loss, jnp.float32), jnp.asarray(weights, jnp.float32))
        assert np.isfinite(f(*args))
        gl, gw = jax.grad(f, argnums=(0, 1))(*args)
        np.testing.assert_array_equal(np.asarray(gl)[~kept], 0.0)
        np.testing.assert_array_equal(np.asarray(gw)[~kept], 0.0)
        assert np.all(np.isfinite(gl)) and np.all(np.isfinite(gw))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nothing_kept_gives_zero_with_zero_finite_grads(reduction):
    loss, _, weights, norm = _data(3)
    kept = jnp.zeros(loss.shape, bool)
    for kw in ({}, {"weights": weights}, {"weights": weights, "normalizer": norm}):
        def f(l, *ws, kw=kw):
            named = dict(zip(kw, ws))
            return jnp.sum(reduce_loss(l, kept=kept, reduction=reduction, **named))
        args = [jnp.asarray(loss, jnp.float32)] + [jnp.asarray(v, jnp.float32)
                                                   for v in kw.values()]
        assert f(*args) == 0.0
        for g in jax.grad(f, argnums=tuple(range(len(args))))(*args):
            np.testing.assert_array_equal(g, np.zeros_like(g))


def test_mean_of_an_empty_loss_is_zero():
    assert reduce_loss(jnp.zeros((0, 3))) == 0.0
    assert reduce_loss(jnp.zeros((0,)), reduction="sum") == 0.0


def test_result_dtype_is_the_loss_dtype():
    loss, kept, weights, _ = _data(4)
    for reduction in REDUCTIONS:
        out = reduce_loss(jnp.asarray(loss, jnp.float32), kept=jnp.asarray(kept),
                          weights=jnp.asarray(weights, jnp.bfloat16),
                          reduction=reduction)
        assert out.dtype == jnp.float32
    with jax.enable_x64(True):
        out = reduce_loss(jnp.asarray(loss), weights=jnp.asarray(weights, jnp.float32))
        assert out.dtype == jnp.float64


def test_bad_reduction_raises_naming_the_valid_values():
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'sum', "
                                         r"'mean', 'sum_and_weight'\), got 'avg'"):
        reduce_loss(jnp.zeros(3), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        _reduce.check_reduction("batchmean")
    _reduce.check_reduction("mean")  # valid: no error


def test_broadcast_errors_name_the_argument_and_shapes():
    with pytest.raises(ValueError, match=r"weights of shape \(2,\) does not broadcast "
                                         r"to the loss shape \(4, 3\)"):
        reduce_loss(jnp.zeros((4, 3)), weights=jnp.ones(2))
    # Broadcastable to, not merely compatible with: a weight may not grow the loss.
    with pytest.raises(ValueError, match=r"weights of shape \(2, 4, 3\)"):
        reduce_loss(jnp.zeros((4, 3)), weights=jnp.ones((2, 4, 3)))
    with pytest.raises(TypeError, match="weights must have a floating dtype"):
        reduce_loss(jnp.zeros((4, 3)), weights=jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"where of shape \(3, 1\) does not broadcast "
                                         r"to the loss shape \(4, 3\)"):
        kept_mask((4, 3), where=jnp.ones((3, 1), bool))
    with pytest.raises(TypeError, match="where must be a boolean array"):
        kept_mask((4, 3), where=jnp.ones((4, 3)))


def test_weights_and_where_broadcast():
    loss = jnp.arange(12.0).reshape(4, 3)
    got = reduce_loss(loss, weights=jnp.array([1.0, 2.0, 3.0]), reduction="none")
    np.testing.assert_array_equal(got, loss * jnp.array([1.0, 2.0, 3.0]))
    kept = kept_mask((4, 3), where=jnp.array([[True], [False], [True], [False]]))
    assert kept.shape == (4, 3)
    np.testing.assert_allclose(reduce_loss(loss, kept=kept),
                               (0 + 1 + 2 + 6 + 7 + 8) / 6, rtol=1e-6)


def test_kept_mask_combines_where_and_ignore_index():
    labels = jnp.array([0, -100, 2, 1])
    assert kept_mask((4,)) is None
    np.testing.assert_array_equal(
        kept_mask((4,), labels=labels, ignore_index=-100), [True, False, True, True])
    np.testing.assert_array_equal(
        kept_mask((4,), where=jnp.array([True, True, False, True]), labels=labels,
                  ignore_index=-100), [True, False, False, True])
    assert kept_mask((4,), labels=labels, ignore_index=None) is None


def test_sanitize_replaces_excluded_inputs_before_the_math():
    x = jnp.array([[1.0, jnp.nan], [jnp.inf, 2.0]])
    kept = jnp.array([[True, False], [False, True]])
    np.testing.assert_array_equal(sanitize(x, kept, 0.5), [[1.0, 0.5], [0.5, 2.0]])
    # With a class axis: `kept` lacks it and covers the whole row.
    rows = jnp.array([True, False])
    np.testing.assert_array_equal(sanitize(x, rows, 0, axis=-1), [[1.0, np.nan],
                                                                  [0.0, 0.0]])
    assert sanitize(x, None) is x
    # The gradient through an excluded entry is 0, not NaN.
    g = jax.grad(lambda x: jnp.sum(jnp.log(sanitize(x, kept, 1.0))))(
        jnp.array([[1.0, -1.0], [-2.0, 2.0]]))
    np.testing.assert_array_equal(g, [[1.0, 0.0], [0.0, 0.5]])


def test_compute_dtype_is_at_least_float32():
    assert compute_dtype(jnp.zeros(2, jnp.bfloat16)) == jnp.float32
    assert compute_dtype(jnp.zeros(2, jnp.float16), jnp.zeros(2, jnp.int32)) == (
        jnp.float32)
    assert compute_dtype(None, jnp.zeros(2, jnp.int8)) == jnp.float32
    with jax.enable_x64(True):
        assert compute_dtype(jnp.zeros(2, jnp.bfloat16),
                             jnp.zeros(2, jnp.float64)) == jnp.float64
