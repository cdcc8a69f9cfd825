"""Tests for lossjax._reduce: the one implementation of where / weights / reduction."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

import lossjax
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
        f = lambda values, w, r=reduction: jnp.sum(reduce_loss(
            values, kept=jnp.asarray(kept), weights=w, reduction=r))
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
        def f(values, *ws, kw=kw):
            named = dict(zip(kw, ws, strict=True))
            return jnp.sum(reduce_loss(values, kept=kept, reduction=reduction, **named))
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


# --- sum_and_weight, axis_name and global_sum -------------------------------------


def test_sum_and_weight_is_what_mean_divides():
    loss, kept, weights, norm = _data(5)
    w = np.where(kept, weights, 0.0)
    args = {"kept": jnp.asarray(kept), "weights": jnp.asarray(weights, jnp.float32)}
    total, weight = reduce_loss(jnp.asarray(loss, jnp.float32),
                                reduction="sum_and_weight",
                                **args)
    np.testing.assert_allclose(total, (w * loss).sum(), rtol=1e-5)
    np.testing.assert_allclose(weight, w.sum(), rtol=1e-5)
    total, weight = reduce_loss(jnp.asarray(loss, jnp.float32),
                                reduction="sum_and_weight",
                                normalizer=jnp.asarray(norm, jnp.float32), **args)
    np.testing.assert_allclose(weight, np.where(kept, norm, 0).sum(), rtol=1e-5)
    # Without weights or mask the weight is the entry count.
    _, count = reduce_loss(jnp.asarray(loss, jnp.float32), reduction="sum_and_weight")
    assert count == loss.size


def _softmax_ce_grad_np(x, theta, labels, kept, class_weights):
    """float64 NumPy: the class-weighted mean cross-entropy of x @ theta and its
    gradient w.r.t. theta, over the kept tokens."""
    logits = x @ theta
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    w = np.where(kept, class_weights[np.where(kept, labels, 0)], 0.0)
    onehot = np.eye(theta.shape[1])[np.where(kept, labels, 0)]
    nll = -np.log((p * onehot).sum(-1))
    return (w * nll).sum() / w.sum(), x.T @ ((p - onehot) * w[:, None]) / w.sum()


def test_micro_batch_accumulation_equals_the_full_batch_mean():
    """The recipe of the README: sum (loss sum, weight) over micro-batches whose masks
    differ (one keeps nothing), then divide once: the full batch's mean and gradient."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(24, 5)).astype(np.float32)
    theta = rng.normal(size=(5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 24).astype(np.int32)
    labels[rng.random(24) < 0.3] = -100  # padding
    labels[:6] = -100  # the first micro-batch keeps nothing
    class_weights = rng.uniform(0.5, 2.0, 7).astype(np.float32)

    def micro(theta, xb, yb):
        return lossjax.cross_entropy(xb @ theta, yb, class_weights=class_weights,
                                     reduction="sum_and_weight")

    grad_total = jax.jit(jax.grad(lambda t, xb, yb: micro(t, xb, yb)[0]))
    total, weight, grads = 0.0, 0.0, np.zeros_like(theta)
    for k in range(4):  # uneven: 6 tokens each, different numbers kept
        xb, yb = x[6 * k: 6 * (k + 1)], labels[6 * k: 6 * (k + 1)]
        t, w = micro(theta, xb, yb)
        total, weight = total + t, weight + w
        grads = grads + grad_total(theta, xb, yb)
    want_loss, want_grad = _softmax_ce_grad_np(
        x.astype(np.float64), theta.astype(np.float64), labels, labels != -100,
        class_weights.astype(np.float64))
    np.testing.assert_allclose(total / weight, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grads / weight, want_grad, rtol=1e-4, atol=1e-6)
    # A mean of per-micro-batch means weights micro-batches equally, not tokens.
    means = [float(lossjax.cross_entropy(x[6 * k: 6 * (k + 1)] @ theta,
                                         labels[6 * k: 6 * (k + 1)],
                                         class_weights=class_weights))
             for k in range(4)]
    assert abs(np.mean(means) - want_loss) > 1e-3


def _mesh(shape=(8,), names=("d",)):
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(shape, names, axis_types=auto)


def test_global_sum_value_and_gradient_are_exact_under_pmap_and_shard_map():
    from jax.sharding import PartitionSpec as P

    x = np.random.default_rng(7).normal(size=(8, 3)).astype(np.float32)

    def f(x):
        return _reduce.global_sum(jnp.sum(x**2), "d")

    # pmap: plain lax.psum would give 8 * 2x here.
    value, grad = jax.pmap(jax.value_and_grad(f), axis_name="d")(x)
    np.testing.assert_allclose(value, np.full(8, (x**2).sum()), rtol=1e-5)
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-6)
    for check_vma in (True, False):
        value, grad = jax.jit(jax.shard_map(
            jax.value_and_grad(f), mesh=_mesh(), in_specs=P("d"),
            out_specs=(P(), P("d")), check_vma=check_vma))(x)
        np.testing.assert_allclose(value, (x**2).sum(), rtol=1e-5)
        np.testing.assert_allclose(grad, 2 * x, rtol=1e-6, err_msg=f"{check_vma=}")
    # A tuple of axes on a 2-D mesh: the sum over both.
    def g(x):
        return _reduce.global_sum(jnp.sum(x**3), ("a", "b"))

    value, grad = jax.jit(jax.shard_map(
        jax.value_and_grad(g), mesh=_mesh((2, 4), ("a", "b")),
        in_specs=P(("a", "b")), out_specs=(P(), P(("a", "b")))))(x)
    np.testing.assert_allclose(value, (x**3).sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, 3 * x**2, rtol=1e-6)
    assert _reduce.global_sum(jnp.float32(2.0), None) == 2.0


@pytest.mark.parametrize("reduction", ("sum", "mean", "sum_and_weight"))
def test_reduce_loss_over_a_batch_axis_is_the_global_reduction(reduction):
    from jax.sharding import PartitionSpec as P

    loss, kept, weights, _ = _data(8, shape=(16, 3))
    kept[:2] = False  # the first device keeps nothing
    args = [jnp.asarray(loss, jnp.float32), jnp.asarray(kept),
            jnp.asarray(weights, jnp.float32)]

    def f(loss, kept, weights, axis_name=None):
        return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                           axis_name=axis_name)

    want = f(*args)
    out_spec = (P(), P()) if reduction == "sum_and_weight" else P()
    got = jax.jit(jax.shard_map(functools.partial(f, axis_name="d"), mesh=_mesh(),
                                in_specs=P("d"), out_specs=out_spec))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    w = np.where(kept, weights, 0.0)
    if reduction == "mean":
        np.testing.assert_allclose(got, (w * loss).sum() / w.sum(), rtol=1e-5)
        # What a per-device mean then pmean gives instead: devices weighted equally.
        # The first device keeps nothing, so its mean is 0.
        per_device = [0.0] + [(w[i:i + 2] * loss[i:i + 2]).sum() / w[i:i + 2].sum()
                              for i in range(2, 16, 2)]
        assert abs(np.mean(per_device) - float(got)) > 1e-3
