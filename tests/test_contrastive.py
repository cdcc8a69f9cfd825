"""Tests for lossjax.contrastive: float64 references, the contract, cross-device
exactness (with the matrix in test_matrix.py), the ring SigLIP and its memory.

The references below are written from the papers' formulas with NumPy loops in
float64 and never call lossjax. A dropped (`where=False`) entry is removed from the
batch before the reference runs: it is neither an anchor nor a candidate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
from loss_cases import MatrixCase

import lossjax

REDUCTIONS = ("none", "sum", "mean")


# --- float64 references -----------------------------------------------------------


def _lse(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ref_info_nce(q, k, temperature):
    logits = q @ k.T / temperature
    return np.array([_lse(logits[i]) - logits[i, i] for i in range(len(q))])


def ref_clip(a, b, temperature):
    return (ref_info_nce(a, b, temperature) + ref_info_nce(b, a, temperature)) / 2


def ref_siglip(a, b, temperature, bias):
    logits = a @ b.T / temperature + bias
    labels = 2 * np.eye(len(a)) - 1
    # -log sigmoid(z) = log(1 + e^-z)
    return np.sum(np.logaddexp(0, -labels * logits), axis=1)


def _pairs(labels):
    n = len(labels)
    pos = [[j for j in range(n) if j != i and labels[j] == labels[i]] for i in range(n)]
    neg = [[j for j in range(n) if labels[j] != labels[i]] for i in range(n)]
    return pos, neg


def ref_ntxent(e, labels, temperature):
    """(entries, has_entry): pytorch-metric-learning's per-pair terms, averaged per
    anchor."""
    s = _unit(e) @ _unit(e).T / temperature
    pos, neg = _pairs(labels)
    out, has = np.zeros(len(e)), np.zeros(len(e), bool)
    for i in range(len(e)):
        if not pos[i]:
            continue
        has[i] = True
        terms = []
        for p in pos[i]:
            num = np.exp(s[i, p])
            den = num + sum(np.exp(s[i, n]) for n in neg[i])
            terms.append(-np.log(num / den))
        out[i] = np.mean(terms)
    return out, has


def ref_supcon(e, labels, temperature):
    s = _unit(e) @ _unit(e).T / temperature
    pos, _ = _pairs(labels)
    out, has = np.zeros(len(e)), np.zeros(len(e), bool)
    for i in range(len(e)):
        if not pos[i]:
            continue
        has[i] = True
        others = [k for k in range(len(e)) if k != i]
        log_den = np.log(sum(np.exp(s[i, k]) for k in others))
        out[i] = -np.mean([s[i, p] - log_den for p in pos[i]])
    return out, has


def ref_batch_triplet(e, labels, margin, mining, p=2.0):
    n = len(e)
    d = np.array([[np.sum(np.abs(e[i] - e[j]) ** p) ** (1 / p) for j in range(n)]
                  for i in range(n)])
    pos, neg = _pairs(labels)
    out, has = np.zeros(n), np.zeros(n, bool)
    for a in range(n):
        if not pos[a] or not neg[a]:
            continue
        has[a] = True
        if mining == "hard":
            hardest_p = max(d[a, q] for q in pos[a])
            hardest_n = min(d[a, q] for q in neg[a])
            out[a] = max(hardest_p - hardest_n + margin, 0)
        elif mining == "semihard":
            terms = []
            for q in pos[a]:
                farther = [d[a, m] for m in neg[a] if d[a, m] > d[a, q]]
                chosen = min(farther) if farther else max(d[a, m] for m in neg[a])
                terms.append(max(d[a, q] - chosen + margin, 0))
            out[a] = np.mean(terms)
        else:
            out[a] = np.mean([max(d[a, q] - d[a, m] + margin, 0)
                              for q in pos[a] for m in neg[a]])
    return out, has


def ref_circle(e, labels, margin, gamma):
    """Keras's `circle` (remove_diagonal=True), transcribed term by term."""
    dist = np.maximum(1 - e @ e.T, 0)
    pos, neg = _pairs(labels)
    out, has = np.zeros(len(e)), np.zeros(len(e), bool)
    for i in range(len(e)):
        if not pos[i] or not neg[i]:
            continue
        has[i] = True
        p_terms = [-gamma * max(margin + dist[i, j], 0) * (margin - dist[i, j])
                   for j in pos[i]]
        n_terms = [gamma * max(1 + margin - dist[i, j], 0) * (1 - margin - dist[i, j])
                   for j in neg[i]]
        out[i] = np.logaddexp(0, _lse(np.array(p_terms)) + _lse(np.array(n_terms)))
    return out, has


# --- the table: each loss, its data, its reference ---------------------------------

B, D = 12, 6


def _towers(rng, batch=B, dim=D):
    a = rng.normal(size=(batch, dim))
    return _unit(a), _unit(a + 0.7 * rng.normal(size=(batch, dim)))


def _labelled(rng, batch=B, dim=D, classes=4):
    labels = rng.integers(0, classes, batch)
    labels[0] = classes + 7  # an anchor without positives
    return rng.normal(size=(batch, dim)), labels


def _labelled_unit(rng, batch=B, dim=D):
    e, labels = _labelled(rng, batch, dim)
    return _unit(e), labels


CASES = {
    "clip_loss": (lossjax.clip_loss, {"temperature": 0.3}, _towers,
                  lambda a, b: (ref_clip(a, b, 0.3), None)),
    "info_nce": (lossjax.info_nce, {"temperature": 0.5}, _towers,
                 lambda a, b: (ref_info_nce(a, b, 0.5), None)),
    "siglip_ring": (lossjax.sigmoid_contrastive_loss,
                    {"temperature": 0.2, "bias": -3.0}, _towers,
                    lambda a, b: (ref_siglip(a, b, 0.2, -3.0), None)),
    "siglip_gather": (lossjax.sigmoid_contrastive_loss,
                      {"temperature": 0.2, "bias": -3.0, "implementation": "gather"},
                      _towers, lambda a, b: (ref_siglip(a, b, 0.2, -3.0), None)),
    "ntxent": (lossjax.ntxent, {"temperature": 0.2}, _labelled,
               lambda e, y: ref_ntxent(e, y, 0.2)),
    "supcon": (lossjax.supervised_contrastive_loss, {"temperature": 0.3}, _labelled,
               lambda e, y: ref_supcon(e, y, 0.3)),
    "triplet_hard": (lossjax.batch_triplet_loss, {"margin": 1.5, "mining": "hard"},
                     _labelled, lambda e, y: ref_batch_triplet(e, y, 1.5, "hard")),
    "triplet_semihard": (lossjax.batch_triplet_loss,
                         {"margin": 0.5, "mining": "semihard"}, _labelled,
                         lambda e, y: ref_batch_triplet(e, y, 0.5, "semihard")),
    "triplet_all_p1": (lossjax.batch_triplet_loss,
                       {"margin": 1.0, "mining": "all", "p": 1.0}, _labelled,
                       lambda e, y: ref_batch_triplet(e, y, 1.0, "all", p=1.0)),
    "circle": (lossjax.circle_loss, {"margin": 0.25, "gamma": 16.0}, _labelled_unit,
               lambda e, y: ref_circle(e, y, 0.25, 16.0)),
}
IDS = list(CASES)


def _data(name, seed=0, **shape):
    return CASES[name][2](np.random.default_rng(seed), **shape)


def _f32(data):
    return tuple(np.asarray(x, np.float32) if np.issubdtype(np.asarray(x).dtype,
                                                            np.floating)
                 else np.asarray(x, np.int32) for x in data)


def _reference(name, data, kept=None):
    """(entries with 0 for no entry, has_entry) of the reference on the kept batch."""
    kept = np.ones(len(data[0]), bool) if kept is None else kept
    sub = tuple(np.asarray(x)[kept] for x in data)
    out, has = CASES[name][3](*(np.asarray(x, np.float64) if i == 0 or
                                np.issubdtype(np.asarray(x).dtype, np.floating)
                                else x for i, x in enumerate(sub)))
    has = np.ones(len(out), bool) if has is None else has
    full, full_has = np.zeros(len(kept)), np.zeros(len(kept), bool)
    full[kept], full_has[kept] = np.where(has, out, 0), has
    return full, full_has


@functools.cache
def _jitted(name, reduction):
    fn, kw = CASES[name][:2]
    return jax.jit(functools.partial(fn, **kw, reduction=reduction))


@pytest.mark.parametrize("name", IDS)
def test_values_against_the_float64_reference(name):
    data = _f32(_data(name))
    rng = np.random.default_rng(1)
    where = rng.random(B) < 0.75
    weights = rng.uniform(0.5, 2.0, B).astype(np.float32)
    want, has = _reference(name, data, where)
    none = _jitted(name, "none")(*data, where=where, weights=weights)
    np.testing.assert_allclose(none, weights * want, rtol=2e-5, atol=2e-6)
    total = np.sum(weights * want)
    np.testing.assert_allclose(_jitted(name, "sum")(*data, where=where,
                                                    weights=weights), total,
                               rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(_jitted(name, "mean")(*data, where=where,
                                                     weights=weights),
                               total / np.sum(weights[has]), rtol=2e-5, atol=2e-6)
    s, w = _jitted(name, "sum_and_weight")(*data, where=where, weights=weights)
    np.testing.assert_allclose((s, w), (total, np.sum(weights[has])), rtol=2e-5,
                               atol=2e-6)


@pytest.mark.parametrize("name", IDS)
def test_where_equals_removing_the_entries(name):
    data = _f32(_data(name, seed=2))
    where = np.random.default_rng(3).random(B) < 0.6
    sliced = tuple(x[where] for x in data)
    for r in REDUCTIONS:
        got = _jitted(name, r)(*data, where=where)
        want = _jitted(name, r)(*sliced)
        np.testing.assert_allclose(got[where] if r == "none" else got, want,
                                   rtol=1e-5, atol=1e-6, err_msg=r)


@pytest.mark.parametrize("name", IDS)
def test_dropped_entries_holding_nan_give_zero_gradients(name):
    data = list(_f32(_data(name, seed=4)))
    where = np.ones(B, bool)
    where[[1, 5]] = False
    data[0][1] = np.nan
    data[0][5] = np.inf
    fn, kw = CASES[name][:2]
    float_args = tuple(i for i, x in enumerate(data) if x.dtype == np.float32)
    value, grads = jax.value_and_grad(
        lambda *a: fn(*a, **kw, where=where), argnums=float_args)(*data)
    assert np.isfinite(value)
    for g in grads:
        assert np.all(np.isfinite(g))
        assert np.all(g[~where] == 0)


@pytest.mark.parametrize("name", IDS)
def test_nothing_kept_gives_zero_and_zero_gradients(name):
    data = _f32(_data(name))
    fn, kw = CASES[name][:2]
    where = np.zeros(B, bool)
    value, g = jax.value_and_grad(lambda x: fn(x, *data[1:], **kw, where=where))(
        data[0])
    assert value == 0 and np.all(g == 0)


@pytest.mark.parametrize("name", IDS)
def test_gradients_by_finite_differences(name):
    data = _data(name, seed=5, batch=6, dim=3)
    data = (data[0], data[1]) if name in ("clip_loss", "info_nce") or "siglip" in name \
        else (data[0], np.asarray(np.r_[0, 0, 1, 1, 2, 3] if "circle" not in name
                                  else np.r_[0, 0, 1, 1, 0, 1], np.int32))
    fn, kw = CASES[name][:2]
    with jax.enable_x64(True):
        if data[1].dtype.kind == "f":
            check_grads(lambda a, b: fn(a, b, **kw), data, order=1, modes="rev")
        else:
            check_grads(lambda a: fn(a, data[1], **kw), data[:1], order=1, modes="rev")


@pytest.mark.parametrize("name", IDS)
def test_bf16_inputs_upcast_and_jit_vmap(name):
    data = _f32(_data(name))
    low = tuple(x.astype(jnp.bfloat16) if x.dtype == np.float32 else x for x in data)
    got = _jitted(name, "none")(*low)
    assert got.dtype == jnp.float32
    want = _jitted(name, "none")(*tuple(np.asarray(x, np.float32) if x.dtype !=
                                        np.int32 else x for x in low))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    fn, kw = CASES[name][:2]
    eager = fn(*data, **kw, reduction="none")
    np.testing.assert_allclose(eager, _jitted(name, "none")(*data), rtol=1e-6,
                               atol=1e-6)
    stacked = tuple(np.stack([x, x[::-1]]) for x in data)
    batched = jax.vmap(_jitted(name, "none"))(*stacked)
    np.testing.assert_allclose(batched[1], fn(*(x[::-1] for x in data), **kw,
                                              reduction="none"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", IDS)
def test_finite_at_huge_logits(name):
    data = _f32(_data(name))
    fn, kw = CASES[name][:2]
    scale = 1e4 ** 0.5 * np.sqrt(kw.get("temperature", 1.0))
    big = (data[0] * scale,) + ((data[1] * scale,) if data[1].dtype == np.float32
                                else data[1:])
    value, grads = jax.value_and_grad(lambda *a: fn(*a, **kw),
                                      argnums=0)(*big)
    assert np.isfinite(value) and np.all(np.isfinite(grads))


def test_learnable_temperature_gradient_matches_finite_differences():
    a, b = _towers(np.random.default_rng(6), 5, 3)
    with jax.enable_x64(True):
        for fn, kw in ((lossjax.clip_loss, {}), (lossjax.info_nce, {}),
                       (lossjax.sigmoid_contrastive_loss, {"bias": -1.0}),
                       (lossjax.ntxent, None), (lossjax.supervised_contrastive_loss,
                                                None)):
            if kw is None:
                labels = np.array([0, 0, 1, 1, 2])
                f = functools.partial(fn, a, labels)
            else:
                f = functools.partial(fn, a, b, **kw)
            check_grads(lambda t, f=f: f(temperature=t), (0.3,), order=1,
                        modes="rev")
        check_grads(lambda t, s: lossjax.sigmoid_contrastive_loss(
            a, b, temperature=t, bias=s), (0.3, -2.0), order=1, modes="rev")


def test_bad_inputs_raise():
    a, b = _f32(_towers(np.random.default_rng(0)))
    e, y = _f32(_labelled(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="same shape"):
        lossjax.clip_loss(a, b[:, :3])
    with pytest.raises(ValueError, match="rank"):
        lossjax.info_nce(a[0], b[0])
    with pytest.raises(TypeError, match="floating"):
        lossjax.sigmoid_contrastive_loss(a.astype(np.int32), b)
    with pytest.raises(ValueError, match="temperature"):
        lossjax.clip_loss(a, b, temperature=0.0)
    with pytest.raises(ValueError, match="implementation"):
        lossjax.sigmoid_contrastive_loss(a, b, implementation="chunked")
    with pytest.raises(ValueError, match="reduction"):
        lossjax.ntxent(e, y, reduction="avg")
    with pytest.raises(TypeError, match="integer"):
        lossjax.ntxent(e, y.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        lossjax.supervised_contrastive_loss(e, y[:3])
    with pytest.raises(ValueError, match="mining"):
        lossjax.batch_triplet_loss(e, y, mining="easy")
    with pytest.raises(ValueError, match="gamma"):
        lossjax.circle_loss(e, y, gamma=-1.0)
    with pytest.raises(ValueError, match="where"):
        lossjax.clip_loss(a, b, where=np.ones(3, bool))


def test_sibling_identities():
    a, b = _f32(_towers(np.random.default_rng(7)))
    clip = lossjax.clip_loss(a, b, reduction="none")
    both = (lossjax.info_nce(a, b, reduction="none")
            + lossjax.info_nce(b, a, reduction="none")) / 2
    np.testing.assert_allclose(clip, both, rtol=1e-6)
    # Two views, one positive each: NT-Xent and SupCon coincide.
    views = np.concatenate([a, b])
    labels = np.tile(np.arange(B), 2).astype(np.int32)
    np.testing.assert_allclose(lossjax.ntxent(views, labels, temperature=0.2),
                               lossjax.supervised_contrastive_loss(
                                   views, labels, temperature=0.2), rtol=1e-6)


def test_ntxent_mean_matches_optax_for_two_views():
    optax = pytest.importorskip("optax")
    a, b = _f32(_towers(np.random.default_rng(8)))
    views = np.concatenate([a, b])
    labels = np.tile(np.arange(B), 2).astype(np.int32)
    np.testing.assert_allclose(
        lossjax.ntxent(views, labels, temperature=0.07),
        optax.ntxent(views, labels, temperature=0.07), rtol=1e-5)


# --- across devices: the ring SigLIP -----------------------------------------------

DEVICES = 8


def _mesh(n=DEVICES):
    return Mesh(np.array(jax.devices()[:n]), ("data",))


def _siglip_grads(implementation, axis_name=None):
    def f(a, b, t, s, where):
        return lossjax.sigmoid_contrastive_loss(
            a, b, temperature=t, bias=s, where=where, implementation=implementation,
            axis_name=axis_name)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3))


def _ring_data():
    rng = np.random.default_rng(9)
    a, b = _f32(_towers(rng, DEVICES * 3, 8))
    where = rng.random(DEVICES * 3) < 0.7
    where[:3] = False  # the first shard keeps nothing
    where[3:6] = True
    return a, b, np.float32(0.3), np.float32(-2.0), where


def test_ring_equals_gathered_and_one_device_under_shard_map():
    data = _ring_data()
    want = jax.jit(_siglip_grads("gather"))(*data)
    spec = (P("data"), P("data"), P(), P(), P("data"))
    for impl in ("ring", "gather"):
        run = jax.shard_map(_siglip_grads(impl, "data"), mesh=_mesh(), in_specs=spec,
                            out_specs=(P(), (P("data"), P("data"), P(), P())))
        got = jax.jit(run)(*data)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=impl)


def test_ring_equals_one_device_under_pmap():
    a, b, t, s, where = _ring_data()

    def step(a, b, t, s, where):
        value, (ga, gb, gt, gs) = _siglip_grads("ring", "data")(a, b, t, s, where)
        return value, ga, gb, jax.lax.psum(gt, "data"), jax.lax.psum(gs, "data")

    shard = lambda x: x.reshape(DEVICES, -1, *x.shape[1:])  # noqa: E731
    got = jax.pmap(step, axis_name="data", in_axes=(0, 0, None, None, 0))(
        shard(a), shard(b), t, s, shard(where))
    value, (ga, gb, gt, gs) = jax.jit(_siglip_grads("gather"))(a, b, t, s, where)
    np.testing.assert_allclose(got[0], np.full(DEVICES, value), rtol=2e-5)
    np.testing.assert_allclose(got[1].reshape(a.shape), ga, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got[2].reshape(b.shape), gb, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got[3][0], gt, rtol=2e-5)
    np.testing.assert_allclose(got[4][0], gs, rtol=2e-5)


def siglip_temp_bytes(devices, implementation, batch=256, dim=64,
                      fn=lossjax.sigmoid_contrastive_loss):
    """Per-device XLA temp memory of loss + gradients w.r.t. both towers."""
    def loss(a, b):
        kw = {} if fn is not lossjax.sigmoid_contrastive_loss else {
            "implementation": implementation}
        return fn(a, b, **kw, axis_name="data")

    run = jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=_mesh(devices),
                        in_specs=(P("data"), P("data")),
                        out_specs=(P("data"), P("data")))
    x = jax.ShapeDtypeStruct((devices * batch, dim), jnp.float32)
    compiled = jax.jit(run).lower(x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_ring_memory_does_not_grow_with_the_device_count():
    block = 256 * 256 * 4
    ring2, ring8 = siglip_temp_bytes(2, "ring"), siglip_temp_bytes(8, "ring")
    gather2, gather8 = siglip_temp_bytes(2, "gather"), siglip_temp_bytes(8, "gather")
    assert ring8 <= 1.5 * ring2 + block, (ring2, ring8)
    assert ring8 < 6 * block, ring8
    assert gather8 > 2 * gather2, (gather2, gather8)
    assert gather8 > ring8


# --- the cross-device matrix (tests/test_matrix.py) --------------------------------

MD = 8


def _m_towers(rng, batch):
    a = rng.normal(size=(batch, MD))
    return tuple(np.asarray(_unit(x), np.float32)
                 for x in (a, a + 0.7 * rng.normal(size=(batch, MD))))


def _m_labelled(rng, batch):
    return (rng.normal(size=(batch, MD)).astype(np.float32),
            rng.integers(0, 4, batch).astype(np.int32))


def _m_labelled_unit(rng, batch):
    e, y = _m_labelled(rng, batch)
    return _unit(e).astype(np.float32), y


def _m_learned(**values):
    return lambda rng: {k: np.float32(v) for k, v in values.items()}


MATRIX_CASES = [
    MatrixCase("clip_loss", _m_towers, kwargs={"temperature": 0.3},
               traced={"temperature": 0.3}),
    MatrixCase("clip_loss", _m_towers, replicated_kwargs=_m_learned(temperature=0.2),
               id="learned_temperature"),
    MatrixCase("info_nce", _m_towers, kwargs={"temperature": 0.25},
               traced={"temperature": 0.25}),
    MatrixCase("info_nce", _m_towers, replicated_kwargs=_m_learned(temperature=0.4),
               id="learned_temperature"),
    MatrixCase("sigmoid_contrastive_loss", _m_towers,
               replicated_kwargs=_m_learned(temperature=0.3, bias=-2.0), id="ring"),
    MatrixCase("sigmoid_contrastive_loss", _m_towers,
               kwargs={"implementation": "gather"},
               replicated_kwargs=_m_learned(temperature=0.3, bias=-2.0), id="gather"),
    MatrixCase("sigmoid_contrastive_loss", _m_towers,
               kwargs={"temperature": 0.5, "bias": -1.0},
               traced={"temperature": 0.5, "bias": -1.0}, id="traced"),
    MatrixCase("ntxent", _m_labelled, kwargs={"temperature": 0.2},
               traced={"temperature": 0.2}),
    MatrixCase("ntxent", _m_labelled, replicated_kwargs=_m_learned(temperature=0.3),
               id="learned_temperature"),
    MatrixCase("supervised_contrastive_loss", _m_labelled,
               replicated_kwargs=_m_learned(temperature=0.3),
               id="learned_temperature"),
    MatrixCase("supervised_contrastive_loss", _m_labelled,
               kwargs={"temperature": 0.2}, traced={"temperature": 0.2}),
    MatrixCase("batch_triplet_loss", _m_labelled, kwargs={"margin": 1.0},
               traced={"margin": 1.0}, id="hard"),
    MatrixCase("batch_triplet_loss", _m_labelled,
               kwargs={"margin": 0.5, "mining": "semihard"}, id="semihard"),
    MatrixCase("batch_triplet_loss", _m_labelled,
               kwargs={"margin": 2.0, "mining": "all", "p": 1.0}, id="all"),
    MatrixCase("circle_loss", _m_labelled_unit, kwargs={"margin": 0.25, "gamma": 16.0},
               traced={"margin": 0.25, "gamma": 16.0}),
]
