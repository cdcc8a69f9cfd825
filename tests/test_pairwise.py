"""Tests for lossjax.pairwise: torch parity (values and gradients, every reduction),
float64 references, and the contract rules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads
from loss_cases import MatrixCase

import lossjax

REDUCTIONS = ("none", "sum", "mean")
B, D, C = 10, 5, 6


def _sign(rng, shape):
    return rng.choice([-1.0, 1.0], shape)


def _multilabel(rng, batch=B, classes=C):
    labels = np.full((batch, classes), -1)
    for i in range(batch):
        k = rng.integers(0, classes)  # row 0 may have no target at all
        labels[i, :k] = rng.choice(classes, k, replace=False)
        labels[i, k + 1:] = rng.integers(0, classes, classes - k - 1)  # after -1
    labels[1, :3] = [2, 2, -1]  # a duplicate target counts twice, as in torch
    return labels


def _data(name, rng):
    if name.startswith("triplet"):
        return tuple(rng.normal(size=(B, D)) for _ in range(3))
    if name == "cosine_embedding_loss":
        return rng.normal(size=(B, D)), rng.normal(size=(B, D)), _sign(rng, B)
    if name == "margin_ranking_loss":
        return rng.normal(size=B), rng.normal(size=B), _sign(rng, B)
    if name == "hinge_embedding_loss":
        return rng.uniform(0, 2, B), _sign(rng, B)
    if name == "multilabel_margin_loss":
        return rng.normal(size=(B, C)), _multilabel(rng)
    return rng.normal(0, 2, size=(B, C)), rng.uniform(0, 1, (B, C))


_W = np.linspace(0.5, 2.0, C)

# name -> (lossjax fn, lossjax kwargs, torch fn, torch kwargs)
CASES = {
    "triplet": (lossjax.triplet_margin_loss, {"margin": 2.0},
                F.triplet_margin_loss, {"margin": 2.0}),
    "triplet_p1_swap": (lossjax.triplet_margin_loss,
                        {"margin": 1.5, "p": 1.0, "swap": True, "eps": 1e-3},
                        F.triplet_margin_loss,
                        {"margin": 1.5, "p": 1.0, "swap": True, "eps": 1e-3}),
    "triplet_p3": (lossjax.triplet_margin_loss, {"margin": 2.0, "p": 3.0},
                   F.triplet_margin_loss, {"margin": 2.0, "p": 3.0}),
    "cosine_embedding_loss": (lossjax.cosine_embedding_loss,
                              {"margin": 0.2, "eps": 1e-12},
                              F.cosine_embedding_loss, {"margin": 0.2}),
    "margin_ranking_loss": (lossjax.margin_ranking_loss, {"margin": 0.3},
                            F.margin_ranking_loss, {"margin": 0.3}),
    "hinge_embedding_loss": (lossjax.hinge_embedding_loss, {"margin": 1.2},
                             F.hinge_embedding_loss, {"margin": 1.2}),
    "multilabel_margin_loss": (lossjax.multilabel_margin_loss, {},
                               F.multilabel_margin_loss, {}),
    "multilabel_soft_margin_loss": (lossjax.multilabel_soft_margin_loss, {},
                                    F.multilabel_soft_margin_loss, {}),
    "multilabel_soft_margin_weighted": (
        lossjax.multilabel_soft_margin_loss, {"class_weights": _W},
        F.multilabel_soft_margin_loss, {"weight": torch.tensor(_W)}),
}
IDS = list(CASES)


def _float_positions(data):
    return tuple(i for i, x in enumerate(data) if np.asarray(x).dtype.kind == "f"
                 and not (i == len(data) - 1 and len(data) > 1 and
                          np.all(np.abs(x) == 1)))


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_parity_values_and_gradients(name, reduction):
    fn, kw, tfn, tkw = CASES[name]
    data = _data(name.replace("_weighted", ""), np.random.default_rng(0))
    diff = _float_positions(data)
    tdata = [torch.tensor(x, requires_grad=i in diff) for i, x in enumerate(data)]
    out = tfn(*tdata, **tkw, reduction=reduction)
    out.backward(torch.ones_like(out))  # a sum over "none"'s entries
    with jax.enable_x64(True):
        got, grads = jax.value_and_grad(
            lambda *a: jnp.sum(fn(*a, **kw, reduction=reduction)), argnums=diff)(
                *data)
        values = fn(*data, **kw, reduction=reduction)
    np.testing.assert_allclose(values, out.detach().numpy(), rtol=1e-10, atol=1e-12)
    for i, g in zip(diff, grads, strict=True):
        np.testing.assert_allclose(g, tdata[i].grad.numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=f"d/d arg{i}")


def ref_multilabel_margin(x, labels):
    """torch's documented formula, with loops."""
    out = []
    for row, lab in zip(x, labels, strict=True):
        targets = []
        for y in lab:
            if y == -1:
                break
            targets.append(y)
        total = sum(max(0, 1 - (row[y] - row[i])) for y in targets
                    for i in range(len(row)) if i not in targets)
        out.append(total / len(row))
    return np.array(out)


def test_multilabel_margin_against_the_formula():
    x, labels = _data("multilabel_margin_loss", np.random.default_rng(1))
    with jax.enable_x64(True):
        got = lossjax.multilabel_margin_loss(x, labels, reduction="none")
    np.testing.assert_allclose(got, ref_multilabel_margin(x, labels), rtol=1e-12)
    assert got[0] == 0 or labels[0, 0] != -1


def test_triplet_margin_against_the_formula():
    a, p, n = _data("triplet", np.random.default_rng(2))

    def d(x, y, q, eps=1e-6):
        return np.sum(np.abs(x - y + eps) ** q, -1) ** (1 / q)

    with jax.enable_x64(True):
        got = lossjax.triplet_margin_loss(a, p, n, margin=2.0, p=3.0, swap=True,
                                          reduction="none")
    want = np.maximum(d(a, p, 3) - np.minimum(d(a, n, 3), d(p, n, 3)) + 2.0, 0)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_multilabel_margin_bad_labels():
    x, labels = _data("multilabel_margin_loss", np.random.default_rng(3))
    labels = labels.copy()
    labels[4, 0] = C  # before the first -1: out of range
    got = lossjax.multilabel_margin_loss(x.astype(np.float32), labels,
                                         reduction="none")
    assert np.isnan(got[4]) and np.all(np.isfinite(np.delete(got, 4)))
    where = np.ones(B, bool)
    where[4] = False
    assert np.isfinite(lossjax.multilabel_margin_loss(x.astype(np.float32), labels,
                                                      where=where))
    checked = lossjax.checked(lossjax.multilabel_margin_loss)
    with pytest.raises(AssertionError, match="lossjax.multilabel_margin_loss"):
        checked(x.astype(np.float32), labels)
    checked(x.astype(np.float32), labels, where=where)


def test_checked_mode_rejects_bad_targets():
    x1, x2, t = _data("cosine_embedding_loss", np.random.default_rng(4))
    t = t.copy()
    t[2] = 0.0
    f = lossjax.checked(lossjax.cosine_embedding_loss)
    with pytest.raises(AssertionError, match="targets must be -1 or"):
        f(x1.astype(np.float32), x2.astype(np.float32), t.astype(np.float32))
    logits, y = _data("multilabel_soft_margin_loss", np.random.default_rng(5))
    g = lossjax.checked(lossjax.multilabel_soft_margin_loss)
    with pytest.raises(AssertionError, match=r"\[0, 1\]"):
        g(logits.astype(np.float32), (y * 2).astype(np.float32))


# --- the contract, over the table -----------------------------------------------------


def _f32(data):
    return tuple(np.asarray(x, np.float32) if np.asarray(x).dtype.kind == "f"
                 else np.asarray(x, np.int32) for x in data)


@functools.cache
def _jitted(name, reduction):
    fn, kw = CASES[name][:2]
    return jax.jit(functools.partial(fn, **kw, reduction=reduction))


@pytest.mark.parametrize("name", IDS)
def test_where_weights_and_reductions(name):
    data = _f32(_data(name.replace("_weighted", ""), np.random.default_rng(6)))
    rng = np.random.default_rng(7)
    where = rng.random(B) < 0.6
    weights = rng.uniform(0.5, 2.0, B).astype(np.float32)
    full = np.asarray(_jitted(name, "none")(*data))
    sliced = _jitted(name, "none")(*(x[where] for x in data))
    np.testing.assert_allclose(full[where], sliced, rtol=1e-6)
    none = _jitted(name, "none")(*data, where=where, weights=weights)
    np.testing.assert_allclose(none, np.where(where, weights * full, 0), rtol=1e-6)
    total = np.sum((weights * full)[where])
    np.testing.assert_allclose(_jitted(name, "sum")(*data, where=where,
                                                    weights=weights), total,
                               rtol=1e-5)
    np.testing.assert_allclose(_jitted(name, "mean")(*data, where=where,
                                                     weights=weights),
                               total / weights[where].sum(), rtol=1e-5)
    s, w = _jitted(name, "sum_and_weight")(*data, where=where, weights=weights)
    np.testing.assert_allclose((s, w), (total, weights[where].sum()), rtol=1e-5)


@pytest.mark.parametrize("name", IDS)
def test_nan_in_dropped_entries_and_nothing_kept(name):
    data = [np.array(x) for x in _f32(_data(name.replace("_weighted", ""),
                                            np.random.default_rng(8)))]
    data[0][3] = np.nan
    where = np.ones(B, bool)
    where[3] = False
    fn, kw = CASES[name][:2]
    value, g = jax.value_and_grad(lambda x: fn(x, *data[1:], **kw, where=where))(
        data[0])
    assert np.isfinite(value) and np.all(np.isfinite(g)) and np.all(g[3] == 0)
    nothing = np.zeros(B, bool)
    value, g = jax.value_and_grad(lambda x: fn(x, *data[1:], **kw, where=nothing))(
        data[0])
    assert value == 0 and np.all(g == 0)


@pytest.mark.parametrize("name", IDS)
def test_bf16_jit_vmap_and_huge_inputs(name):
    data = _f32(_data(name.replace("_weighted", ""), np.random.default_rng(9)))
    fn, kw = CASES[name][:2]
    low = tuple(x.astype(jnp.bfloat16) if x.dtype == np.float32 else x for x in data)
    got = _jitted(name, "none")(*low)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _jitted(name, "none")(*data), rtol=3e-2,
                               atol=3e-2)
    np.testing.assert_allclose(fn(*data, **kw, reduction="none"),
                               _jitted(name, "none")(*data), rtol=1e-6)
    stacked = tuple(np.stack([x, x[::-1]]) for x in data)
    np.testing.assert_allclose(jax.vmap(_jitted(name, "none"))(*stacked)[1],
                               _jitted(name, "none")(*(x[::-1] for x in data)),
                               rtol=1e-6)
    big = (data[0] * 1e4,) + data[1:]
    value, g = jax.value_and_grad(lambda x: fn(x, *big[1:], **kw))(big[0])
    assert np.isfinite(value) and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", ["triplet", "cosine_embedding_loss",
                                  "margin_ranking_loss", "multilabel_soft_margin_loss"])
def test_check_grads(name):
    data = _data(name, np.random.default_rng(10))
    diff = _float_positions(data)
    fn, kw = CASES[name][:2]

    def f(*x):
        full = list(data)
        for i, v in zip(diff, x, strict=True):
            full[i] = v
        return fn(*full, **kw)

    with jax.enable_x64(True):
        check_grads(f, tuple(data[i] for i in diff), order=1, modes="rev")


def test_traced_margin_and_bad_inputs():
    a, p, n = _f32(_data("triplet", np.random.default_rng(11)))
    eager = lossjax.triplet_margin_loss(a, p, n, margin=0.7)
    traced = jax.jit(lambda m: lossjax.triplet_margin_loss(a, p, n, margin=m))
    np.testing.assert_allclose(traced(jnp.float32(0.7)), eager, rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        lossjax.triplet_margin_loss(a, p[:, :2], n)
    with pytest.raises(ValueError, match="p must be"):
        lossjax.triplet_margin_loss(a, p, n, p=0.0)
    with pytest.raises(ValueError, match="margin must be"):
        lossjax.cosine_embedding_loss(a, p, np.ones(B, np.float32), margin=2.0)
    with pytest.raises(ValueError, match="targets has shape"):
        lossjax.cosine_embedding_loss(a, p, np.ones(B + 1, np.float32))
    with pytest.raises(TypeError, match="integer"):
        lossjax.multilabel_margin_loss(a, p)
    with pytest.raises(ValueError, match="reduction"):
        lossjax.margin_ranking_loss(a[:, 0], p[:, 0], n[:, 0], reduction="avg")
    with pytest.raises(ValueError, match="class_weights"):
        lossjax.multilabel_soft_margin_loss(a, np.zeros_like(a),
                                            class_weights=np.ones(2, np.float32))


# --- the cross-device matrix (tests/test_matrix.py) ----------------------------------

MD = 6


def _m_vectors(k):
    return lambda rng, batch: tuple(rng.normal(size=(batch, MD)).astype(np.float32)
                                    for _ in range(k))


def _m_sign(rng, batch, shape=()):
    return rng.choice([-1.0, 1.0], (batch, *shape)).astype(np.float32)


def _m_cosine(rng, batch):
    return (*_m_vectors(2)(rng, batch), _m_sign(rng, batch))


def _m_ranking(rng, batch):
    return (rng.normal(size=(batch, 3)).astype(np.float32),
            rng.normal(size=(batch, 3)).astype(np.float32), _m_sign(rng, batch, (3,)))


def _m_hinge(rng, batch):
    return rng.uniform(0, 2, (batch, 3)).astype(np.float32), _m_sign(rng, batch, (3,))


def _m_multilabel(rng, batch):
    return (rng.normal(size=(batch, MD)).astype(np.float32),
            _multilabel(rng, batch, MD).astype(np.int32))


def _m_soft(rng, batch):
    return (rng.normal(size=(batch, MD)).astype(np.float32),
            rng.uniform(0.05, 0.95, (batch, MD)).astype(np.float32))


MATRIX_CASES = [
    MatrixCase("triplet_margin_loss", _m_vectors(3), kwargs={"margin": 2.0},
               traced={"margin": 2.0}),
    MatrixCase("triplet_margin_loss", _m_vectors(3),
               kwargs={"margin": 1.5, "p": 1.0, "swap": True}, id="p1_swap"),
    MatrixCase("cosine_embedding_loss", _m_cosine, kwargs={"margin": 0.1},
               traced={"margin": 0.1}),
    MatrixCase("margin_ranking_loss", _m_ranking, kwargs={"margin": 0.3},
               traced={"margin": 0.3}),
    MatrixCase("hinge_embedding_loss", _m_hinge, kwargs={"margin": 1.2},
               traced={"margin": 1.2}),
    MatrixCase("multilabel_margin_loss", _m_multilabel),
    MatrixCase("multilabel_soft_margin_loss", _m_soft,
               replicated_kwargs=lambda rng: {
                   "class_weights": rng.uniform(0.5, 2.0, MD).astype(np.float32)}),
]
