"""Preference losses (DPO and variants, ORPO, SimPO, CPO, KTO), the fused sequence
log-probabilities of a linear head, and the fused DPO.

References are float64 NumPy, written from the papers' formulas (TRL's conventions),
never calling lossjax.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from loss_cases import MatrixCase

import lossjax
from lossjax.preference import DPO_LOSS_TYPES

# --- float64 NumPy references ---------------------------------------------------------


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_sigmoid(x):
    return np.exp(_np_log_sigmoid(x))


def np_dpo(c, r, rc, rr, *, beta, loss_type, eps=0.0, lc=None, lr=None, delta=0.0):
    c, r, rc, rr = (np.asarray(x, np.float64) for x in (c, r, rc, rr))
    if loss_type == "ipo":
        c, rc, r, rr = c / lc, rc / lc, r / lr, rr / lr
    u, v = c - rc, r - rr  # implicit rewards / beta
    z = u - v
    ls = _np_log_sigmoid
    if loss_type == "sigmoid":  # Rafailov 2023; Mitchell 2023 (cDPO)
        return -(1 - eps) * ls(beta * z) - eps * ls(-beta * z)
    if loss_type == "robust":  # Chowdhury 2024, eq. (8)
        return (-(1 - eps) * ls(beta * z) + eps * ls(-beta * z)) / (1 - 2 * eps)
    if loss_type == "hinge":  # SLiC
        return np.maximum(0.0, 1 - beta * z)
    if loss_type == "ipo":  # Azar 2023, eq. (17)
        return (z - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":  # Ji 2024: KL(p_theta || p_data) over the pair
        e = 1e-3 if eps == 0 else eps
        p = _np_sigmoid(beta * z)
        return p * (np.log(p) - np.log(1 - e)) + (1 - p) * (np.log(1 - p) - np.log(e))
    if loss_type == "bco_pair":
        return -ls(beta * u - delta) - ls(-(beta * v - delta))
    if loss_type == "nca_pair":
        return -ls(beta * u) - 0.5 * ls(-beta * u) - 0.5 * ls(-beta * v)
    if loss_type == "sppo_hard":
        return (u - 1 / (2 * beta)) ** 2 + (v + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - _np_sigmoid(beta * u)) + _np_sigmoid(beta * v)
    if loss_type == "apo_down":
        return _np_sigmoid(beta * u) + (1 - _np_sigmoid(beta * z))
    raise AssertionError(loss_type)


def np_orpo(c, r, lc, lr, beta):
    a, b = np.asarray(c, np.float64) / lc, np.asarray(r, np.float64) / lr
    odds = lambda p: p / (1 - p)  # noqa: E731
    log_or = np.log(odds(np.exp(a)) / odds(np.exp(b)))
    return -a - beta * _np_log_sigmoid(log_or)


def np_simpo(c, r, lc, lr, beta, gamma, eps=0.0):
    x = beta * (np.asarray(c, np.float64) / lc - np.asarray(r, np.float64) / lr) - gamma
    return -(1 - eps) * _np_log_sigmoid(x) - eps * _np_log_sigmoid(-x)


def np_cpo(c, r, lc, beta, alpha, eps=0.0):
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    x = beta * (c - r)
    return -(1 - eps) * _np_log_sigmoid(x) - eps * _np_log_sigmoid(-x) - alpha * c / lc


def np_kto(p, q, desirable, kl, beta, wd=1.0, wu=1.0):
    u = np.asarray(p, np.float64) - np.asarray(q, np.float64)
    z0 = max(kl, 0.0)
    return np.where(desirable, wd * (1 - _np_sigmoid(beta * (u - z0))),
                    wu * (1 - _np_sigmoid(beta * (z0 - u))))


def np_reduce(loss, where, weights, reduction):
    w = np.ones_like(loss) if weights is None else np.asarray(weights, np.float64)
    k = np.ones(loss.shape, bool) if where is None else np.asarray(where)
    wl = np.where(k, w * np.where(k, loss, 0), 0)
    if reduction == "none":
        return wl
    if reduction == "sum":
        return wl.sum()
    return wl.sum() / np.where(k, w, 0).sum()


def np_sequence_logprobs(h, w, y, b=None, cap=None, ignore_index=-100):
    """Sum over the sequence of log softmax(c(h w + b))[label], and the counts."""
    x = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    if b is not None:
        x = x + np.asarray(b, np.float64)
    if cap is not None:
        x = cap * np.tanh(x / cap)
    m = x.max(-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    y = np.asarray(y)
    kept = y != ignore_index
    picked = np.take_along_axis(logp, np.where(kept, y, 0)[..., None], -1)[..., 0]
    return np.where(kept, picked, 0).sum(-1), kept.sum(-1)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _logps(rng, n):
    return tuple(-rng.uniform(5.0, 30.0, n).astype(np.float32) for _ in range(4))


# --- dpo_loss: every loss type --------------------------------------------------------


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_matches_float64_reference(loss_type):
    rng = np.random.default_rng(0)
    n = 12
    data = _logps(rng, n)
    lc = rng.integers(3, 20, n).astype(np.float32)
    lr = rng.integers(3, 20, n).astype(np.float32)
    where = rng.random(n) > 0.25
    weights = rng.uniform(0.5, 2.0, n).astype(np.float32)
    eps = 0.1 if loss_type in ("sigmoid", "robust", "exo_pair") else 0.0
    lengths = (dict(chosen_lengths=lc, rejected_lengths=lr)
               if loss_type == "ipo" else {})
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps, bco_delta=0.2,
              **lengths)
    ref = np_dpo(*data, beta=0.3, loss_type=loss_type, eps=eps, lc=lc, lr=lr,
                 delta=0.2)
    for reduction in ("none", "sum", "mean"):
        got = lossjax.dpo_loss(*data, where=where, weights=weights,
                               reduction=reduction, **kw)
        np.testing.assert_allclose(got, np_reduce(ref, where, weights, reduction),
                                   rtol=2e-5, atol=1e-6, err_msg=reduction)
    with jax.enable_x64(True):
        wide = tuple(np.float64(x) for x in data)
        got = lossjax.dpo_loss(*wide, reduction="none", **kw)
        np.testing.assert_allclose(got, ref, rtol=1e-12)
        jax.test_util.check_grads(
            lambda *a: lossjax.dpo_loss(*a, **kw), wide, order=1,
            modes=["rev"], atol=1e-5, rtol=1e-5)


def test_exo_pair_default_smoothing_and_rewards():
    rng = np.random.default_rng(1)
    data = _logps(rng, 6)
    got = lossjax.dpo_loss(*data, loss_type="exo_pair", reduction="none")
    np.testing.assert_allclose(
        got, np_dpo(*data, beta=0.1, loss_type="exo_pair", eps=1e-3), rtol=1e-5)
    where = np.array([True, False] * 3)
    loss, cr, rr = lossjax.dpo_loss(*data, beta=0.5, return_rewards=True,
                                    where=where)
    c, r, rc, rrf = data
    np.testing.assert_allclose(cr, np.where(where, 0.5 * (c - rc), 0), rtol=1e-6)
    np.testing.assert_allclose(rr, np.where(where, 0.5 * (r - rrf), 0), rtol=1e-6)
    np.testing.assert_allclose(loss, lossjax.dpo_loss(*data, beta=0.5, where=where))
    # The rewards are logged, not trained: no gradient flows through them.
    g = jax.grad(lambda c: jnp.sum(lossjax.dpo_loss(
        c, *data[1:], return_rewards=True)[1]))(data[0])
    assert not np.any(np.asarray(g))


def test_sigmoid_identities_and_traced_beta():
    rng = np.random.default_rng(2)
    data = _logps(rng, 8)
    # Conservative DPO with smoothing 0 is DPO; robust with 0 equals sigmoid.
    a = lossjax.dpo_loss(*data, label_smoothing=0.0)
    np.testing.assert_allclose(a, lossjax.dpo_loss(*data, loss_type="robust"),
                               rtol=1e-6)
    f = jax.jit(lambda b, e: lossjax.dpo_loss(*data, beta=b, label_smoothing=e))
    np.testing.assert_allclose(f(0.2, 0.1), lossjax.dpo_loss(
        *data, beta=0.2, label_smoothing=0.1), rtol=1e-6)
    assert np.isfinite(jax.grad(f, argnums=(0, 1))(0.2, 0.1)).all()


# --- ORPO, SimPO, CPO, KTO ------------------------------------------------------------


def _pairs(rng, n=10):
    lc = rng.integers(2, 12, n).astype(np.float32)
    lr = rng.integers(2, 12, n).astype(np.float32)
    c = (-rng.uniform(0.05, 3.0, n) * lc).astype(np.float32)
    r = (-rng.uniform(0.05, 3.0, n) * lr).astype(np.float32)
    return c, r, lc, lr


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_orpo_simpo_cpo_match_float64_references(reduction):
    rng = np.random.default_rng(3)
    c, r, lc, lr = _pairs(rng)
    where = rng.random(10) > 0.2
    weights = rng.uniform(0.5, 2.0, 10).astype(np.float32)
    common = dict(where=where, weights=weights, reduction=reduction)
    cases = [
        (lossjax.orpo_loss(c, r, beta=0.2, chosen_lengths=lc, rejected_lengths=lr,
                           **common), np_orpo(c, r, lc, lr, 0.2)),
        (lossjax.simpo_loss(c, r, beta=2.0, gamma=0.6, label_smoothing=0.1,
                            chosen_lengths=lc, rejected_lengths=lr, **common),
         np_simpo(c, r, lc, lr, 2.0, 0.6, 0.1)),
        (lossjax.cpo_loss(c, r, beta=0.3, alpha=0.5, label_smoothing=0.05,
                          chosen_lengths=lc, **common),
         np_cpo(c, r, lc, 0.3, 0.5, 0.05)),
    ]
    for got, ref in cases:
        np.testing.assert_allclose(got, np_reduce(ref, where, weights, reduction),
                                   rtol=2e-5, atol=1e-6)


def test_orpo_simpo_cpo_kto_check_grads_float64():
    rng = np.random.default_rng(4)
    c, r, lc, lr = _pairs(rng, 6)
    with jax.enable_x64(True):
        c, r = np.float64(c), np.float64(r)
        for f in (
            lambda c, r: lossjax.orpo_loss(c, r, chosen_lengths=lc,
                                           rejected_lengths=lr),
            lambda c, r: lossjax.simpo_loss(c, r, chosen_lengths=lc,
                                            rejected_lengths=lr),
            lambda c, r: lossjax.cpo_loss(c, r, chosen_lengths=lc),
            lambda c, r: lossjax.kto_loss(c, r, np.arange(6) % 2 == 0, kl=0.3),
        ):
            jax.test_util.check_grads(f, (c, r), order=1, modes=["rev"],
                                      atol=1e-5, rtol=1e-5)


def test_orpo_defaults_and_average_inputs():
    # Without lengths the inputs are averages: TRL's ORPO computes from averages.
    c = np.array([-0.2, -1e-4], np.float32)
    r = np.array([-1.0, -2.0], np.float32)
    got = lossjax.orpo_loss(c, r, reduction="none")
    np.testing.assert_allclose(got, np_orpo(c, r, 1.0, 1.0, 0.1), rtol=1e-5)
    # Finite gradient as the average log-probability tends to 0 (log1mexp).
    assert np.isfinite(jax.grad(lambda c: lossjax.orpo_loss(c, r))(c)).all()


def test_kto_matches_reference_and_stops_kl_gradient():
    rng = np.random.default_rng(5)
    p, q = (-rng.uniform(5, 30, 10).astype(np.float32) for _ in range(2))
    desirable = rng.random(10) > 0.5
    for kl in (0.7, -0.3):  # a negative estimate is clamped to 0
        got = lossjax.kto_loss(p, q, desirable, kl=kl, beta=0.2, desirable_weight=1.5,
                               undesirable_weight=0.7, reduction="none")
        np.testing.assert_allclose(
            got, np_kto(p, q, desirable, kl, 0.2, 1.5, 0.7), rtol=1e-5)
    g = jax.grad(lambda kl: lossjax.kto_loss(p, q, desirable, kl=kl))(0.5)
    assert g == 0


# --- contract -------------------------------------------------------------------------


def test_masked_entries_with_nan_give_zero_and_zero_grads():
    rng = np.random.default_rng(6)
    data = [np.array(x) for x in _logps(rng, 6)]
    where = np.array([True, False, True, False, True, True])
    for x in data:
        x[1] = np.nan
        x[3] = np.inf
    lc = np.full(6, 4.0, np.float32)
    fns = [
        functools.partial(lossjax.dpo_loss, loss_type=t, where=where,
                          chosen_lengths=lc, rejected_lengths=lc)
        for t in DPO_LOSS_TYPES
    ] + [
        lambda c, r, *_: lossjax.orpo_loss(c, r, chosen_lengths=lc,
                                           rejected_lengths=lc, where=where),
        lambda c, r, *_: lossjax.simpo_loss(c, r, where=where),
        lambda c, r, *_: lossjax.cpo_loss(c, r, where=where),
        lambda c, r, *_: lossjax.kto_loss(c, r, np.arange(6) % 2 == 0, where=where),
    ]
    for f in fns:
        loss, g = jax.value_and_grad(f, argnums=(0, 1, 2, 3))(*data)
        assert np.isfinite(loss)
        for gi in g:
            assert np.all(np.isfinite(gi)) and not np.any(np.asarray(gi)[~where])
    # Nothing kept: 0 with zero, finite gradients.
    none = np.zeros(6, bool)
    v, g = jax.value_and_grad(lambda c: lossjax.dpo_loss(c, *data[1:], where=none))(
        data[0])
    assert v == 0 and np.all(np.asarray(g) == 0)


def test_finite_at_extreme_values():
    big = np.array([-1e4, -1.0], np.float32)
    small = np.array([-1.0, -1e4], np.float32)
    for t in DPO_LOSS_TYPES:
        if t in ("ipo", "sppo_hard"):
            continue  # quadratic: large, but finite, values below
        v, g = jax.value_and_grad(lambda c, t=t: lossjax.dpo_loss(
            c, small, big, small, loss_type=t))(big)
        assert np.isfinite(v) and np.all(np.isfinite(g)), t
    v, g = jax.value_and_grad(lambda c: lossjax.simpo_loss(c, small))(big)
    assert np.isfinite(v) and np.all(np.isfinite(g))


def test_bfloat16_inputs():
    rng = np.random.default_rng(7)
    data = _logps(rng, 8)
    lo = tuple(jnp.asarray(x, jnp.bfloat16) for x in data)
    for t in ("sigmoid", "hinge", "apo_zero"):
        got = lossjax.dpo_loss(*lo, loss_type=t)
        assert got.dtype == jnp.float32
        want = lossjax.dpo_loss(*(jnp.asarray(x, jnp.float32) for x in lo),
                                loss_type=t)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        g = jax.grad(lambda c, t=t: lossjax.dpo_loss(c, *lo[1:], loss_type=t))(lo[0])
        assert g.dtype == jnp.bfloat16


def test_jit_and_vmap():
    rng = np.random.default_rng(8)
    data = np.stack(_logps(rng, 12)).reshape(4, 3, 4)  # [4 args, 3 batches, 4 pairs]
    f = functools.partial(lossjax.dpo_loss, loss_type="sigmoid", beta=0.2)
    batched = jax.vmap(f, in_axes=(0, 0, 0, 0))(*data)
    loop = np.stack([f(*data[:, i]) for i in range(3)])
    np.testing.assert_allclose(batched, loop, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(f)(*data[:, 0]), f(*data[:, 0]), rtol=1e-6)


class VariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_under_variants(self):
        rng = np.random.default_rng(17)
        data = _logps(rng, 6)
        hc, hr, w, bias, yc, yr, ref_c, ref_r = _dpo_inputs(rng)

        @self.variant
        def f(c, r, rc, rr, hc, hr, w):
            return (lossjax.dpo_loss(c, r, rc, rr, loss_type="nca_pair"),
                    lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r,
                                            block_size=32))

        got = f(*data, hc, hr, w)
        want = (lossjax.dpo_loss(*data, loss_type="nca_pair"),
                lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r,
                                        block_size=32))
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bad_inputs_raise():
    a = np.zeros(4, np.float32) - 1
    with pytest.raises(ValueError, match="loss_type"):
        lossjax.dpo_loss(a, a, a, a, loss_type="dpo")
    with pytest.raises(ValueError, match="chosen_lengths"):
        lossjax.dpo_loss(a, a, a, a, loss_type="ipo")
    with pytest.raises(ValueError, match="beta"):
        lossjax.dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        lossjax.dpo_loss(a, a, a, a, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="rejected_logps"):
        lossjax.dpo_loss(a, a[:3], a, a)
    with pytest.raises(ValueError, match="reduction"):
        lossjax.dpo_loss(a, a, a, a, reduction="batchmean")
    with pytest.raises(TypeError):
        lossjax.orpo_loss(np.arange(4), a)
    with pytest.raises(ValueError, match="chosen_lengths"):
        lossjax.simpo_loss(a, a, chosen_lengths=np.ones(3))
    with pytest.raises(TypeError):
        lossjax.kto_loss(a, a, np.ones(4))  # desirable must be bool
    with pytest.raises(ValueError, match="gamma|beta"):
        lossjax.simpo_loss(a, a, beta=-1.0)


def test_checked_mode_catches_nan():
    a = -np.ones(4, np.float32)
    bad = a.copy()
    bad[2] = np.nan
    with pytest.raises(AssertionError, match="lossjax.dpo_loss"):
        lossjax.checked(lossjax.dpo_loss)(bad, a, a, a)
    # The same NaN in an excluded pair is fine.
    where = np.array([True, True, False, True])
    lossjax.checked(lossjax.dpo_loss)(bad, a, a, a, where=where)


# --- the fused sequence log-probabilities ---------------------------------------------

B, S, D, V = 4, 6, 8, 80


def _head(rng, b=B, s=S, d=D, v=V):
    h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(v,)) * 0.1, jnp.float32)
    y = rng.integers(0, v, (b, s))
    y[:, :2] = -100  # the prompt
    y[1, -1] = -100  # padding
    return h, w, bias, jnp.asarray(y, jnp.int32)


def _materialized_logps(h, w, y, bias=None, cap=None):
    x = h @ w
    if bias is not None:
        x = x + bias
    if cap is not None:
        x = cap * jnp.tanh(x / cap)
    logp = jax.nn.log_softmax(x, axis=-1)
    kept = y != -100
    t = jnp.take_along_axis(logp, jnp.where(kept, y, 0)[..., None], -1)[..., 0]
    return jnp.where(kept, t, 0).sum(-1), kept.sum(-1)


@pytest.mark.parametrize("options", ["plain", "bias_softcap"])
def test_sequence_logprobs_match_materialized_and_reference(options):
    rng = np.random.default_rng(9)
    h, w, bias, y = _head(rng)
    kw = dict(bias=bias, logit_softcap=jnp.float32(3.0)) if options != "plain" else {}
    lp, counts = lossjax.linear_sequence_logprobs(h, w, y, block_size=32, **kw)
    ref, ref_counts = np_sequence_logprobs(
        h, w, y, b=bias if kw else None, cap=3.0 if kw else None)
    np.testing.assert_allclose(lp, ref, rtol=1e-5)
    np.testing.assert_array_equal(counts, ref_counts)
    cot = jnp.asarray(rng.normal(size=B), jnp.float32)

    def fused(h, w, b, cap):
        kw = dict(bias=b, logit_softcap=cap) if options != "plain" else {}
        return jnp.sum(cot * jnp.sin(lossjax.linear_sequence_logprobs(
            h, w, y, block_size=32, **kw)[0]))

    def naive(h, w, b, cap):
        kw = dict(bias=b, cap=cap) if options != "plain" else {}
        return jnp.sum(cot * jnp.sin(_materialized_logps(h, w, y, **kw)[0]))

    args = (h, w, bias, jnp.float32(3.0))
    v1, g1 = jax.value_and_grad(fused, argnums=(0, 1, 2, 3))(*args)
    v2, g2 = jax.value_and_grad(naive, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(v1, v2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        if np.linalg.norm(np.asarray(b)) > 0:
            assert _rel(a, b) < 1e-5
    # The per-token sibling sums to the same values.
    tok = lossjax.linear_token_logprobs(h, w, y, block_size=32, **kw)
    assert tok.shape == y.shape
    np.testing.assert_allclose(tok.sum(-1), lp, rtol=1e-6)


def test_sequence_logprobs_where_nan_and_out_of_range():
    rng = np.random.default_rng(10)
    h, w, _, y = _head(rng)
    h = h.at[0, 0].set(jnp.nan)  # a prompt token: excluded
    where = jnp.ones(y.shape, bool).at[2, 3].set(False)
    lp, counts = lossjax.linear_sequence_logprobs(h, w, y, where=where)
    g = jax.grad(lambda h: lossjax.linear_sequence_logprobs(
        h, w, y, where=where)[0].sum())(h)
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(g))
    assert not np.any(np.asarray(g)[0, 0]) and not np.any(np.asarray(g)[2, 3])
    assert counts[2] == int((y[2] != -100).sum()) - 1
    bad = y.at[3, 4].set(V)
    lp = lossjax.linear_sequence_logprobs(h, w, bad, where=where)[0]
    assert np.isnan(lp[3]) and np.all(np.isfinite(lp[:3]))


# --- the fused DPO --------------------------------------------------------------------


def _dpo_inputs(rng, b=B):
    hc, w, bias, yc = _head(rng, b=b)
    hr, _, _, yr = _head(rng, b=b)
    ref_c = jnp.asarray(-rng.uniform(10, 30, b), jnp.float32)
    ref_r = jnp.asarray(-rng.uniform(10, 30, b), jnp.float32)
    return hc, hr, w, bias, yc, yr, ref_c, ref_r


def _naive_dpo(hc, hr, w, yc, yr, ref_c, ref_r, *, bias=None, logit_softcap=None,
               **kw):
    c, nc = _materialized_logps(hc, w, yc, bias, logit_softcap)
    r, nr = _materialized_logps(hr, w, yr, bias, logit_softcap)
    if kw.get("loss_type") == "ipo":
        kw = dict(kw, chosen_lengths=nc, rejected_lengths=nr)
    return lossjax.dpo_loss(c, r, ref_c, ref_r, **kw)


@pytest.mark.parametrize("loss_type,options", [
    ("sigmoid", dict(label_smoothing=0.1)),
    ("ipo", dict(logit_softcap=4.0)),
    ("apo_down", dict(reduction="none")),
])
def test_linear_dpo_matches_materialized(loss_type, options):
    rng = np.random.default_rng(11)
    hc, hr, w, bias, yc, yr, ref_c, ref_r = _dpo_inputs(rng)
    where = jnp.array([True, True, False, True])
    weights = jnp.asarray(rng.uniform(0.5, 2, B), jnp.float32)
    kw = dict(loss_type=loss_type, beta=0.2, where=where, weights=weights, **options)
    cot = jnp.asarray(rng.normal(size=B), jnp.float32)

    def scalar(x):
        return jnp.sum(cot * x) if x.ndim else x

    def fused(hc, hr, w, bias):
        return scalar(lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r,
                                              bias=bias, block_size=32, **kw))

    def naive(hc, hr, w, bias):
        return scalar(_naive_dpo(hc, hr, w, yc, yr, ref_c, ref_r, bias=bias, **kw))

    args = (hc, hr, w, bias)
    v1, g1 = jax.value_and_grad(fused, argnums=range(4))(*args)
    v2, g2 = jax.value_and_grad(naive, argnums=range(4))(*args)
    np.testing.assert_allclose(v1, v2, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, g2, strict=True):
        assert _rel(a, b) < 1e-5
    if loss_type != "ipo":  # ipo's rewards are of length-normalized log-probs
        _, cr, _ = lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r,
                                           bias=bias, return_rewards=True, **kw)
        c, _ = _materialized_logps(hc, w, yc, bias, options.get("logit_softcap"))
        np.testing.assert_allclose(cr, np.where(where, 0.2 * (c - ref_c), 0),
                                   rtol=1e-5, atol=1e-6)


def _subjaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def _all_shapes(jaxpr):
    for v in list(jaxpr.invars) + list(jaxpr.outvars) + list(jaxpr.constvars):
        yield getattr(v.aval, "shape", ())
    for eqn in jaxpr.eqns:
        for v in list(eqn.invars) + list(eqn.outvars):
            yield getattr(v.aval, "shape", ())
        for param in eqn.params.values():
            for sub in _subjaxprs(param):
                yield from _all_shapes(sub)


def token_vocab_buffers(fn, *args, tokens, vocab):
    """Every value in fn's jaxpr holding tokens x vocab entries (or more)."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [s for s in _all_shapes(jaxpr)
            if (tokens in s and vocab in s) or int(np.prod(s)) >= tokens * vocab]


def test_no_token_by_vocab_buffer_in_jaxpr():
    rng = np.random.default_rng(12)
    b, s, d, v = 4, 24, 8, 320  # 2 * 4 * 24 = 192 tokens; d * V < tokens * V
    hc, w, bias, yc = _head(rng, b=b, s=s, d=d, v=v)
    hr, _, _, yr = _head(rng, b=b, s=s, d=d, v=v)
    ref = jnp.zeros(b)
    tokens = 2 * b * s

    def fused(hc, hr, w):
        return lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref, ref, bias=bias,
                                       logit_softcap=5.0, block_size=64)

    def naive(hc, hr, w):
        return _naive_dpo(hc, hr, w, yc, yr, ref, ref, bias=bias, logit_softcap=5.0)

    vg = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2))  # noqa: E731
    # The detector sees the materialized logits (per response: b * s tokens) ...
    assert token_vocab_buffers(vg(naive), hc, hr, w, tokens=b * s, vocab=v)
    # ... and nothing of the fused loss, forward or backward.
    assert not token_vocab_buffers(vg(fused), hc, hr, w, tokens=b * s, vocab=v)
    assert not token_vocab_buffers(vg(fused), hc, hr, w, tokens=tokens, vocab=v)


def test_compiled_temp_memory_far_below_logits():
    b, s, d, v = 4, 64, 16, 8192
    hc = jax.ShapeDtypeStruct((b, s, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((b, s), jnp.int32)
    ref = jax.ShapeDtypeStruct((b,), jnp.float32)

    def temp_bytes(f):
        vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        return vg.lower(hc, hc, w, y, y, ref, ref).compile().memory_analysis(
        ).temp_size_in_bytes

    logits_bytes = 2 * b * s * v * 4
    naive = temp_bytes(lambda hc, hr, w, yc, yr, a, r: _naive_dpo(
        hc, hr, w, yc, yr, a, r))
    fused = temp_bytes(lambda hc, hr, w, yc, yr, a, r: lossjax.linear_dpo_loss(
        hc, hr, w, yc, yr, a, r, block_size=256))
    assert naive >= logits_bytes / 2
    assert fused < logits_bytes / 4, (fused, logits_bytes)


def test_bfloat16_fused_dpo():
    rng = np.random.default_rng(13)
    hc, hr, w, bias, yc, yr, ref_c, ref_r = _dpo_inputs(rng)
    lo = [x.astype(jnp.bfloat16) for x in (hc, hr, w)]
    got = lossjax.linear_dpo_loss(*lo, yc, yr, ref_c, ref_r, block_size=32)
    assert got.dtype == jnp.float32
    want = lossjax.linear_dpo_loss(*(x.astype(jnp.float32) for x in lo), yc, yr,
                                   ref_c, ref_r, block_size=32)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    g = jax.grad(lambda w: lossjax.linear_dpo_loss(
        lo[0], lo[1], w, yc, yr, ref_c, ref_r, block_size=32))(lo[2])
    assert g.dtype == jnp.bfloat16


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def test_shard_map_batch_sharded_equals_one_device():
    rng = np.random.default_rng(14)
    hc, hr, w, bias, yc, yr, ref_c, ref_r = _dpo_inputs(rng, b=8)
    where = jnp.asarray(rng.random(8) > 0.3)
    kw = dict(beta=0.2, block_size=32, logit_softcap=4.0)

    def single(hc, hr, w):
        return lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r, where=where,
                                       **kw)

    def local(hc, hr, w, yc, yr, ref_c, ref_r, where):
        return lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r, where=where,
                                       axis_name="data", **kw)

    d = P("data")
    sharded = jax.shard_map(local, mesh=_mesh((8,), ("data",)),
                            in_specs=(d, d, P(), d, d, d, d, d), out_specs=P())
    run = jax.jit(jax.value_and_grad(
        lambda hc, hr, w: sharded(hc, hr, w, yc, yr, ref_c, ref_r, where),
        argnums=(0, 1, 2)))
    v2, g2 = run(hc, hr, w)
    v1, g1 = jax.value_and_grad(single, argnums=(0, 1, 2))(hc, hr, w)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    for a, b in zip(g2, g1, strict=True):
        assert _rel(a, b) < 1e-5


def test_two_by_four_mesh_batch_and_vocab_axes():
    # In float64: the traced softcap's gradient is a scalar sum with cancellation,
    # whose float32 rounding differs with the summation order (2e-5 relative);
    # in float64 every gradient agrees to 1e-10.
    rng = np.random.default_rng(15)
    with jax.enable_x64(True):
        _two_by_four_mesh(rng)


def _two_by_four_mesh(rng):
    hc, hr, w, bias, yc, yr, ref_c, ref_r = (
        x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for x in _dpo_inputs(rng, b=4))
    yc = yc.at[0, 3].set(V - 1).at[1, 3].set(0)  # labels in the last and first shard
    kw = dict(beta=0.2, block_size=8, loss_type="ipo")

    def single(hc, hr, w, bias, cap):
        return lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r, bias=bias,
                                       logit_softcap=cap, **kw)

    def local(hc, hr, w, bias, cap, yc, yr, ref_c, ref_r):
        return lossjax.linear_dpo_loss(hc, hr, w, yc, yr, ref_c, ref_r, bias=bias,
                                       logit_softcap=cap, axis_name="data",
                                       vocab_axis_name="model", **kw)

    d = P("data")
    sharded = jax.shard_map(
        local, mesh=_mesh((2, 4), ("data", "model")),
        in_specs=(d, d, P(None, "model"), P("model"), P(), d, d, d, d), out_specs=P())
    args = (hc, hr, w, bias, jnp.float64(4.0))
    run = jax.jit(jax.value_and_grad(
        lambda *a: sharded(*a, yc, yr, ref_c, ref_r), argnums=range(5)))
    v2, g2 = run(*args)
    v1, g1 = jax.value_and_grad(single, argnums=range(5))(*args)
    np.testing.assert_allclose(v2, v1, rtol=1e-10)
    for a, b in zip(g2, g1, strict=True):
        assert _rel(a, b) < 1e-10

    # The primitive alone on the vocab axis: per-sequence values equal one device's.
    def lp_local(h, w):
        return lossjax.linear_sequence_logprobs(h, w, yc, block_size=8,
                                                vocab_axis_name="model")[0]

    got = jax.jit(jax.shard_map(lp_local, mesh=_mesh((2, 4), ("data", "model")),
                                in_specs=(P(), P(None, "model")), out_specs=P()))(hc, w)
    np.testing.assert_allclose(
        got, lossjax.linear_sequence_logprobs(hc, w, yc)[0], rtol=1e-10)


def test_pmap_vocab_parallel_gradients():
    rng = np.random.default_rng(16)
    h, w, _, y = _head(rng, b=2, v=64)
    shards = 8

    def local(w_shard):
        lp = lossjax.linear_sequence_logprobs(h, w_shard, y, block_size=4,
                                              vocab_axis_name="v")[0]
        return jnp.sum(jnp.sin(lp))

    g = jax.pmap(jax.grad(local), axis_name="v")(
        jnp.stack(jnp.split(w, shards, axis=1)))
    want = jax.grad(lambda w: jnp.sum(jnp.sin(_materialized_logps(h, w, y)[0])))(w)
    assert _rel(jnp.concatenate(list(g), axis=1), want) < 1e-5


# --- the cross-device matrix (tests/test_matrix.py) -----------------------------------


def _logps_data(rng, batch):
    return tuple(-rng.uniform(5.0, 30.0, batch).astype(np.float32) for _ in range(4))


def _lengths(rng, batch):
    return dict(chosen_lengths=rng.integers(3, 20, batch).astype(np.float32),
                rejected_lengths=rng.integers(3, 20, batch).astype(np.float32))


def _pair_data(rng, batch):
    c, r, _, _ = _pairs(rng, batch)
    return c, r


def _kto_data(rng, batch):
    p, q = (-rng.uniform(5, 30, batch).astype(np.float32) for _ in range(2))
    return p, q, rng.random(batch) > 0.5


def _linear_dpo_data(rng, batch):
    s, d, v = 4, 8, 24
    hc = rng.normal(size=(batch, s, d)).astype(np.float32)
    hr = rng.normal(size=(batch, s, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    yc = rng.integers(0, v, (batch, s)).astype(np.int32)
    yr = rng.integers(0, v, (batch, s)).astype(np.int32)
    yc[:, 0] = yr[:, 0] = -100
    ref = -rng.uniform(5, 15, (2, batch)).astype(np.float32)
    return hc, hr, w, yc, yr, ref[0], ref[1]


MATRIX_CASES = [
    MatrixCase("dpo_loss", _logps_data, kwargs=dict(beta=0.2, label_smoothing=0.1),
               traced=dict(beta=0.2, label_smoothing=0.1), id="sigmoid"),
    MatrixCase("dpo_loss", _logps_data, kwargs=dict(loss_type="ipo", beta=0.5),
               batch_kwargs=_lengths, traced=dict(beta=0.5), id="ipo"),
    MatrixCase("dpo_loss", _logps_data, kwargs=dict(loss_type="bco_pair"),
               traced=dict(bco_delta=0.3), id="bco_pair"),
    MatrixCase("orpo_loss", _pair_data, kwargs=dict(beta=0.2),
               batch_kwargs=_lengths, traced=dict(beta=0.2)),
    MatrixCase("simpo_loss", _pair_data, kwargs=dict(beta=2.0, gamma=0.5),
               batch_kwargs=_lengths, traced=dict(beta=2.0, gamma=0.5)),
    MatrixCase("cpo_loss", _pair_data, kwargs=dict(alpha=0.5),
               batch_kwargs=lambda rng, b: dict(
                   chosen_lengths=_lengths(rng, b)["chosen_lengths"]),
               traced=dict(beta=0.1, alpha=0.5)),
    MatrixCase("kto_loss", _kto_data, kwargs=dict(beta=0.2),
               replicated_kwargs=lambda rng: dict(kl=np.float32(0.4)),
               traced=dict(beta=0.2, desirable_weight=1.3)),
    MatrixCase("linear_dpo_loss", _linear_dpo_data,
               kwargs=dict(block_size=16, logit_softcap=5.0), replicated=(2,),
               traced=dict(beta=0.1, logit_softcap=5.0)),
]


def test_registered():
    for name in ("dpo_loss", "orpo_loss", "simpo_loss", "cpo_loss", "kto_loss",
                 "linear_dpo_loss"):
        assert lossjax.get(name) is getattr(lossjax, name)
        assert lossjax.family_of(name) == "preference"
