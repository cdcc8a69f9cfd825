"""Tests for lossjax.regression: one table of cases, every contract rule over the table.

Each case is (loss, keyword options, NumPy reference, torch counterpart or None, input
maker). The generic tests run over the whole table; the classes at the end hold what
is specific to one loss (gaussian_nll's variance shapes and clamp, identities, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref
import torch
import torch.nn.functional as F
from absl.testing import parameterized
from jax.test_util import check_grads
from loss_cases import MatrixCase
from loss_cases import check_shard_map as _check_shard_map
from loss_cases import evaluate as _evaluate
from loss_cases import jit_case as _jit

import lossjax
from lossjax import regression as R

REDUCTIONS = ("none", "sum", "mean")


# --- input makers: (rng, shape) -> tuple of float64 NumPy data arguments -------------


def _normal(rng, shape):
    return rng.normal(0, 2, shape), rng.normal(0, 2, shape)


def _away_from_zero(rng, shape):
    t = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)
    return rng.normal(0, 2, shape), t


def _log_rates(rng, shape):
    return rng.normal(0, 1, shape), rng.poisson(2.0, shape).astype(np.float64)


def _rates(rng, shape):
    return rng.uniform(0.1, 3.0, shape), rng.poisson(2.0, shape).astype(np.float64)


def _gauss(rng, shape):
    return rng.normal(0, 2, shape), rng.normal(0, 2, shape), rng.uniform(0.1, 2, shape)


def _signs(rng, shape):
    return rng.choice([-1.0, 1.0], shape)


def _big(rng, shape):
    return 1e4 * _signs(rng, shape), -1e4 * _signs(rng, shape)


def _big_counts(rng, shape):
    # Log-rates of -1e4 (exp underflows to 0); +1e4 overflows, see TestPoisson.
    return np.full(shape, -1e4), 1e4 * rng.poisson(2.0, shape)


def _big_rates(rng, shape):
    return np.full(shape, 1e4), 1e4 * rng.poisson(2.0, shape)


def _big_gauss(rng, shape):
    p, t = _big(rng, shape)
    return p, t, np.where(rng.random(shape) < 0.5, 1e4, 1e-8)


# --- torch counterparts: (*tensors, reduction) -> tensor ------------------------------


def _torch_reduce(loss, reduction):
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


def _torch(fn, **kw):
    return lambda *a, reduction: fn(*a, reduction=reduction, **kw)


def _torch_cosine(axis=-1, eps=1e-8):
    def f(p, t, reduction):
        return _torch_reduce(1 - F.cosine_similarity(p, t, dim=axis, eps=eps),
                             reduction)
    return f


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fn: Callable
    kwargs: dict
    ref: Callable
    torch: Callable | None
    make: Callable = _normal
    big: Callable = _big
    axis: int | None = None  # the vector axis, absent from the loss shape
    grad_args: tuple[int, ...] = (0, 1)

    def __repr__(self):
        return self.id

    def loss_shape(self, shape):
        if self.axis is None:
            return tuple(shape)
        return tuple(np.delete(np.array(shape), self.axis))

    def __call__(self, *data, **kw):
        return self.fn(*(jnp.asarray(x) for x in data), **self.kwargs, **kw)

    def reference(self, *data):
        return self.ref(*data, **self.kwargs)


CASES = [
    Case("squared_error", R.squared_error, {}, ref.squared_error,
         _torch(F.mse_loss)),
    Case("absolute_error", R.absolute_error, {}, ref.absolute_error,
         _torch(F.l1_loss)),
    Case("huber_loss_d2.5", R.huber_loss, {"delta": 2.5}, ref.huber_loss,
         _torch(F.huber_loss, delta=2.5)),
    Case("smooth_l1_loss_b0.3", R.smooth_l1_loss, {"beta": 0.3}, ref.smooth_l1_loss,
         _torch(F.smooth_l1_loss, beta=0.3)),
    Case("log_cosh", R.log_cosh, {}, ref.log_cosh, None),
    Case("poisson_nll_full", R.poisson_nll, {"full": True}, ref.poisson_nll,
         _torch(F.poisson_nll_loss, full=True), _log_rates, _big_counts,
         grad_args=(0,)),
    Case("poisson_nll_rates_full", R.poisson_nll, {"log_input": False, "full": True},
         ref.poisson_nll, _torch(F.poisson_nll_loss, log_input=False, full=True),
         _rates, _big_rates, grad_args=(0,)),
    Case("gaussian_nll_full", R.gaussian_nll, {"full": True, "eps": 0.05},
         ref.gaussian_nll, _torch(F.gaussian_nll_loss, full=True, eps=0.05), _gauss,
         _big_gauss, grad_args=(0, 1, 2)),
    Case("quantile_loss_q0.9", R.quantile_loss, {"quantile": 0.9}, ref.quantile_loss,
         None),
    Case("mape", R.mean_absolute_percentage_error, {},
         ref.mean_absolute_percentage_error, None, _away_from_zero),
    Case("squared_log_error", R.squared_log_error, {}, ref.squared_log_error, None),
    Case("cosine", R.cosine_similarity_loss, {}, ref.cosine_similarity_loss,
         _torch_cosine(), axis=-1),
    Case("cosine_axis0", R.cosine_similarity_loss, {"axis": 0, "eps": 1e-3},
         ref.cosine_similarity_loss, _torch_cosine(axis=0, eps=1e-3), axis=0),
]
TORCH_CASES = [c for c in CASES if c.torch is not None]
# One case per loss function, for the rules that do not depend on options.
FIRST_CASES = list({c.fn: c for c in reversed(CASES)}.values())[::-1]


def _data(case, shape, seed=0):
    return case.make(np.random.default_rng(seed), shape)


def _f32(data):
    return [np.asarray(x, np.float32) for x in data]


def _batch_axes(case):
    """(data axis, loss axis) of a batch axis that is not the vector axis."""
    return (1, 0) if case.axis == 0 else (0, 0)


# Eager op-by-op dispatch compiles every primitive for every new shape, so the tests
# jit whole computations (`_evaluate`, cached per case so that tests with the same
# shapes share executables); the eager runs (VariantsTest) share one shape.
SHAPE = (5, 3)
EAGER_SHAPE = (3, 5, 2)


def _shape(case, shape=SHAPE):
    return shape[::-1] if case.axis == 0 else shape


def _all_kept(case, shape=SHAPE):
    """where= and weights= that change nothing (float32 tests pass both, see above)."""
    lshape = case.loss_shape(_shape(case, shape))
    return {"where": np.ones(lshape, bool), "weights": np.ones(lshape, np.float32)}


# --- generic tests over the table -----------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_values_match_reference(case):
    rng = np.random.default_rng(1)
    data = _data(case, _shape(case))
    lshape = case.loss_shape(_shape(case))
    where = rng.random(lshape) < 0.7
    weights = rng.uniform(0.5, 2.0, lshape)
    expected_entry = case.reference(*data)
    with jax.enable_x64(True):
        for kw in ({}, {"where": where, "weights": weights}):
            out, _ = _evaluate(case)([jnp.asarray(x) for x in data],
                                     **{k: jnp.asarray(v) for k, v in kw.items()})
            for reduction in REDUCTIONS:
                want = ref.reduce(expected_entry, kept=kw.get("where"),
                                  weights=kw.get("weights"), reduction=reduction)
                np.testing.assert_allclose(out[reduction], want, rtol=1e-10,
                                           atol=1e-12)
                assert out[reduction].dtype == jnp.float64


@pytest.mark.parametrize("shape", [SHAPE, (2, 3, 4)], ids=str)
@pytest.mark.parametrize("case", TORCH_CASES, ids=repr)
def test_matches_torch(case, shape):
    data = _data(case, _shape(case, shape), seed=2)
    with jax.enable_x64(True):
        out, grads = _evaluate(case)([jnp.asarray(x) for x in data])
    tensors = [torch.tensor(x, requires_grad=True) for x in data]
    for reduction in REDUCTIONS:
        want = case.torch(*tensors, reduction=reduction)
        np.testing.assert_allclose(out[reduction], want.detach().numpy(),
                                   rtol=1e-10, atol=1e-12)
    # Gradients of the mean (`want`). torch's target gradient of poisson_nll with
    # full=True is NaN at target 0 (ours is finite): compare w.r.t. case.grad_args.
    want.backward()
    for i in case.grad_args:
        np.testing.assert_allclose(grads[i], tensors[i].grad.numpy(), rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vmap_equals_batched_call(case):
    # (jit == eager: VariantsTest runs both against the reference.)
    data = [x.astype(np.float32) for x in _data(case, EAGER_SHAPE)]
    batched = _jit(case, reduction="none")(*data)
    data_axis, loss_axis = _batch_axes(case)
    vmapped = jax.jit(jax.vmap(
        lambda *a: {r: case.fn(*a, **case.kwargs, reduction=r) for r in REDUCTIONS},
        in_axes=data_axis))
    out = vmapped(*data)
    np.testing.assert_allclose(out["none"], jnp.moveaxis(batched, loss_axis, 0),
                               rtol=1e-6)
    n = batched.shape[loss_axis]
    per_row = jnp.moveaxis(batched, loss_axis, 0).reshape(n, -1)
    np.testing.assert_allclose(out["sum"], per_row.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(out["mean"], per_row.mean(-1), rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_check_grads_float64(case):
    data = _data(case, (2, 3), seed=3)
    weights = np.random.default_rng(4).uniform(0.5, 2, case.loss_shape((2, 3)))
    with jax.enable_x64(True):
        data = [jnp.asarray(x) for x in data]
        fixed = {i: x for i, x in enumerate(data) if i not in case.grad_args}

        @jax.jit
        def f(*args):
            full = list(args)
            for i in sorted(fixed):
                full.insert(i, fixed[i])
            return case.fn(*full, **case.kwargs, weights=jnp.asarray(weights))

        check_grads(f, [data[i] for i in case.grad_args], order=1, modes=["rev"])


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_finite_at_1e4(case):
    data = [jnp.asarray(x, jnp.float32)
            for x in case.big(np.random.default_rng(5), _shape(case))]
    out, grads = _evaluate(case)(data, **_all_kept(case))
    for reduction in REDUCTIONS:
        assert np.all(np.isfinite(out[reduction]))
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fully_masked_is_zero_with_zero_grads(case):
    data = [jnp.full(x.shape, v, jnp.float32)
            for x, v in zip(_data(case, _shape(case)), (np.nan, np.inf, -np.inf),
                            strict=False)]
    where = jnp.zeros(case.loss_shape(_shape(case)), bool)
    out, grads = _evaluate(case)(data, where=where, weights=_all_kept(case)["weights"])
    for x in jax.tree.leaves((out, grads)):
        np.testing.assert_array_equal(x, np.zeros_like(x))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_where_equals_slicing(case):
    rng = np.random.default_rng(6)
    data = [x.astype(np.float32) for x in _data(case, _shape(case))]
    data_axis, loss_axis = _batch_axes(case)
    keep = np.array([True, False, True, True, False])
    lshape = case.loss_shape(_shape(case))
    where = keep.reshape([-1 if i == loss_axis else 1 for i in range(len(lshape))])
    poisoned = []
    for x, bad in zip(data, (np.nan, np.inf, np.nan), strict=False):
        x = np.moveaxis(x.copy(), data_axis, 0)
        x[~keep] = bad
        poisoned.append(np.moveaxis(x, 0, data_axis))
    sliced = [np.compress(keep, x, axis=data_axis) for x in data]
    weights = rng.uniform(0.5, 2, lshape).astype(np.float32)
    sliced_w = np.compress(keep, weights, axis=loss_axis)
    got, g_masked = _evaluate(case)(poisoned, where=where, weights=weights)
    want, g_sliced = _evaluate(case)(
        sliced, where=np.ones(sliced_w.shape, bool), weights=sliced_w)
    for reduction in ("sum", "mean"):
        np.testing.assert_allclose(got[reduction], want[reduction], rtol=1e-6)
    for gm, gs in zip(g_masked, g_sliced, strict=True):
        gm = np.moveaxis(np.asarray(gm), data_axis, 0)
        np.testing.assert_array_equal(gm[~keep], 0.0)
        np.testing.assert_allclose(gm[keep], np.moveaxis(np.asarray(gs), data_axis, 0),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bfloat16(case):
    """bf16 in: math in float32, float32 out, gradients in bf16.

    The result equals the float32 loss of the bf16-rounded inputs (rtol 1e-6: the
    upcast happens before any math), and the mean is within 2% of the float32 loss of
    the unrounded inputs (bf16 keeps 8 significant bits, a 0.4% input error).
    """
    data = [x.astype(np.float32) for x in _data(case, _shape(case))]
    low = [jnp.asarray(x, jnp.bfloat16) for x in data]
    f = functools.partial(_evaluate(case), **_all_kept(case))
    out, grads = f(low)
    assert out["none"].dtype == jnp.float32
    rounded, _ = f([x.astype(jnp.float32) for x in low])
    np.testing.assert_allclose(out["none"], rounded["none"], rtol=1e-6)
    np.testing.assert_allclose(out["mean"], f(data)[0]["mean"], rtol=2e-2)
    assert all(g.dtype == jnp.bfloat16 for g in grads)


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_shard_map_equals_batched_call(case):
    """Batch sharded 8 ways: per-device "none" and psum'ed mean equal one device."""
    data_axis, _ = _batch_axes(case)
    _check_shard_map(case, _f32(_data(case, _shape(case, (8, 3)))), data_axis)


class VariantsTest(chex.TestCase):
    """jit, no jit and pmap give the reference value for every case."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters((c.id, c) for c in CASES)
    def test_variants(self, case):
        data = [x.astype(np.float32) for x in _data(case, EAGER_SHAPE)]
        fn = self.variant(functools.partial(case.fn, **case.kwargs))
        want = ref.reduce(case.reference(*data))
        np.testing.assert_allclose(fn(*(jnp.asarray(x) for x in data)), want,
                                   rtol=1e-5)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_bad_shapes_dtypes_and_options(case):
    p, t, *rest = _data(case, (3, 4))

    def call(*data, **kw):  # traced only: every rule here fires at trace time
        return jax.eval_shape(functools.partial(case.fn, **case.kwargs, **kw), *data)

    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        call(p, np.zeros((3, 5)), *rest)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4,\)"):
        call(p, t[0], *rest)  # no silent broadcasting of targets
    with pytest.raises(TypeError, match="predictions"):
        call(p.astype(np.int32), t, *rest)
    with pytest.raises(TypeError, match="targets"):
        call(p, t.astype(np.int32), *rest)
    with pytest.raises(ValueError, match="reduction"):
        call(p, t, *rest, reduction="batchmean")
    with pytest.raises(ValueError, match="where"):
        call(p, t, *rest, where=jnp.ones((2, 1), bool))
    with pytest.raises(TypeError, match="where"):
        call(p, t, *rest, where=jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="weights"):
        call(p, t, *rest, weights=jnp.ones((5,)))


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_checked_mode_catches_non_finite_kept_entries(case):
    data = [x.astype(np.float32) for x in _data(case, (3, 4))]
    f = lossjax.checked(functools.partial(case.fn, **case.kwargs))
    np.testing.assert_allclose(f(*data), ref.reduce(case.reference(*data)), rtol=1e-5)
    data[0][0, 0] = np.nan
    with pytest.raises(AssertionError, match=f"lossjax.{case.fn.__name__}:.*finite"):
        f(*data)
    where = np.ones(case.loss_shape((3, 4)), bool)
    where[(0,) * where.ndim] = False
    assert np.isfinite(f(*data, where=where))  # the NaN sits in an excluded entry


@pytest.mark.parametrize(
    "fn, kwargs, data, rule",
    [
        (R.poisson_nll, {}, ([0.5, 0.1], [1.0, -1.0]), "targets must be >= 0"),
        (R.poisson_nll, {"log_input": False}, ([0.5, -0.1], [1.0, 1.0]),
         r"predictions \(rates.*must be >= 0"),
        (R.gaussian_nll, {}, ([0.5, 0.1], [1.0, 1.0], [1.0, -1e-3]),
         "variance must be >= 0"),
        (R.gaussian_nll, {}, ([0.5, 0.1], [1.0, 1.0], [1.0, np.inf]),
         "variance must be finite"),
    ],
    ids=["poisson_targets", "poisson_rates", "gaussian_variance", "gaussian_inf"],
)
def test_checked_mode_value_rules(fn, kwargs, data, rule):
    f = lossjax.checked(functools.partial(fn, **kwargs))
    data = [np.asarray(x, np.float32) for x in data]
    with pytest.raises(AssertionError, match=f"lossjax.{fn.__name__}: {rule}"):
        f(*data)
    assert np.isfinite(f(*data, where=np.array([True, False])))


@pytest.mark.parametrize(
    "fn, kwargs, match",
    [
        (R.huber_loss, {"delta": 0.0}, "delta must be > 0"),
        (R.smooth_l1_loss, {"beta": -1.0}, "beta must be >= 0"),
        (R.quantile_loss, {"quantile": 1.5}, r"quantile must be in \(0, 1\)"),
    ],
    ids=["huber_delta", "smooth_l1_beta", "quantile"],
)
def test_bad_hyperparameters(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(jnp.zeros(3), jnp.zeros(3), **kwargs)


# --- loss-specific --------------------------------------------------------------------


class TestIdentities:
    def test_siblings(self):
        p, t = (jnp.asarray(x, jnp.float32) for x in _normal(np.random.default_rng(7),
                                                             (4, 5)))
        kw = {"reduction": "none"}
        l1 = R.absolute_error(p, t, **kw)
        np.testing.assert_array_equal(R.smooth_l1_loss(p, t, beta=0.0, **kw), l1)
        np.testing.assert_allclose(R.quantile_loss(p, t, quantile=0.5, **kw), 0.5 * l1,
                                   rtol=1e-6)
        np.testing.assert_allclose(R.huber_loss(p, t, delta=1.7, **kw),
                                   1.7 * R.smooth_l1_loss(p, t, beta=1.7, **kw),
                                   rtol=1e-6)
        # Pinball losses at q and 1 - q are mirror images.
        np.testing.assert_allclose(R.quantile_loss(p, t, quantile=0.2, **kw),
                                   R.quantile_loss(-p, -t, quantile=0.8, **kw),
                                   rtol=1e-6)
        # log cosh: x^2 / 2 near 0, |x| - log 2 far away, finite where cosh overflows.
        x = jnp.array([1e-3, 50.0, -1e4, 1e4])
        np.testing.assert_allclose(
            R.log_cosh(x, jnp.zeros(4), **kw),
            [0.5e-6, 50 - math.log(2), 1e4 - math.log(2), 1e4 - math.log(2)],
            rtol=1e-6)
        # Squared log error is squared error of log1p values.
        np.testing.assert_allclose(
            R.squared_log_error(jnp.abs(p), jnp.abs(t), **kw),
            R.squared_error(jnp.log1p(jnp.abs(p)), jnp.log1p(jnp.abs(t)), **kw),
            rtol=1e-5, atol=1e-7)

    def test_mape_zero_target_uses_keras_epsilon(self):
        out = R.mean_absolute_percentage_error(jnp.array([0.5, 1.0]),
                                               jnp.array([0.0, 1.0]), reduction="none")
        np.testing.assert_allclose(out, [100 * 0.5 / 1e-7, 0.0], rtol=1e-6)

    def test_cosine_scale_invariance_and_axis(self):
        p, t = (jnp.asarray(x, jnp.float32) for x in _normal(np.random.default_rng(8),
                                                             (3, 4, 5)))
        f = functools.partial(R.cosine_similarity_loss, reduction="none")
        np.testing.assert_allclose(f(3.0 * p, 0.5 * t), f(p, t), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f(p, t, axis=1),
                                   f(jnp.moveaxis(p, 1, -1), jnp.moveaxis(t, 1, -1)),
                                   rtol=1e-6)
        np.testing.assert_allclose(f(p, p), 0.0, atol=1e-6)
        np.testing.assert_allclose(f(p, -p), 2.0, rtol=1e-6)


class TestCosineTorch:
    def test_cosine_embedding_loss_with_target_one(self):
        p, t = _normal(np.random.default_rng(9), (6, 5))
        ones = torch.ones(6, dtype=torch.float64)
        with jax.enable_x64(True):
            for reduction in REDUCTIONS:
                want = F.cosine_embedding_loss(torch.tensor(p), torch.tensor(t), ones,
                                               reduction=reduction)
                got = R.cosine_similarity_loss(jnp.asarray(p), jnp.asarray(t),
                                               reduction=reduction)
                # torch adds 1e-12 under its square root instead of clamping norms.
                np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)

    def test_zero_and_tiny_vectors_match_torch_value_and_grad(self):
        p = np.array([[0.0, 0.0, 0.0], [1e-9, 0.0, 2e-9], [1.0, -2.0, 0.5]])
        t = np.array([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
        tp, tt = (torch.tensor(x, requires_grad=True) for x in (p, t))
        want = (1 - F.cosine_similarity(tp, tt, dim=-1)).sum()
        want.backward()
        with jax.enable_x64(True):
            f = lambda a, b: R.cosine_similarity_loss(a, b, reduction="sum")
            got, (gp, gt) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(p, t)
        np.testing.assert_allclose(got, want.item(), rtol=1e-12)
        # atol for the entry that cancels to ~1e-17 next to entries of ~1e8.
        np.testing.assert_allclose(gp, tp.grad.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(gt, tt.grad.numpy(), rtol=1e-9, atol=1e-9)


class TestGaussianNLL:
    @pytest.mark.parametrize(
        "shape, var_shape",
        [((3, 4), (3, 4)), ((3, 4), (3, 1)), ((3, 4), (3,)), ((3, 3), (3,)),
         ((2, 3, 4), (2, 1, 4)), ((5,), ())],
        ids=str,
    )
    def test_variance_shapes_match_torch(self, shape, var_shape):
        rng = np.random.default_rng(10)
        p, t = _normal(rng, shape)
        var = rng.uniform(0.1, 2.0, var_shape)
        with jax.enable_x64(True):
            out = jax.jit(lambda *a: {r: R.gaussian_nll(*a, reduction=r)
                                      for r in REDUCTIONS})(p, t, var)
        for reduction in REDUCTIONS:
            want = F.gaussian_nll_loss(torch.tensor(p), torch.tensor(t),
                                       torch.tensor(var), reduction=reduction)
            assert out[reduction].shape == want.shape
            np.testing.assert_allclose(out[reduction], want.numpy(), rtol=1e-10)

    def test_python_float_and_scalar_array_variance(self):
        p, t = _normal(np.random.default_rng(11), (3, 4))
        want = F.gaussian_nll_loss(torch.tensor(p), torch.tensor(t), 0.7)
        with jax.enable_x64(True):
            np.testing.assert_allclose(R.gaussian_nll(p, t, 0.7), want.numpy(),
                                       rtol=1e-7)  # 0.7 enters as a float32 scalar
            np.testing.assert_allclose(R.gaussian_nll(p, t, jnp.asarray(0.7)),
                                       want.numpy(), rtol=1e-10)

    def test_clamp_value_and_gradient_match_torch(self):
        """Below eps torch's no-grad clamp passes the gradient straight through."""
        p = np.array([0.1, 0.2, 0.3, -0.4])
        t = np.zeros(4)
        var = np.array([1e-8, 0.0, 0.5, 1e-6])
        tensors = [torch.tensor(x, requires_grad=True) for x in (p, t, var)]
        want = F.gaussian_nll_loss(*tensors, reduction="sum")
        want.backward()
        with jax.enable_x64(True):
            f = lambda *a: R.gaussian_nll(*a, reduction="sum")
            got, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(p, t, var)
        np.testing.assert_allclose(got, want.item(), rtol=1e-12)
        for g, tensor in zip(grads, tensors, strict=True):
            np.testing.assert_allclose(g, tensor.grad.numpy(), rtol=1e-10)
        assert np.asarray(grads[2])[1] != 0  # not the zero gradient of a plain maximum

    def test_bad_variance_shape_and_negative_variance(self):
        with pytest.raises(ValueError, match=r"variance of shape \(4,\).*\(3, 4\)"):
            R.gaussian_nll(jnp.zeros((3, 4)), jnp.zeros((3, 4)), jnp.ones(4))
        with pytest.raises(TypeError, match="variance"):
            R.gaussian_nll(jnp.zeros(3), jnp.zeros(3), jnp.ones(3, jnp.int32))
        out = R.gaussian_nll(jnp.zeros(3), jnp.ones(3), jnp.array([1.0, -1.0, 0.0]),
                             reduction="none")
        assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isfinite(out[2])


class TestPoisson:
    def test_log_input_overflow_is_inf_not_nan(self):
        # exp(1e4) is not representable: inf, as torch, never NaN.
        out = R.poisson_nll(jnp.array([1e4, 0.0]), jnp.array([1.0, 1.0]),
                            reduction="none")
        assert out[0] == np.inf and np.isfinite(out[1])

    def test_stirling_only_above_one(self):
        t = jnp.array([0.0, 1.0, 2.0, 5.0])
        full = R.poisson_nll(jnp.zeros(4), t, full=True, reduction="none")
        plain = R.poisson_nll(jnp.zeros(4), t, reduction="none")
        tt = np.array([2.0, 5.0])
        stirling = tt * np.log(tt) - tt + 0.5 * np.log(2 * np.pi * tt)
        np.testing.assert_allclose(full - plain, [0, 0, *stirling], rtol=1e-6,
                                   atol=1e-7)


def test_registry():
    for name in R.LOSS_NAMES:
        assert lossjax.get(name) is getattr(R, name)
        assert lossjax.family_of(name) == "regression"
    assert set(R.LOSS_NAMES) == set(R.__all__)


# --- ISSUE 11: hyperparameter policy, traced hyperparameters, checked mode, -----------
# --- sum_and_weight, axis_name --------------------------------------------------------


@pytest.mark.parametrize(
    "fn, name, bad, ok, match",
    [
        (R.huber_loss, "delta", [0.0, -1.0, np.float32(-2.0)], [1e-6, 3.0],
         r"delta must be > 0"),
        (R.smooth_l1_loss, "beta", [-1e-6, -1.0], [0.0, 2.0], r"beta must be >= 0"),
        (R.quantile_loss, "quantile", [0.0, 1.0, -0.1, 1.5], [1e-6, 0.5, 1 - 1e-6],
         r"quantile must be in \(0, 1\)"),
        (R.poisson_nll, "eps", [0.0, -1e-8], [1e-12], r"eps must be > 0"),
        (R.gaussian_nll, "eps", [0.0, -1.0], [1e-12], r"eps must be > 0"),
        (R.mean_absolute_percentage_error, "eps", [0.0, -1e-7], [1e-12],
         r"eps must be > 0"),
        (R.cosine_similarity_loss, "eps", [0.0, -1e-8], [1e-12], r"eps must be > 0"),
    ],
    ids=["huber_delta", "smooth_l1_beta", "quantile", "poisson_eps", "gaussian_eps",
         "mape_eps", "cosine_eps"],
)
def test_hyperparameter_ranges(fn, name, bad, ok, match):
    data = (jnp.ones((2, 3)), jnp.ones((2, 3)))
    if fn is R.gaussian_nll:
        data = data + (jnp.ones((2, 3)),)
    for value in bad:
        with pytest.raises(ValueError, match=match):
            fn(*data, **{name: value})
    for value in ok:
        assert np.isfinite(fn(*data, **{name: value}))


def _gauss_small_var(rng, shape):
    # Variances straddling eps, so that eps's clamp (and its gradient) is exercised.
    return (rng.normal(0, 2, shape), rng.normal(0, 2, shape),
            np.where(rng.random(shape) < 0.5, rng.uniform(0.01, 0.04, shape),
                     rng.uniform(0.1, 2.0, shape)))


def _tiny_targets(rng, shape):
    # |targets| straddling eps, so that MAPE's floor is exercised.
    t = np.where(rng.random(shape) < 0.5, rng.uniform(0.01, 0.04, shape),
                 rng.uniform(0.5, 2.0, shape))
    return rng.normal(0, 2, shape), t


def _short_vectors(rng, shape):
    # Half the vectors shorter than eps.
    p, t = rng.normal(0, 1, shape), rng.normal(0, 1, shape)
    scale = np.where(rng.random(shape[:-1] + (1,)) < 0.5, 0.01, 1.0)
    return p * scale, t


# (loss, hyperparameter, value, other keywords, reference, data maker)
TRACED = [
    (R.huber_loss, "delta", 1.3, {}, ref.huber_loss, _normal),
    (R.smooth_l1_loss, "beta", 0.7, {}, ref.smooth_l1_loss, _normal),
    (R.quantile_loss, "quantile", 0.3, {}, ref.quantile_loss, _normal),
    (R.poisson_nll, "eps", 0.2, {"log_input": False}, ref.poisson_nll, _rates),
    (R.gaussian_nll, "eps", 0.05, {"full": True}, ref.gaussian_nll, _gauss_small_var),
    (R.mean_absolute_percentage_error, "eps", 0.03, {},
     ref.mean_absolute_percentage_error, _tiny_targets),
    (R.cosine_similarity_loss, "eps", 0.05, {}, ref.cosine_similarity_loss,
     _short_vectors),
]
TRACED_IDS = [f"{fn.__name__}-{name}" for fn, name, *_ in TRACED]


def _ref_reduced(reference, data, kw, where, weights, reduction):
    entry = reference(*data, **kw)
    if reduction == "sum_and_weight":
        return (ref.reduce(entry, kept=where, weights=weights, reduction="sum"),
                ref.reduce(np.ones_like(entry), kept=where, weights=weights,
                           reduction="sum"))
    return ref.reduce(entry, kept=where, weights=weights, reduction=reduction)


def _masks(rng, lshape):
    return rng.random(lshape) < 0.7, rng.uniform(0.5, 2.0, lshape).astype(np.float32)


@pytest.mark.parametrize("fn, name, value, kw, reference, make", TRACED, ids=TRACED_IDS)
def test_traced_hyperparameter_under_jit(fn, name, value, kw, reference, make):
    """A traced hyperparameter equals the Python number and the float64 reference, for
    every reduction, with NaN in excluded entries."""
    rng = np.random.default_rng(3)
    data = _f32(make(rng, (6, 4)))
    lshape = (6,) if fn is R.cosine_similarity_loss else (6, 4)
    where, weights = _masks(rng, lshape)
    kept = where[..., None] if len(lshape) == 1 else where
    poisoned = [np.where(np.broadcast_to(kept, x.shape), x, np.nan).astype(np.float32)
                for x in data]
    for reduction in ("none", "sum", "mean", "sum_and_weight"):
        def call(h, reduction=reduction):
            return fn(*poisoned, **kw, **{name: h}, where=where, weights=weights,
                      reduction=reduction)
        traced = jax.jit(call)(jnp.float32(value))
        number = call(value)
        want = _ref_reduced(reference, data, {**kw, name: value}, where, weights,
                            reduction)
        for got, num, exp in zip(jax.tree.leaves(traced), jax.tree.leaves(number),
                                 jax.tree.leaves(want), strict=True):
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got, exp, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("fn, name, value, kw, reference, make", TRACED, ids=TRACED_IDS)
def test_traced_hyperparameter_grad_matches_finite_difference(fn, name, value, kw,
                                                              reference, make):
    rng = np.random.default_rng(4)
    data = make(rng, (6, 4))
    lshape = (6,) if fn is R.cosine_similarity_loss else (6, 4)
    where, weights = _masks(rng, lshape)
    with jax.enable_x64(True):
        grad = jax.grad(lambda h: fn(*(jnp.asarray(x) for x in data), **kw,
                                     **{name: h}, where=where, weights=weights))(
            jnp.float64(value))
    # float32 too: the gradient a user sees.
    grad32 = jax.jit(jax.grad(lambda h: fn(*_f32(data), **kw, **{name: h}, where=where,
                                           weights=weights)))(jnp.float32(value))

    def f(h):
        return _ref_reduced(reference, data, {**kw, name: h}, where, weights, "mean")

    step = 1e-6
    fd = (f(value + step) - f(value - step)) / (2 * step)
    assert np.isfinite(grad) and abs(fd) > 1e-3  # the test can fail: a real gradient
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grad32, fd, rtol=1e-4, atol=1e-6)


def test_traced_beta_zero_is_l1_with_finite_gradient():
    p, t = _f32(_normal(np.random.default_rng(5), (5, 3)))
    where = np.random.default_rng(6).random((5, 3)) < 0.7
    pn = np.where(where, p, np.nan).astype(np.float32)

    def loss(beta, reduction="mean"):
        return R.smooth_l1_loss(pn, t, beta=beta, where=where, reduction=reduction)

    for reduction in ("none", "sum", "mean"):
        np.testing.assert_allclose(
            jax.jit(loss, static_argnums=1)(jnp.float32(0.0), reduction),
            ref.reduce(ref.absolute_error(p, t), kept=where, reduction=reduction),
            rtol=1e-6)
    # Every |d| > 0 is on the linear piece |d| - beta / 2: d/dbeta of the mean is -1/2.
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(jnp.float32(0.0)), -0.5,
                               rtol=1e-6)
    gp = jax.jit(jax.grad(lambda x: R.smooth_l1_loss(
        x, t, beta=jnp.float32(0.0), where=where, reduction="sum")))(pn)
    np.testing.assert_array_equal(gp, np.where(where, np.sign(p - t), 0.0))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_checked_mode_with_documented_keywords(case):
    data = _f32(_data(case, _shape(case)))
    f = lossjax.checked(case.fn)
    for reduction in ("none", "mean"):
        np.testing.assert_allclose(
            f(*data, **case.kwargs, reduction=reduction),
            ref.reduce(case.reference(*data), reduction=reduction), rtol=2e-5,
            atol=1e-6)


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_sum_and_weight_matches_reference(case):
    rng = np.random.default_rng(8)
    data = _f32(_data(case, _shape(case)))
    lshape = case.loss_shape(_shape(case))
    where, weights = _masks(rng, lshape)
    total, weight = jax.jit(lambda *a: case.fn(
        *a, **case.kwargs, where=where, weights=weights,
        reduction="sum_and_weight"))(*data)
    want = _ref_reduced(case.ref, data, case.kwargs, where, weights, "sum_and_weight")
    np.testing.assert_allclose(total, want[0], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(weight, want[1], rtol=1e-6)


# --- the cross-device matrix (tests/test_matrix.py) -----------------------------------


def _m_normal(rng, batch):
    return tuple(x.astype(np.float32) for x in _normal(rng, (batch, 3)))


def _m_rates(rng, batch):
    return tuple(x.astype(np.float32) for x in _rates(rng, (batch, 3)))


def _m_log_rates(rng, batch):
    return tuple(x.astype(np.float32) for x in _log_rates(rng, (batch, 3)))


def _m_gauss(rng, batch):
    return tuple(x.astype(np.float32) for x in _gauss_small_var(rng, (batch, 3)))


def _m_away(rng, batch):
    return tuple(x.astype(np.float32) for x in _tiny_targets(rng, (batch, 3)))


def _m_vectors(rng, batch):
    return tuple(x.astype(np.float32) for x in _short_vectors(rng, (batch, 4)))


MATRIX_CASES = [
    MatrixCase("squared_error", _m_normal),
    MatrixCase("absolute_error", _m_normal),
    MatrixCase("huber_loss", _m_normal, kwargs={"delta": 1.3}, traced={"delta": 1.3}),
    MatrixCase("smooth_l1_loss", _m_normal, kwargs={"beta": 0.7},
               traced={"beta": 0.7}),
    MatrixCase("log_cosh", _m_normal),
    MatrixCase("poisson_nll", _m_log_rates, kwargs={"full": True}),
    MatrixCase("poisson_nll", _m_rates, kwargs={"log_input": False, "eps": 0.2},
               traced={"eps": 0.2}, id="rates"),
    MatrixCase("gaussian_nll", _m_gauss, kwargs={"full": True, "eps": 0.05},
               traced={"eps": 0.05}),
    MatrixCase("quantile_loss", _m_normal, kwargs={"quantile": 0.3},
               traced={"quantile": 0.3}),
    MatrixCase("mean_absolute_percentage_error", _m_away, kwargs={"eps": 0.03},
               traced={"eps": 0.03}),
    MatrixCase("squared_log_error", _m_normal),
    MatrixCase("cosine_similarity_loss", _m_vectors, kwargs={"eps": 0.05},
               traced={"eps": 0.05}),
]
