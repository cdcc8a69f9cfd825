"""Tests for lossjax.divergence: one table of cases, every contract rule over the table.

Each case is (loss, keyword options, NumPy reference, torch counterpart or None, input
maker, class axis). The generic tests run over the whole table; the classes at the end
hold what is specific to one loss (0 log 0, batchmean, JS identities, ...).
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
from lossjax import divergence as D

REDUCTIONS = ("none", "sum", "mean")


def _softmax(x, axis):
    return np.exp(ref.log_softmax(x, axis))


# --- input makers: (rng, shape, axis) -> tuple of float64 NumPy data arguments ------


def _probs(rng, shape, axis, scale=1.5):
    """Log-predictions and target probabilities (all positive: zeros are tested apart,
    since finite differences cannot step below 0)."""
    return (ref.log_softmax(rng.normal(0, scale, shape), axis),
            _softmax(rng.normal(0, scale, shape), axis))


def _log_probs(rng, shape, axis, scale=1.5):
    return (ref.log_softmax(rng.normal(0, scale, shape), axis),
            ref.log_softmax(rng.normal(0, scale, shape), axis))


def _logits(rng, shape, axis, scale=2.0):
    return rng.normal(0, scale, shape), rng.normal(0, scale, shape)


# --- torch counterparts: (*tensors, reduction) -> tensor ------------------------------


def _torch_reduce(loss, reduction):
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


def _torch_kl(axis, log_target=False):
    def f(log_q, t, reduction):
        pointwise = F.kl_div(log_q, t, reduction="none", log_target=log_target)
        return _torch_reduce(pointwise.sum(axis), reduction)
    return f


def _torch_kl_logits(axis):
    def f(logits_p, logits_q, reduction):
        log_p, log_q = F.log_softmax(logits_p, axis), F.log_softmax(logits_q, axis)
        pointwise = F.kl_div(log_q, log_p, reduction="none", log_target=True)
        return _torch_reduce(pointwise.sum(axis), reduction)
    return f


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fn: Callable
    kwargs: dict
    ref: Callable
    torch: Callable | None
    make: Callable
    axis: int = -1  # the class axis, absent from the loss shape

    def __repr__(self):
        return self.id

    def loss_shape(self, shape):
        return tuple(np.delete(np.array(shape), self.axis))

    def __call__(self, *data, **kw):
        return self.fn(*(jnp.asarray(x) for x in data), **self.kwargs, **kw)

    def reference(self, *data):
        return self.ref(*data, **self.kwargs)

    def data(self, shape, seed=0, **kw):
        return self.make(np.random.default_rng(seed), shape, self.axis, **kw)


CASES = [
    Case("kl_divergence", D.kl_divergence, {}, ref.kl_divergence, _torch_kl(-1),
         _probs),
    Case("kl_divergence_log_targets_axis0", D.kl_divergence,
         {"log_targets": True, "axis": 0}, ref.kl_divergence,
         _torch_kl(0, log_target=True), _log_probs, axis=0),
    Case("kl_divergence_with_logits", D.kl_divergence_with_logits, {},
         ref.kl_divergence_with_logits, _torch_kl_logits(-1), _logits),
    Case("js_divergence", D.js_divergence, {}, ref.js_divergence, None, _logits),
    Case("js_divergence_axis0", D.js_divergence, {"axis": 0}, ref.js_divergence, None,
         _logits, axis=0),
]
TORCH_CASES = [c for c in CASES if c.torch is not None]
FIRST_CASES = list({c.fn: c for c in reversed(CASES)}.values())[::-1]

# Tests jit whole computations (`_evaluate`, cached per case so that tests with the
# same shapes share executables): eager dispatch compiles every primitive per shape.
SHAPE = (5, 4)  # 5 distributions over 4 classes (transposed for axis-0 cases)
EAGER_SHAPE = (3, 4, 2)


def _shape(case, shape=SHAPE):
    return shape[::-1] if case.axis == 0 else shape


def _batch_axes(case):
    """(data axis, loss axis) of a batch axis that is not the class axis."""
    return (1, 0) if case.axis == 0 else (0, 0)


def _all_kept(case, shape=SHAPE):
    lshape = case.loss_shape(_shape(case, shape))
    return {"where": np.ones(lshape, bool), "weights": np.ones(lshape, np.float32)}


def _f32(data):
    return [np.asarray(x, np.float32) for x in data]


# --- generic tests over the table -----------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_values_match_reference(case):
    rng = np.random.default_rng(1)
    data = case.data(_shape(case))
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
    data = case.data(_shape(case, shape), seed=2)
    with jax.enable_x64(True):
        out, grads = _evaluate(case)([jnp.asarray(x) for x in data])
    tensors = [torch.tensor(x, requires_grad=True) for x in data]
    for reduction in REDUCTIONS:
        want = case.torch(*tensors, reduction=reduction)
        np.testing.assert_allclose(out[reduction], want.detach().numpy(),
                                   rtol=1e-10, atol=1e-12)
    want.backward()  # the mean, the last reduction
    for g, tensor in zip(grads, tensors, strict=True):
        np.testing.assert_allclose(g, tensor.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vmap_equals_batched_call(case):
    # (jit == eager: VariantsTest runs both against the reference.)
    data = _f32(case.data(EAGER_SHAPE))
    batched = _jit(case, reduction="none")(*data)
    data_axis, loss_axis = _batch_axes(case)
    vmapped = jax.jit(jax.vmap(
        lambda *a: {r: case.fn(*a, **case.kwargs, reduction=r) for r in REDUCTIONS},
        in_axes=data_axis))
    out = vmapped(*data)
    np.testing.assert_allclose(out["none"], jnp.moveaxis(batched, loss_axis, 0),
                               rtol=1e-6)
    per_row = jnp.moveaxis(batched, loss_axis, 0)
    np.testing.assert_allclose(out["sum"], per_row.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(out["mean"], per_row.mean(-1), rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_check_grads_float64(case):
    data = case.data(_shape(case, (3, 4)), seed=3)
    weights = np.random.default_rng(4).uniform(0.5, 2,
                                               case.loss_shape(_shape(case, (3, 4))))
    with jax.enable_x64(True):
        f = jax.jit(functools.partial(case.fn, **case.kwargs,
                                      weights=jnp.asarray(weights)))
        check_grads(f, [jnp.asarray(x) for x in data], order=1, modes=["rev"])


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_finite_at_1e4(case):
    # Logits (or the logits behind the log-probabilities) of size 1e4: log-probs
    # down to -3e4, probabilities that underflow to exactly 0.
    data = [jnp.asarray(x, jnp.float32)
            for x in case.data(_shape(case), seed=5, scale=1e4)]
    assert np.abs(np.asarray(data[0])).max() > 1e4
    out, grads = _evaluate(case)(data, **_all_kept(case))
    for x in jax.tree.leaves((out, grads)):
        assert np.all(np.isfinite(x))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fully_masked_is_zero_with_zero_grads(case):
    data = [jnp.full(_shape(case), v, jnp.float32) for v in (np.nan, np.inf)]
    where = jnp.zeros(case.loss_shape(_shape(case)), bool)
    out, grads = _evaluate(case)(data, where=where, weights=_all_kept(case)["weights"])
    for x in jax.tree.leaves((out, grads)):
        np.testing.assert_array_equal(x, np.zeros_like(x))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_where_equals_slicing(case):
    rng = np.random.default_rng(6)
    data = _f32(case.data(_shape(case)))
    data_axis, loss_axis = _batch_axes(case)
    keep = np.array([True, False, True, True, False])
    lshape = case.loss_shape(_shape(case))
    poisoned = []
    for x, bad in zip(data, (np.nan, np.inf), strict=False):
        x = np.moveaxis(x.copy(), data_axis, 0)
        x[~keep] = bad
        poisoned.append(np.moveaxis(x, 0, data_axis))
    sliced = [np.compress(keep, x, axis=data_axis) for x in data]
    weights = rng.uniform(0.5, 2, lshape).astype(np.float32)
    sliced_w = np.compress(keep, weights, axis=loss_axis)
    got, g_masked = _evaluate(case)(poisoned, where=keep, weights=weights)
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

    The result equals the float32 loss of the bf16-rounded inputs (to float32
    rounding: the upcast happens before any math). Against the unrounded inputs the
    error is absolute: a p-weighted sum of log-probability errors, each at most 2^-9
    of a magnitude below 8 here (1.6e-2), so within 2e-2.
    """
    data = _f32(case.data(_shape(case)))
    low = [jnp.asarray(x, jnp.bfloat16) for x in data]
    f = functools.partial(_evaluate(case), **_all_kept(case))
    out, grads = f(low)
    assert out["none"].dtype == jnp.float32
    rounded, _ = f([x.astype(jnp.float32) for x in low])
    # atol: float32 rounding of sums of O(1) terms (the two programs fuse differently).
    np.testing.assert_allclose(out["none"], rounded["none"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["none"], f(data)[0]["none"], atol=2e-2)
    assert all(g.dtype == jnp.bfloat16 for g in grads)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_axis_equals_moving_the_axis_last(case):
    data = _f32(case.data((2, 3, 4) if case.axis == -1 else (3, 2, 4)))
    axis = 1 if case.axis == -1 else 0
    moved = [np.moveaxis(x, axis, -1) for x in data]
    kwargs = {**case.kwargs, "reduction": "none"}
    np.testing.assert_allclose(
        jax.jit(functools.partial(case.fn, **{**kwargs, "axis": axis}))(*data),
        jax.jit(functools.partial(case.fn, **{**kwargs, "axis": -1}))(*moved),
        rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_shard_map_equals_batched_call(case):
    """Batch sharded 8 ways: per-device "none" and psum'ed mean equal one device."""
    data_axis, _ = _batch_axes(case)
    _check_shard_map(case, _f32(case.data(_shape(case, (8, 3)))), data_axis)


class VariantsTest(chex.TestCase):
    """jit, no jit and pmap give the reference value for every case."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters((c.id, c) for c in CASES)
    def test_variants(self, case):
        data = _f32(case.data(EAGER_SHAPE))
        fn = self.variant(functools.partial(case.fn, **case.kwargs))
        want = ref.reduce(case.reference(*data))
        np.testing.assert_allclose(fn(*(jnp.asarray(x) for x in data)), want,
                                   rtol=1e-5)


# --- bad input ------------------------------------------------------------------------


_ARG_NAMES = {
    D.kl_divergence: ("log_predictions", "targets"),
    D.kl_divergence_with_logits: ("logits_p", "logits_q"),
    D.js_divergence: ("logits_p", "logits_q"),
}


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_bad_shapes_dtypes_and_options(case):
    a, b = case.data((3, 4))
    first, second = _ARG_NAMES[case.fn]

    def call(*data, **kw):  # traced only: every rule here fires at trace time
        return jax.eval_shape(functools.partial(case.fn, **{**case.kwargs, **kw}),
                              *data)

    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        call(a, np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4,\)"):
        call(a, b[0])
    with pytest.raises(TypeError, match=first):
        call(a.astype(np.int32), b)
    with pytest.raises(TypeError, match=second):
        call(a, b.astype(np.int32))
    with pytest.raises(ValueError, match="rank"):
        call(np.float32(0.0), np.float32(0.0))
    with pytest.raises(ValueError, match="axis=2"):
        call(a, b, axis=2)
    with pytest.raises(ValueError, match="reduction"):
        call(a, b, reduction="batchmean")
    with pytest.raises(ValueError, match="where"):
        call(a, b, axis=-1, where=jnp.ones((4,), bool))  # loss shape is (3,)
    with pytest.raises(ValueError, match="weights"):
        call(a, b, axis=-1, weights=jnp.ones((3, 4)))


@pytest.mark.parametrize(
    "case_id, data, rule",
    [
        ("kl_divergence", ([[0.0, -np.inf]], [[1.0, 0.0]]), None),
        ("kl_divergence", ([[np.nan, -1.0]], [[0.5, 0.5]]), "log_predictions must"),
        ("kl_divergence", ([[-np.inf, 0.0]], [[0.5, 0.5]]), "log_predictions must"),
        ("kl_divergence", ([[-1.0, -1.0]], [[1.5, -0.5]]),
         r"targets must lie in \[0, 1\]"),
        ("kl_divergence", ([[-1.0, -1.0]], [[np.nan, 0.5]]), "targets must be finite"),
        ("kl_divergence_log_targets_axis0", ([[-1.0], [-1.0]], [[0.5], [-2.0]]),
         r"targets \(log_targets=True\) must be <= 0"),
        ("kl_divergence_log_targets_axis0", ([[-1.0], [-np.inf]], [[0.0], [-np.inf]]),
         None),
        ("kl_divergence_with_logits", ([[np.inf, 0.0]], [[0.0, 0.0]]),
         "logits_p must be finite"),
        ("js_divergence", ([[0.0, 0.0]], [[0.0, np.nan]]), "logits_q must be finite"),
    ],
    ids=["kl_ok_neg_inf_at_zero_target", "kl_nan", "kl_neg_inf_at_positive_target",
         "kl_targets_range", "kl_targets_nan", "kl_log_targets_positive",
         "kl_log_targets_ok", "kl_logits_inf", "js_nan"],
)
def test_checked_mode_value_rules(case_id, data, rule):
    case = next(c for c in CASES if c.id == case_id)
    f = lossjax.checked(functools.partial(case.fn, **case.kwargs))
    data = _f32(data)
    if rule is None:
        assert np.isfinite(f(*data))
        np.testing.assert_allclose(f(*data), case.reference(*data).mean(), rtol=1e-6)
        return
    with pytest.raises(AssertionError, match=f"lossjax.{case.fn.__name__}: {rule}"):
        f(*data)
    # The same bad values in an excluded distribution are ignored.
    batch_axis = _batch_axes(case)[0]
    padded = [np.concatenate([x, np.zeros_like(x)], batch_axis) for x in data]
    assert f(*padded, where=np.array([False, True])) == 0.0


# --- loss-specific --------------------------------------------------------------------


class TestKL:
    def test_mean_is_torch_batchmean(self):
        log_q, t = _probs(np.random.default_rng(7), (6, 5), -1)
        want = F.kl_div(torch.tensor(log_q), torch.tensor(t), reduction="batchmean")
        with jax.enable_x64(True):
            got = jax.jit(D.kl_divergence)(log_q, t)
        np.testing.assert_allclose(got, want.item(), rtol=1e-12)

    def test_zero_targets_contribute_zero_with_finite_grads(self):
        """0 log 0 = 0, also where log_predictions is -inf (torch gives NaN there)."""
        log_q = np.array([[np.log(0.7), np.log(0.3), -np.inf],
                          [np.log(0.2), np.log(0.8), np.log(1e-30)]])
        t = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
        with jax.enable_x64(True):
            f = jax.jit(jax.value_and_grad(
                functools.partial(D.kl_divergence, reduction="sum"), argnums=(0, 1)))
            value, (g_log_q, g_t) = f(log_q, t)
        want = ref.kl_divergence(np.where(np.isinf(log_q), 0.0, log_q), t).sum()
        np.testing.assert_allclose(value, want, rtol=1e-12)
        np.testing.assert_array_equal(g_log_q, -t)
        assert np.all(np.isfinite(g_t))
        np.testing.assert_array_equal(g_t[t == 0], 0.0)
        # Where torch is finite (no -inf), it agrees.
        tl = torch.tensor(log_q[1:], requires_grad=True)
        torch_value = F.kl_div(tl, torch.tensor(t[1:]), reduction="sum")
        torch_value.backward()
        with jax.enable_x64(True):
            np.testing.assert_allclose(D.kl_divergence(log_q[1:], t[1:],
                                                       reduction="sum"),
                                       torch_value.item(), rtol=1e-12)
        np.testing.assert_array_equal(tl.grad.numpy(), g_log_q[1:])

    def test_zero_log_targets_contribute_zero_with_finite_grads(self):
        """-inf log-targets are zero probabilities, also against -inf predictions."""
        log_q = np.log([[0.7, 0.3, 1.0], [0.2, 0.8, 1e-30]])
        log_q[0, 2] = -np.inf
        log_t = np.log([[0.5, 0.5, 1.0], [1.0, 1.0, 1.0]])
        log_t[[0, 1, 1], [2, 0, 2]] = -np.inf
        with jax.enable_x64(True):
            f = jax.jit(jax.value_and_grad(functools.partial(
                D.kl_divergence, log_targets=True, reduction="sum"), argnums=(0, 1)))
            value, (g_log_q, g_log_t) = f(log_q, log_t)
        # The float64 reference (0 log 0 = 0 where the log-target is -inf), not the
        # loss itself.
        want = ref.kl_divergence(log_q, log_t, log_targets=True).sum()
        assert np.isfinite(want) and want > 0
        np.testing.assert_allclose(value, want, rtol=1e-12)
        np.testing.assert_array_equal(g_log_q, -np.exp(log_t))
        np.testing.assert_array_equal(g_log_t[np.isinf(log_t)], 0.0)
        assert np.all(np.isfinite(g_log_t))

    def test_log_targets_and_logits_forms_agree(self):
        rng = np.random.default_rng(8)
        lp, lq = (jnp.asarray(x, jnp.float32) for x in _logits(rng, (4, 6), -1))
        log_p, log_q = jax.nn.log_softmax(lp), jax.nn.log_softmax(lq)
        kw = {"reduction": "none"}
        with_logits = jax.jit(functools.partial(D.kl_divergence_with_logits, **kw))
        kl = jax.jit(functools.partial(D.kl_divergence, **kw))
        kl_log = jax.jit(functools.partial(D.kl_divergence, log_targets=True, **kw))
        want = with_logits(lp, lq)
        np.testing.assert_allclose(kl(log_q, jnp.exp(log_p)), want, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(kl_log(log_q, log_p), want, rtol=1e-5, atol=1e-6)
        # -inf log-targets are zero probabilities.
        log_t = jnp.array([[0.0, -jnp.inf]])
        np.testing.assert_allclose(kl_log(jnp.array([[-0.5, -1.0]]), log_t), [0.5])

    def test_negative_or_nan_target_gives_nan_for_its_distribution(self):
        out = jax.jit(functools.partial(D.kl_divergence, reduction="none"))(
            jnp.full((3, 2), -math.log(2.0)),
            jnp.array([[1.2, -0.2], [0.5, 0.5], [jnp.nan, 1.0]]))
        assert np.isnan(out[0]) and out[1] == 0.0 and np.isnan(out[2])


class TestJS:
    def test_identities(self):
        rng = np.random.default_rng(9)
        lp, lq = (jnp.asarray(x, jnp.float32) for x in _logits(rng, (6, 5), -1))
        js = jax.jit(functools.partial(D.js_divergence, reduction="none"))
        out = js(lp, lq)
        np.testing.assert_allclose(js(lq, lp), out, rtol=1e-6)  # symmetric
        np.testing.assert_allclose(js(lp, lp + 3.0), 0.0, atol=1e-6)  # shift-invariant
        assert np.all(out >= 0) and np.all(out <= math.log(2))
        # Disjoint supports reach log 2; 1e4 logits stay finite there.
        far = js(jnp.array([1e4, -1e4]), jnp.array([-1e4, 1e4]))
        np.testing.assert_allclose(far, math.log(2), rtol=1e-6)
        # JS = (KL(p || m) + KL(q || m)) / 2 with m the mixture.
        p, q = jax.nn.softmax(lp), jax.nn.softmax(lq)
        log_m = jnp.log(0.5 * (p + q))
        kl = jax.jit(functools.partial(D.kl_divergence, reduction="none"))
        np.testing.assert_allclose(out, 0.5 * (kl(log_m, p) + kl(log_m, q)),
                                   rtol=1e-5, atol=1e-6)


def test_registry():
    for name in D.LOSS_NAMES:
        assert lossjax.get(name) is getattr(D, name)
        assert lossjax.family_of(name) == "divergence"
    assert set(D.LOSS_NAMES) == set(D.__all__)


# --- ISSUE 11: checked mode with keywords, sum_and_weight, axis_name ------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_checked_mode_with_documented_keywords(case):
    """`checked(loss)` takes the loss's own keywords (axis, log_targets, reduction)."""
    data = _f32(case.data(_shape(case)))
    f = lossjax.checked(case.fn)
    for reduction in ("none", "sum", "mean"):
        np.testing.assert_allclose(
            f(*data, **case.kwargs, reduction=reduction),
            ref.reduce(case.reference(*data), reduction=reduction), rtol=2e-5,
            atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_sum_and_weight_matches_reference(case):
    rng = np.random.default_rng(11)
    data = _f32(case.data(_shape(case)))
    lshape = case.loss_shape(_shape(case))
    where = rng.random(lshape) < 0.7
    weights = rng.uniform(0.5, 2.0, lshape).astype(np.float32)
    total, weight = jax.jit(lambda *a: case.fn(
        *a, **case.kwargs, where=where, weights=weights,
        reduction="sum_and_weight"))(*data)
    entry = case.reference(*data)
    np.testing.assert_allclose(
        total, ref.reduce(entry, kept=where, weights=weights, reduction="sum"),
        rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(weight, np.where(where, weights, 0).sum(), rtol=1e-6)


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_pmap_axis_name_mean_and_gradient_equal_one_device(case):
    """pmap with axis_name: the global mean on every device, and each device's input
    gradient its slice of the one-device gradient (the old losses had no axis_name;
    a plain psum would give 8 times the gradient)."""
    n = jax.device_count()
    data = _f32(case.data(_shape(case, (2 * n, 4))))
    rng = np.random.default_rng(12)
    weights = rng.uniform(0.5, 2.0, (2 * n,)).astype(np.float32)
    where = rng.random(2 * n) < 0.7
    where[:2] = False  # one device keeps nothing

    def loss(*a, w, m, axis_name=None):
        return case.fn(*a, **case.kwargs, where=m, weights=w, axis_name=axis_name)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    want, want_g = jax.jit(grad)(*data, w=weights, m=where)
    split = [x.reshape(n, 2, *x.shape[1:]) for x in (*data, weights, where)]
    got, got_g = jax.pmap(lambda a, b, w, m: grad(a, b, w=w, m=m, axis_name="i"),
                          axis_name="i")(*split)
    np.testing.assert_allclose(got, np.full(n, want), rtol=2e-5)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g.reshape(w.shape), w, rtol=2e-5, atol=1e-7)
    entry = case.reference(*data)
    np.testing.assert_allclose(want, ref.reduce(entry, kept=where, weights=weights),
                               rtol=2e-5)


# --- the cross-device matrix (tests/test_matrix.py) -----------------------------------


def _m(make, **kw):
    def data(rng, batch):
        return tuple(np.asarray(x, np.float32) for x in make(rng, (batch, 5), -1, **kw))
    return data


MATRIX_CASES = [
    MatrixCase("kl_divergence", _m(_probs)),
    MatrixCase("kl_divergence", _m(_log_probs), kwargs={"log_targets": True},
               id="log_targets"),
    MatrixCase("kl_divergence_with_logits", _m(_logits)),
    MatrixCase("js_divergence", _m(_logits)),
]
