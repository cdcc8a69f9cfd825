"""Distillation losses: KD with T^2, GKD's generalized JSD, and their fused forms.

References are float64 NumPy, written from the formulas, never calling lossjax.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from loss_cases import MatrixCase
from test_preference import token_vocab_buffers

import lossjax

# --- float64 NumPy references -----------------------------------------------------


def _np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_soft(x, temperature, cap):
    x = np.asarray(x, np.float64)
    if cap is not None:
        x = cap * np.tanh(x / cap)
    return _np_log_softmax(x / temperature)


def _np_kl(lp, lq):
    return np.sum(np.exp(lp) * (lp - lq), -1)


def np_kd(s, t, temperature=1.0, s_cap=None, t_cap=None):
    ls, lt = _np_soft(s, temperature, s_cap), _np_soft(t, temperature, t_cap)
    return temperature**2 * _np_kl(lt, ls)


def np_jsd(s, t, beta=0.5, temperature=1.0, s_cap=None, t_cap=None):
    ls, lt = _np_soft(s, temperature, s_cap), _np_soft(t, temperature, t_cap)
    if beta == 0:
        return _np_kl(lt, ls)
    if beta == 1:
        return _np_kl(ls, lt)
    m = (1 - beta) * np.exp(ls) + beta * np.exp(lt)
    return beta * _np_kl(lt, np.log(m)) + (1 - beta) * _np_kl(ls, np.log(m))


def np_reduce(loss, where, weights, reduction):
    w = np.ones_like(loss) if weights is None else np.asarray(weights, np.float64)
    k = np.ones(loss.shape, bool) if where is None else np.asarray(where)
    wl = np.where(k, w * np.where(k, loss, 0), 0)
    if reduction == "none":
        return wl
    if reduction == "sum":
        return wl.sum()
    return wl.sum() / np.where(k, w, 0).sum()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _logits(rng, n=12, v=20, scale=3.0):
    return tuple(jnp.asarray(rng.normal(size=(n, v)) * scale, jnp.float32)
                 for _ in range(2))


# --- on logits --------------------------------------------------------------------


@pytest.mark.parametrize("temperature,caps", [(1.0, (None, None)), (2.0, (None, 4.0)),
                                              (0.5, (3.0, 5.0))])
def test_distillation_matches_float64_reference(temperature, caps):
    rng = np.random.default_rng(0)
    s, t = _logits(rng)
    where = rng.random(12) > 0.2
    weights = rng.uniform(0.5, 2, 12).astype(np.float32)
    kw = dict(temperature=temperature, student_logit_softcap=caps[0],
              teacher_logit_softcap=caps[1])
    ref = np_kd(s, t, temperature, *caps)
    for reduction in ("none", "sum", "mean"):
        got = lossjax.distillation_loss(s, t, where=where, weights=weights,
                                        reduction=reduction, **kw)
        np.testing.assert_allclose(got, np_reduce(ref, where, weights, reduction),
                                   rtol=2e-5, atol=1e-6)
    with jax.enable_x64(True):
        wide = (np.float64(s), np.float64(t))
        np.testing.assert_allclose(
            lossjax.distillation_loss(*wide, reduction="none", **kw), ref, rtol=1e-10)
        jax.test_util.check_grads(lambda s, t: lossjax.distillation_loss(s, t, **kw),
                                  wide, order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_distillation_T_squared_and_axis():
    rng = np.random.default_rng(1)
    s, t = _logits(rng)
    # Sibling identity: T^2 * KL(teacher_T || student_T) is T^2 times the KL of
    # the softened logits (kl_divergence_with_logits(teacher, student)).
    a = lossjax.distillation_loss(s, t, temperature=3.0, reduction="none")
    np.testing.assert_allclose(a, 9.0 * lossjax.kl_divergence_with_logits(
        t / 3.0, s / 3.0, reduction="none"), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        lossjax.distillation_loss(s.T, t.T, axis=0, reduction="none"),
        lossjax.distillation_loss(s, t, reduction="none"), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_float64_reference(beta):
    rng = np.random.default_rng(2)
    s, t = _logits(rng)
    kw = dict(beta=beta, temperature=1.5, teacher_logit_softcap=6.0)
    ref = np_jsd(s, t, beta, 1.5, None, 6.0)
    np.testing.assert_allclose(
        lossjax.generalized_jsd_loss(s, t, reduction="none", **kw), ref,
        rtol=2e-5, atol=1e-6)
    # A traced beta selects the same branch, endpoints included.
    traced = jax.jit(lambda b: lossjax.generalized_jsd_loss(
        s, t, beta=b, temperature=1.5, teacher_logit_softcap=6.0, reduction="none"))
    np.testing.assert_allclose(traced(jnp.float32(beta)), ref, rtol=2e-5, atol=1e-6)
    g = jax.grad(lambda b: lossjax.generalized_jsd_loss(s, t, beta=b))(
        jnp.float32(beta))
    assert np.isfinite(g)
    with jax.enable_x64(True):
        wide = (np.float64(s), np.float64(t))
        jax.test_util.check_grads(lambda s, t: lossjax.generalized_jsd_loss(
            s, t, **kw), wide, order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_generalized_jsd_endpoints_are_discontinuous():
    rng = np.random.default_rng(3)
    s, t = _logits(rng, n=4)
    near0 = lossjax.generalized_jsd_loss(s, t, beta=1e-6)
    at0 = lossjax.generalized_jsd_loss(s, t, beta=0.0)
    near1 = lossjax.generalized_jsd_loss(s, t, beta=1 - 1e-6)
    at1 = lossjax.generalized_jsd_loss(s, t, beta=1.0)
    assert near0 < 1e-3 < at0 and near1 < 1e-3 < at1
    np.testing.assert_allclose(at0, np.mean(np_kd(s, t)), rtol=1e-5)  # KL(T || S)
    np.testing.assert_allclose(at1, np.mean(_np_kl(_np_soft(s, 1, None),
                                                   _np_soft(t, 1, None))), rtol=1e-5)


def test_contract_on_logits():
    rng = np.random.default_rng(4)
    s, t = (np.array(x) for x in _logits(rng, n=6))
    where = np.array([True, False, True, True, False, True])
    s[1, 0], t[4, 2] = np.nan, np.inf
    for f in (lossjax.distillation_loss, lossjax.generalized_jsd_loss):
        v, g = jax.value_and_grad(lambda s, t, f=f: f(s, t, where=where),
                                  argnums=(0, 1))(s, t)
        assert np.isfinite(v)
        for gi in g:
            assert np.all(np.isfinite(gi)) and not np.any(np.asarray(gi)[~where])
        v, g = jax.value_and_grad(lambda s, f=f: f(s, t, where=np.zeros(6, bool)))(s)
        assert v == 0 and not np.any(np.asarray(g))
        big = jnp.asarray(rng.normal(size=(3, 8)) * 1e4, jnp.float32)
        v, g = jax.value_and_grad(lambda a, f=f: f(a, -a))(big)
        assert np.isfinite(v) and np.all(np.isfinite(g))
        lo = jnp.asarray(s[where], jnp.bfloat16)
        tl = jnp.asarray(t[where], jnp.bfloat16)
        got = f(lo, tl)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, f(lo.astype(jnp.float32),
                                          tl.astype(jnp.float32)), rtol=1e-6)
        assert jax.grad(lambda a, f=f, tl=tl: f(a, tl))(lo).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="temperature"):
        lossjax.distillation_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        lossjax.generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        lossjax.distillation_loss(s, t[:, :3])
    with pytest.raises(TypeError):
        lossjax.distillation_loss(s, np.zeros(t.shape, np.int32))
    with pytest.raises(ValueError, match="student_logit_softcap"):
        lossjax.distillation_loss(s, t, student_logit_softcap=-1.0)
    bad = np.array(s[where])
    bad[0, 0] = np.nan
    with pytest.raises(AssertionError, match="lossjax.distillation_loss"):
        lossjax.checked(lossjax.distillation_loss)(bad, t[where])


class VariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_under_variants(self):
        rng = np.random.default_rng(12)
        s, t = _logits(rng, n=6)
        sh, sk, th, tk, _, _ = _heads(rng, n=8)

        @self.variant
        def f(s, t, sh, sk, th, tk):
            return (lossjax.distillation_loss(s, t, temperature=2.0),
                    lossjax.linear_generalized_jsd_loss(sh, sk, th, tk, beta=0.2))

        want = (lossjax.distillation_loss(s, t, temperature=2.0),
                lossjax.linear_generalized_jsd_loss(sh, sk, th, tk, beta=0.2))
        np.testing.assert_allclose(f(s, t, sh, sk, th, tk), want, rtol=1e-6)


def test_vmap_equals_the_batched_call():
    rng = np.random.default_rng(13)
    s, t = _logits(rng, n=12)
    s3, t3 = s.reshape(3, 4, -1), t.reshape(3, 4, -1)
    got = jax.vmap(lambda a, b: lossjax.distillation_loss(a, b, reduction="none"))(
        s3, t3)
    np.testing.assert_allclose(
        got, lossjax.distillation_loss(s3, t3, reduction="none"), rtol=1e-6)


# --- fused with the heads ---------------------------------------------------------

N, DS, DT, V = 40, 8, 12, 96


def _heads(rng, n=N, v=V):
    sh = jnp.asarray(rng.normal(size=(n, DS)), jnp.float32)
    sk = jnp.asarray(rng.normal(size=(DS, v)) / np.sqrt(DS) * 2, jnp.float32)
    th = jnp.asarray(rng.normal(size=(n, DT)), jnp.float32)
    tk = jnp.asarray(rng.normal(size=(DT, v)) / np.sqrt(DT) * 2, jnp.float32)
    sb, tb = (jnp.asarray(rng.normal(size=(v,)) * 0.1, jnp.float32) for _ in range(2))
    return sh, sk, th, tk, sb, tb


FUSED = {
    "kd": (lossjax.linear_distillation_loss, lossjax.distillation_loss,
           dict(temperature=2.0)),
    "kd_caps": (lossjax.linear_distillation_loss, lossjax.distillation_loss,
                dict(temperature=1.5, student_logit_softcap=4.0,
                     teacher_logit_softcap=3.0)),
    "jsd": (lossjax.linear_generalized_jsd_loss, lossjax.generalized_jsd_loss,
            dict(beta=0.3, temperature=1.2, teacher_logit_softcap=5.0)),
    "jsd_beta0": (lossjax.linear_generalized_jsd_loss, lossjax.generalized_jsd_loss,
                  dict(beta=0.0)),
}


@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_matches_materialized(name, reduction):
    fused_fn, naive_fn, kw = FUSED[name]
    rng = np.random.default_rng(5)
    sh, sk, th, tk, sb, tb = _heads(rng)
    where = jnp.asarray(rng.random(N) > 0.2)
    weights = jnp.asarray(rng.uniform(0.5, 2, N), jnp.float32)
    cot = jnp.asarray(rng.normal(size=N), jnp.float32)
    common = dict(where=where, weights=weights, reduction=reduction, **kw)

    def scalar(x):
        return jnp.sum(cot * x) if x.ndim else x

    def fused(sh, sk, th, tk, sb, tb):
        # 40 tokens in blocks of 16: two full blocks and a padded one.
        return scalar(fused_fn(sh, sk, th, tk, student_bias=sb, teacher_bias=tb,
                               block_tokens=16, **common))

    def naive(sh, sk, th, tk, sb, tb):
        return scalar(naive_fn(sh @ sk + sb, th @ tk + tb, **common))

    args = (sh, sk, th, tk, sb, tb)
    v1, g1 = jax.value_and_grad(fused, argnums=range(6))(*args)
    v2, g2 = jax.value_and_grad(naive, argnums=range(6))(*args)
    np.testing.assert_allclose(v1, v2, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, g2, strict=True):
        assert _rel(a, b) < 1e-5


def test_fused_traced_hyperparameters_and_default_blocks():
    rng = np.random.default_rng(6)
    sh, sk, th, tk, _, _ = _heads(rng)

    def fused(temp, beta, cap):
        return lossjax.linear_generalized_jsd_loss(
            sh, sk, th, tk, beta=beta, temperature=temp, student_logit_softcap=cap)

    def naive(temp, beta, cap):
        return lossjax.generalized_jsd_loss(sh @ sk, th @ tk, beta=beta,
                                            temperature=temp,
                                            student_logit_softcap=cap)

    args = (jnp.float32(1.7), jnp.float32(0.4), jnp.float32(3.0))
    v1, g1 = jax.jit(jax.value_and_grad(fused, argnums=range(3)))(*args)
    v2, g2 = jax.value_and_grad(naive, argnums=range(3))(*args)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-5)


def test_topk_form():
    rng = np.random.default_rng(7)
    sh, sk, th, tk, sb, _ = _heads(rng)
    t_logits = th @ tk
    temp = 2.0
    lq = jax.nn.log_softmax(t_logits / temp, axis=-1)
    # With every id as the "top-k" it is distillation_loss.
    ids = jnp.broadcast_to(jnp.arange(V), (N, V))
    full = lossjax.linear_topk_distillation_loss(
        sh, sk, lq, ids, temperature=temp, student_bias=sb, block_tokens=16,
        reduction="none")
    np.testing.assert_allclose(full, lossjax.distillation_loss(
        sh @ sk + sb, t_logits, temperature=temp, reduction="none"), rtol=1e-5,
        atol=1e-6)
    # Top-8, against the float64 formula; gradients against the materialized form.
    k = 8
    top_lq, top_ids = jax.lax.top_k(lq, k)
    where = jnp.asarray(rng.random(N) > 0.2)
    ls = _np_soft(np.asarray(sh @ sk + sb), temp, 4.0)
    picked = np.take_along_axis(ls, np.asarray(top_ids), -1)
    q = np.exp(np.asarray(top_lq, np.float64))
    ref = temp**2 * np.sum(q * (np.asarray(top_lq, np.float64) - picked), -1)
    kw = dict(temperature=temp, student_bias=sb, student_logit_softcap=4.0,
              where=where)
    got = lossjax.linear_topk_distillation_loss(sh, sk, top_lq, top_ids,
                                                block_tokens=16, reduction="none",
                                                **kw)
    np.testing.assert_allclose(got, np.where(where, ref, 0), rtol=2e-5, atol=1e-6)

    def fused(sh, sk, top_lq):
        return lossjax.linear_topk_distillation_loss(sh, sk, top_lq, top_ids,
                                                     block_tokens=16, **kw)

    def naive(sh, sk, top_lq):
        x = sh @ sk + sb
        x = 4.0 * jnp.tanh(x / 4.0)
        ls = jax.nn.log_softmax(x / temp, -1)
        pk = jnp.take_along_axis(ls, top_ids, -1)
        per = temp**2 * jnp.sum(jnp.exp(top_lq) * (top_lq - pk), -1)
        return jnp.sum(jnp.where(where, per, 0)) / jnp.sum(where)

    v1, g1 = jax.value_and_grad(fused, argnums=range(3))(sh, sk, top_lq)
    v2, g2 = jax.value_and_grad(naive, argnums=range(3))(sh, sk, top_lq)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        assert _rel(a, b) < 1e-5
    # An out-of-range id makes its (kept) entry NaN, never a clamped index.
    bad = top_ids.at[3, 0].set(V)
    out = lossjax.linear_topk_distillation_loss(sh, sk, top_lq, bad,
                                                reduction="none")
    assert np.isnan(out[3]) and np.isfinite(np.delete(np.asarray(out), 3)).all()


def test_fused_no_token_by_vocab_buffer():
    rng = np.random.default_rng(8)
    n, v = 96, 320
    sh, sk, th, tk, sb, tb = _heads(rng, n=n, v=v)
    lq, ids = jax.lax.top_k(jax.nn.log_softmax(th @ tk), 4)
    vg = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2, 3))  # noqa: E731
    for fused_fn, naive_fn in ((lossjax.linear_distillation_loss,
                                lossjax.distillation_loss),
                               (lossjax.linear_generalized_jsd_loss,
                                lossjax.generalized_jsd_loss)):
        naive = lambda a, b, c, d, f=naive_fn: f(a @ b, c @ d)  # noqa: E731
        fused = lambda a, b, c, d, f=fused_fn: f(  # noqa: E731
            a, b, c, d, student_logit_softcap=5.0, teacher_logit_softcap=5.0)
        assert token_vocab_buffers(vg(naive), sh, sk, th, tk, tokens=n, vocab=v)
        assert not token_vocab_buffers(vg(fused), sh, sk, th, tk, tokens=n, vocab=v)
    topk = lambda a, b, c, d: lossjax.linear_topk_distillation_loss(  # noqa: E731
        a, b, lq, ids)
    assert not token_vocab_buffers(vg(topk), sh, sk, th, tk, tokens=n, vocab=v)


def test_fused_compiled_temp_memory_far_below_logits():
    n, v = 512, 8192
    shapes = (jax.ShapeDtypeStruct((n, DS), jnp.float32),
              jax.ShapeDtypeStruct((DS, v), jnp.float32),
              jax.ShapeDtypeStruct((n, DT), jnp.float32),
              jax.ShapeDtypeStruct((DT, v), jnp.float32))

    def temp_bytes(f):
        vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        return vg.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = n * v * 4
    naive = temp_bytes(lambda a, b, c, d: lossjax.distillation_loss(a @ b, c @ d))
    fused = temp_bytes(lambda a, b, c, d: lossjax.linear_distillation_loss(
        a, b, c, d, block_tokens=32))
    assert naive >= 2 * logits_bytes  # both models' logits
    assert fused < logits_bytes / 4, (fused, logits_bytes)


def test_fused_bfloat16():
    rng = np.random.default_rng(9)
    lo = [x.astype(jnp.bfloat16) for x in _heads(rng)[:4]]
    got = lossjax.linear_distillation_loss(*lo, temperature=2.0)
    assert got.dtype == jnp.float32
    want = lossjax.distillation_loss(*(
        (lo[0].astype(jnp.float32) @ lo[1].astype(jnp.float32),
         lo[2].astype(jnp.float32) @ lo[3].astype(jnp.float32))), temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    g = jax.grad(lambda a: lossjax.linear_distillation_loss(a, *lo[1:]))(lo[0])
    assert g.dtype == jnp.bfloat16


def test_fused_shard_map_batch_sharded():
    rng = np.random.default_rng(10)
    sh, sk, th, tk, sb, tb = _heads(rng, n=32)
    where = jnp.asarray(rng.random(32) > 0.3)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

    def local(sh, sk, th, tk, where):
        return lossjax.linear_generalized_jsd_loss(
            sh, sk, th, tk, beta=0.4, where=where, axis_name="data")

    d = P("data")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(d, P(), d, P(), d),
                            out_specs=P())
    v2, g2 = jax.jit(jax.value_and_grad(
        lambda *a: sharded(*a, where), argnums=range(4)))(sh, sk, th, tk)
    v1, g1 = jax.value_and_grad(lambda *a: lossjax.linear_generalized_jsd_loss(
        *a, beta=0.4, where=where), argnums=range(4))(sh, sk, th, tk)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    for a, b in zip(g2, g1, strict=True):
        assert _rel(a, b) < 1e-5


def test_fused_bad_inputs():
    rng = np.random.default_rng(11)
    sh, sk, th, tk, _, _ = _heads(rng)
    with pytest.raises(ValueError, match="teacher_hidden"):
        lossjax.linear_distillation_loss(sh, sk, th[:5], tk)
    with pytest.raises(ValueError, match="teacher_kernel"):
        lossjax.linear_distillation_loss(sh, sk, th, tk[:, :5])
    with pytest.raises(ValueError, match="student_hidden"):
        lossjax.linear_distillation_loss(sh, sk[:3], th, tk)
    with pytest.raises(ValueError, match="block_tokens"):
        lossjax.linear_distillation_loss(sh, sk, th, tk, block_tokens=0)
    with pytest.raises(ValueError, match="beta"):
        lossjax.linear_generalized_jsd_loss(sh, sk, th, tk, beta=-0.1)
    with pytest.raises(TypeError):
        lossjax.linear_topk_distillation_loss(sh, sk, th[:, :4],
                                              jnp.zeros((N, 4), jnp.float32))


# --- the cross-device matrix (tests/test_matrix.py) ------------------------------


def _logits_data(rng, batch):
    return tuple((rng.normal(size=(batch, 10)) * 2).astype(np.float32)
                 for _ in range(2))


def _heads_data(rng, batch):
    sh = rng.normal(size=(batch, 6)).astype(np.float32)
    sk = (rng.normal(size=(6, 24)) / 2).astype(np.float32)
    th = rng.normal(size=(batch, 5)).astype(np.float32)
    tk = (rng.normal(size=(5, 24)) / 2).astype(np.float32)
    return sh, sk, th, tk


def _topk_data(rng, batch):
    sh, sk, th, tk = _heads_data(rng, batch)
    lq = _np_log_softmax((th @ tk).astype(np.float64))
    ids = np.argsort(-lq, -1)[:, :5].astype(np.int32)
    return sh, sk, np.take_along_axis(lq, ids, -1).astype(np.float32), ids


MATRIX_CASES = [
    MatrixCase("distillation_loss", _logits_data,
               kwargs=dict(temperature=2.0, teacher_logit_softcap=5.0),
               traced=dict(temperature=2.0, teacher_logit_softcap=5.0)),
    MatrixCase("generalized_jsd_loss", _logits_data,
               kwargs=dict(beta=0.3, temperature=1.5),
               traced=dict(beta=0.3, temperature=1.5)),
    MatrixCase("linear_distillation_loss", _heads_data,
               kwargs=dict(temperature=2.0, block_tokens=4), replicated=(1, 3),
               traced=dict(temperature=2.0, student_logit_softcap=4.0)),
    MatrixCase("linear_generalized_jsd_loss", _heads_data,
               kwargs=dict(beta=0.6, block_tokens=4), replicated=(1, 3),
               traced=dict(beta=0.6)),
    MatrixCase("linear_topk_distillation_loss", _topk_data,
               kwargs=dict(temperature=1.5, block_tokens=4), replicated=(1,),
               traced=dict(temperature=1.5)),
]
