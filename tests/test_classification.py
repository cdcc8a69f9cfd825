"""Tests for lossjax.classification: one table of cases, every contract rule over it.

Each case is (loss, keyword options, NumPy reference, kind of inputs). The generic tests
run over the whole table; the classes at the end hold torch parity, sibling identities
and what is specific to one loss (focal Hessians, cross_entropy's float targets, ...).
"""

from __future__ import annotations

import dataclasses
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

import lossjax
from lossjax import classification as C

REDUCTIONS = ("none", "sum", "mean")
ALL_REDUCTIONS = REDUCTIONS + ("sum_and_weight",)
K = 5  # classes
CLASS_WEIGHTS = np.array([0.5, 1.0, 2.0, 1.5, 0.25])
POS_WEIGHT = np.array([1.0, 3.0, 0.5, 2.0, 1.5])

# Kinds of inputs, each with the class (or last) axis last:
#   "int":  logits [..., K] and integer labels [...]
#   "logp": log-probabilities [..., K] and integer labels [...]
#   "soft": logits [..., K] and float target distributions [..., K]
#   "unit": logits [...] and targets in [0, 1] (some exactly 0 or 1)
#   "sign": scores [...] and targets in {-1, +1}
INTEGER_KINDS = ("int", "logp")


def _make(kind, rng, shape, *, soft_only=False):
    """float64 NumPy data arguments of `kind`; `shape` includes the last axis."""
    x = rng.normal(0.0, 2.0, shape)
    if kind == "int":
        return x, rng.integers(0, shape[-1], shape[:-1])
    if kind == "logp":
        return ref.log_softmax(x), rng.integers(0, shape[-1], shape[:-1])
    if kind == "soft":
        return x, rng.dirichlet(np.ones(shape[-1]), shape[:-1])
    if kind == "unit":
        t = rng.uniform(0.05, 0.95, shape)
        if not soft_only:  # hard targets too, except where finite differences need room
            t = np.where(rng.random(shape) < 0.5, np.round(t), t)
        return x, t
    return x, rng.choice([-1.0, 1.0], shape)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fn: Callable
    kwargs: dict
    ref: Callable
    kind: str

    def __repr__(self):
        return self.id

    @property
    def integer(self):
        return self.kind in INTEGER_KINDS

    @property
    def elementwise(self):
        return self.kind in ("unit", "sign")

    def loss_shape(self, shape):
        return tuple(shape) if self.elementwise else tuple(shape[:-1])

    def data(self, shape=(6, K), seed=0, **kw):
        return _make(self.kind, np.random.default_rng(seed), shape, **kw)

    def __call__(self, *data, dtype=None, **kw):
        args = [jnp.asarray(d, dtype if np.issubdtype(np.asarray(d).dtype, np.floating)
                            else None) for d in data]
        return self.fn(*args, **self.kwargs, **kw)

    def reference(self, *data):
        if self.integer:  # references know nothing of ignore_index
            x, labels = data
            data = (x, np.where(labels < 0, 0, labels))
        return self.ref(*data, **self.kwargs)

    def normalizer(self, labels, weights):
        """The "mean" denominator's per-entry weights (torch's class-weighted mean)."""
        cw = self.kwargs.get("class_weights")
        if cw is None or not self.integer or self.fn is C.multiclass_hinge_loss:
            # Float targets: class weights act inside the entry; multi_margin_loss
            # divides by the count (torch).
            return None
        w = np.asarray(cw)[np.where(labels < 0, 0, labels)]
        return w if weights is None else w * weights

    @property
    def float_args(self):
        """Indices of the data arguments that gradients are taken for."""
        return (0,) if self.kind in INTEGER_KINDS else (0, 1)


def _cw(**kw):
    return {"class_weights": CLASS_WEIGHTS, **kw}


CASES = [
    Case("ce", C.cross_entropy, {}, ref.cross_entropy, "int"),
    Case("ce_smooth_cw", C.cross_entropy, _cw(label_smoothing=0.2), ref.cross_entropy,
         "int"),
    Case("ce_soft_smooth_cw", C.cross_entropy, _cw(label_smoothing=0.1),
         ref.cross_entropy_soft, "soft"),
    Case("bce", C.binary_cross_entropy, {}, ref.binary_cross_entropy, "unit"),
    Case("bce_pw_smooth", C.binary_cross_entropy,
         {"pos_weight": POS_WEIGHT, "label_smoothing": 0.1}, ref.binary_cross_entropy,
         "unit"),
    Case("sigmoid_focal", C.sigmoid_focal_loss, {}, ref.sigmoid_focal_loss, "unit"),
    Case("sigmoid_focal_a.25_g.5", C.sigmoid_focal_loss, {"alpha": 0.25, "gamma": 0.5},
         ref.sigmoid_focal_loss, "unit"),
    Case("focal", C.focal_loss, {}, ref.focal_loss, "int"),
    Case("focal_g.5_cw", C.focal_loss, _cw(gamma=0.5), ref.focal_loss, "int"),
    Case("poly1", C.poly1_cross_entropy, {}, ref.poly1_cross_entropy, "int"),
    Case("poly1_e-.5_cw", C.poly1_cross_entropy, _cw(epsilon=-0.5),
         ref.poly1_cross_entropy, "int"),
    Case("nll", C.nll_loss, {}, ref.nll_loss, "logp"),
    Case("nll_cw", C.nll_loss, _cw(), ref.nll_loss, "logp"),
    Case("hinge", C.hinge_loss, {}, ref.hinge_loss, "sign"),
    Case("hinge_sq_m.5", C.hinge_loss, {"margin": 0.5, "squared": True},
         ref.hinge_loss, "sign"),
    Case("squared_hinge", C.squared_hinge_loss, {},
         lambda s, t: ref.hinge_loss(s, t, squared=True), "sign"),
    Case("squared_hinge_m.5", C.squared_hinge_loss, {"margin": 0.5},
         lambda s, t, margin: ref.hinge_loss(s, t, margin=margin, squared=True),
         "sign"),
    Case("soft_margin", C.soft_margin_loss, {}, ref.soft_margin_loss, "sign"),
    Case("multi_hinge", C.multiclass_hinge_loss, {}, ref.multiclass_hinge_loss, "int"),
    Case("multi_hinge_p2_cw", C.multiclass_hinge_loss, _cw(p=2, margin=0.7),
         ref.multiclass_hinge_loss, "int"),
]
# One case per loss function, for the rules that do not depend on options (masking,
# transforms, dtypes, errors); values, gradients and extremes run over every case.
FIRST_CASES = list({c.fn: c for c in reversed(CASES)}.values())[::-1]


def test_table_covers_every_loss():
    assert {c.fn.__name__ for c in CASES} == set(C.LOSS_NAMES) == set(C.__all__)
    for name in C.LOSS_NAMES:
        assert lossjax.get(name) is getattr(C, name)
        assert lossjax.family_of(name) == "classification"


def _mask_and_weights(case, shape, seed=1):
    rng = np.random.default_rng(seed)
    lshape = case.loss_shape(shape)
    return rng.random(lshape) < 0.7, rng.uniform(0.5, 2.0, lshape)


def _with_ignored(case, data):
    """Integer cases: set two labels to ignore_index (-100)."""
    if not case.integer:
        return data
    x, labels = data
    labels = labels.copy()
    labels.reshape(-1)[[1, 4]] = -100
    return x, labels


def _kept(case, data, where):
    return where & (data[1] != -100) if case.integer else where


# --- generic tests over the table -------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_values_match_reference(case):
    shape = (6, K)
    data = _with_ignored(case, case.data(shape))
    where, weights = _mask_and_weights(case, shape)
    entry = case.reference(*data)
    with jax.enable_x64(True):
        for kw in ({}, {"where": where, "weights": weights}):
            args = {k: jnp.asarray(v) for k, v in kw.items()}
            kept = _kept(case, data, kw.get("where", np.ones(where.shape, bool)))
            norm = case.normalizer(data[1], kw.get("weights"))
            for reduction in REDUCTIONS:
                got = case(*data, reduction=reduction, **args)
                want = ref.reduce(entry, kept=kept, weights=kw.get("weights"),
                                  reduction=reduction, normalizer=norm)
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
                assert got.dtype == jnp.float64
                assert got.shape == (case.loss_shape(shape) if reduction == "none"
                                     else ())
            # "sum_and_weight": the pair that "mean" divides; for integer labels the
            # weight is class-weighted (torch's normalizer).
            if norm is None:
                norm = kw.get("weights", np.ones(where.shape))
            got = case(*data, reduction="sum_and_weight", **args)
            want = (ref.reduce(entry, kept=kept, weights=kw.get("weights"),
                               reduction="sum"), np.where(kept, norm, 0.0).sum())
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_jit_equals_eager_and_vmap_equals_batched(case):
    shape = (3, 4, K)
    data = case.data(shape)
    where, weights = _mask_and_weights(case, shape)
    args = [jnp.asarray(d, jnp.float32 if d.dtype.kind == "f" else None) for d in data]
    kw = {"where": jnp.asarray(where), "weights": jnp.asarray(weights, jnp.float32)}

    def f(*a, **k):
        return case.fn(*a, **case.kwargs, **k)

    eager = f(*args, reduction="none", **kw)
    jitted = jax.jit(lambda *a: f(*a, reduction="none", **kw))(*args)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    plain = np.asarray(f(*args, reduction="none"))
    mapped = jax.jit(jax.vmap(lambda *a: f(*a, reduction="none")))(*args)
    np.testing.assert_allclose(mapped, plain, rtol=1e-6, atol=1e-7)
    # A per-row mean under vmap is the mean over that row's kept entries.
    row_means = jax.jit(jax.vmap(lambda *a, w: f(*a, where=w)))(*args, w=kw["where"])
    axes = tuple(range(1, plain.ndim))
    norm = case.normalizer(data[1], None)  # class-weighted mean: w_y, not 1
    count = np.where(where, 1.0 if norm is None else norm, 0.0)
    want = np.where(where, plain, 0).sum(axes) / count.sum(axes)
    np.testing.assert_allclose(row_means, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_check_grads(case):
    data = case.data((3, K), soft_only=True)
    where, weights = _mask_and_weights(case, (3, K))
    with jax.enable_x64(True):
        rest = [jnp.asarray(d) for d in data]

        def f(*float_args):
            a = list(rest)
            for i, v in zip(case.float_args, float_args, strict=True):
                a[i] = v
            return case.fn(*a, **case.kwargs, where=jnp.asarray(where),
                           weights=jnp.asarray(weights), reduction="mean")

        check_grads(f, tuple(rest[i] for i in case.float_args), order=1,
                    modes=("rev",))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_finite_at_extreme_logits(case):
    rng = np.random.default_rng(2)
    data = list(case.data((4, K)))
    data[0] = 1e4 * rng.choice([-1.0, 1.0], data[0].shape)
    x = jnp.asarray(data[0], jnp.float32)
    rest = [jnp.asarray(d, jnp.float32 if d.dtype.kind == "f" else None)
            for d in data[1:]]
    for reduction in ("none", "mean"):
        loss = case.fn(x, *rest, **case.kwargs, reduction=reduction)
        assert np.all(np.isfinite(loss)), reduction
    # Gradients in the logits; in the targets too, except for sigmoid focal with
    # gamma < 1, whose exact target derivative overflows there (see its docstring).
    argnums = case.float_args
    if case.fn is C.sigmoid_focal_loss and case.kwargs.get("gamma", 2.0) < 1:
        argnums = (0,)
    grads = jax.grad(lambda *a: case.fn(*a, **case.kwargs), argnums=argnums)(x, *rest)
    for g in grads:
        assert np.all(np.isfinite(g))


def _poison(case, data, kept):
    """Puts NaN / inf into the inputs of the entries that `kept` excludes."""
    x = data[0].copy()
    bad = ~kept if case.elementwise else np.broadcast_to(~kept[..., None], x.shape)
    x[bad] = np.where(np.arange(bad.sum()) % 2, np.nan, np.inf)
    if case.kind in ("unit", "soft"):
        t = data[1].copy()
        t[bad] = np.nan
        return x, t
    return x, data[1]


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fully_masked_gives_zero_and_zero_grads(case):
    data = case.data((4, K))
    where = np.zeros(case.loss_shape((4, K)), bool)
    data = _poison(case, data, where)
    args = [jnp.asarray(d, jnp.float32 if d.dtype.kind == "f" else None) for d in data]
    for reduction in REDUCTIONS:
        def f(*a, reduction=reduction):
            return jnp.sum(case.fn(*a, **case.kwargs, where=jnp.asarray(where),
                                   weights=jnp.full(where.shape, 2.0),
                                   reduction=reduction))
        assert f(*args) == 0.0
        for g in jax.grad(f, argnums=case.float_args)(*args):
            np.testing.assert_array_equal(g, np.zeros_like(g))


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_where_equals_slicing_kept_entries(case):
    shape = (6, K)
    data = case.data(shape)
    rows, weights = _mask_and_weights(case, shape)
    if case.elementwise:  # a row mask [6, 1], broadcast over the last axis
        rows = rows[:, 0]
        where = rows[:, None]
        kept = np.broadcast_to(where, shape)
    else:
        where = kept = rows
    poisoned = _poison(case, data, kept)
    args = [jnp.asarray(d, jnp.float32 if d.dtype.kind == "f" else None)
            for d in poisoned]
    sliced = [jnp.asarray(d[rows], jnp.float32 if d.dtype.kind == "f" else None)
              for d in data]
    w = jnp.asarray(weights, jnp.float32)
    masked = lambda *a: case.fn(*a, **case.kwargs, where=jnp.asarray(where), weights=w)
    plain = lambda *a: case.fn(*a, **case.kwargs, weights=w[rows])
    np.testing.assert_allclose(masked(*args), plain(*sliced), rtol=1e-6)
    grad = lambda f, a: jax.jit(jax.grad(f, case.float_args))(*a)
    for g_masked, g_plain in zip(grad(masked, args), grad(plain, sliced), strict=True):
        np.testing.assert_allclose(g_masked[rows], g_plain, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(g_masked[~rows], 0.0)


@pytest.mark.parametrize("case", [c for c in CASES if "class_weights" in c.kwargs],
                         ids=repr)
def test_class_weight_gradient_ignores_poisoned_excluded_entries(case):
    """d loss / d class_weights with NaN / inf in the excluded entries equals that of
    the kept entries alone (label smoothing's uniform term sums over every row)."""
    shape = (6, K)
    data = case.data(shape)
    rows, weights = _mask_and_weights(case, shape)
    poisoned = _poison(case, data, rows)
    w = jnp.asarray(weights, jnp.float32)

    def grad(data, **kw):
        args = [jnp.asarray(d, jnp.float32 if d.dtype.kind == "f" else None)
                for d in data]
        def loss(cw):
            return case.fn(*args, **{**case.kwargs, "class_weights": cw}, **kw)

        return jax.grad(loss)(jnp.asarray(CLASS_WEIGHTS, jnp.float32))

    masked = grad(poisoned, where=jnp.asarray(rows), weights=w)
    np.testing.assert_allclose(masked, grad([d[rows] for d in data], weights=w[rows]),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_bfloat16(case):
    """bf16 in: the math in float32, float32 out, gradients in bf16.

    The result equals the float32 loss of the bf16-rounded inputs (rtol 1e-6: the
    upcast happens before any math), and the mean is within 2% of the float32 loss of
    the unrounded inputs (bf16 keeps 8 significant bits, a 0.4% input error).
    """
    data = case.data((6, K))
    bf16 = case(*data, dtype=jnp.bfloat16, reduction="none")
    assert bf16.dtype == jnp.promote_types(jnp.bfloat16, jnp.float32) == jnp.float32
    rounded = [np.asarray(jnp.asarray(d, jnp.bfloat16), np.float32)
               if d.dtype.kind == "f" else d for d in data]
    np.testing.assert_allclose(bf16, case(*rounded, dtype=jnp.float32,
                                          reduction="none"), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(case(*data, dtype=jnp.bfloat16),
                               case(*data, dtype=jnp.float32), rtol=2e-2)
    args = [jnp.asarray(d, jnp.bfloat16 if d.dtype.kind == "f" else None) for d in data]
    grads = jax.grad(lambda *a: case.fn(*a, **case.kwargs),
                     argnums=case.float_args)(*args)
    for g in grads:
        assert g.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("case", [c for c in FIRST_CASES if c.integer], ids=repr)
def test_out_of_range_label_is_nan_unless_excluded(case):
    x, labels = case.data((4, K))
    labels = labels.copy()
    labels[1], labels[2] = K, -1  # above range, and negative (must not wrap)
    loss = np.asarray(case(x, labels, dtype=jnp.float32, reduction="none"))
    assert np.isnan(loss[1]) and np.isnan(loss[2])
    assert np.all(np.isfinite(loss[[0, 3]]))
    where = np.array([True, False, False, True])
    for reduction in REDUCTIONS:
        got = case(x, labels, dtype=jnp.float32, reduction=reduction,
                   where=jnp.asarray(where))
        assert np.all(np.isfinite(got))
        if reduction == "none":
            np.testing.assert_array_equal(got[1:3], 0.0)
    # Both counted as ignore_index instead: excluded too.
    got = case(x, labels, dtype=jnp.float32, ignore_index=K)
    assert np.isnan(got)  # label -1 is still out of range and kept


# --- bad inputs --------------------------------------------------------------------


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_bad_shapes_and_dtypes_raise(case):
    x, t = case.data((4, K))
    fx = jnp.asarray(x, jnp.float32)
    ft = jnp.asarray(t, jnp.float32 if t.dtype.kind == "f" else None)
    data_name = {"sign": "scores", "logp": "log_predictions"}.get(case.kind, "logits")
    if case.fn is C.multiclass_hinge_loss:
        data_name = "scores"
    target_name = "labels" if case.integer else "targets"
    with pytest.raises(ValueError, match=target_name):
        case.fn(fx, ft[:3], **case.kwargs)
    with pytest.raises(TypeError, match=data_name):
        case.fn(jnp.asarray(x, jnp.int32), ft, **case.kwargs)
    if case.fn is not C.cross_entropy:  # which also takes float targets
        with pytest.raises(TypeError, match=target_name):
            bad_t = ft.astype(jnp.float32) if case.integer else ft.astype(jnp.int32)
            case.fn(fx, bad_t, **case.kwargs)
    with pytest.raises(ValueError, match="reduction must be one of"):
        case.fn(fx, ft, **case.kwargs, reduction="avg")
    with pytest.raises(TypeError, match="where"):
        case.fn(fx, ft, **case.kwargs, where=jnp.ones(case.loss_shape(x.shape)))
    with pytest.raises(ValueError, match=r"weights of shape \(3,\)"):
        case.fn(fx, ft, **case.kwargs, weights=jnp.ones(3))
    with pytest.raises(TypeError, match="weights"):
        case.fn(fx, ft, **case.kwargs, weights=jnp.ones(case.loss_shape(x.shape),
                                                       jnp.int32))
    if case.integer:
        with pytest.raises(ValueError, match="class_weights"):
            case.fn(fx, ft, **{**case.kwargs, "class_weights": jnp.ones(K + 1)})
        with pytest.raises(ValueError, match="axis"):
            case.fn(fx, ft, **case.kwargs, axis=2)
        # Labels of the wrong rank (the class axis kept).
        with pytest.raises(ValueError, match="labels"):
            case.fn(fx, jnp.zeros(x.shape, jnp.int32), **case.kwargs)


_INT = (jnp.zeros((2, K)), jnp.zeros(2, jnp.int32))
_UNIT = (jnp.zeros((2, K)), jnp.zeros((2, K)))
_SOFT = (jnp.zeros((2, K)), jnp.full((2, K), 1.0 / K))
_SMOOTHING_RANGE = r"label_smoothing must be in \[0, 1\]"
# (loss, data, out-of-range keywords, error pattern naming the argument and range)
BAD_HYPERPARAMETERS = [
    (C.cross_entropy, _INT, {"label_smoothing": 1.5}, _SMOOTHING_RANGE),
    (C.cross_entropy, _INT, {"label_smoothing": -0.1}, _SMOOTHING_RANGE),
    (C.cross_entropy, _SOFT, {"label_smoothing": 1.5}, _SMOOTHING_RANGE),
    (C.cross_entropy, _INT, {"logit_softcap": 0.0}, "logit_softcap must be > 0"),
    (C.cross_entropy, _SOFT, {"logit_softcap": -2.0}, "logit_softcap must be > 0"),
    (C.cross_entropy, _INT, {"z_loss": -1e-4}, "z_loss must be >= 0"),
    (C.binary_cross_entropy, _UNIT, {"label_smoothing": np.float32(1.5)},
     _SMOOTHING_RANGE),
    (C.sigmoid_focal_loss, _UNIT, {"gamma": -0.5}, "gamma must be >= 0"),
    (C.sigmoid_focal_loss, _UNIT, {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    (C.sigmoid_focal_loss, _UNIT, {"alpha": -0.25}, r"alpha must be in \[0, 1\]"),
    (C.focal_loss, _INT, {"gamma": -1.0}, "gamma must be >= 0"),
    (C.poly1_cross_entropy, _INT, {"epsilon": -1.5}, "epsilon must be >= -1"),
    (C.hinge_loss, _UNIT, {"margin": -1.0}, "margin must be >= 0"),
    (C.squared_hinge_loss, _UNIT, {"margin": -0.5}, "margin must be >= 0"),
    (C.multiclass_hinge_loss, _INT, {"margin": -1.0}, "margin must be >= 0"),
    (C.multiclass_hinge_loss, _INT, {"p": 3}, "p must be 1 or 2"),
    (C.multiclass_hinge_loss, _INT, {"p": 0}, "p must be 1 or 2"),
    (C.binary_cross_entropy, _UNIT, {"pos_weight": jnp.ones(3)}, "pos_weight"),
]
# The ends of each range are valid.
EDGE_HYPERPARAMETERS = [
    (C.cross_entropy, _INT, {"label_smoothing": 1.0, "z_loss": 0.0}),
    (C.cross_entropy, _SOFT, {"label_smoothing": 1.0, "logit_softcap": 1e-3}),
    (C.binary_cross_entropy, _UNIT, {"label_smoothing": 1.0}),
    (C.sigmoid_focal_loss, _UNIT, {"gamma": 0.0, "alpha": 1.0}),
    (C.sigmoid_focal_loss, _UNIT, {"alpha": 0.0}),
    (C.focal_loss, _INT, {"gamma": 0.0}),
    (C.poly1_cross_entropy, _INT, {"epsilon": -1.0}),
    (C.hinge_loss, _UNIT, {"margin": 0.0}),
    (C.multiclass_hinge_loss, _INT, {"margin": 0.0, "p": 2}),
]


@pytest.mark.parametrize("fn,data,kw,match", BAD_HYPERPARAMETERS,
                         ids=lambda v: getattr(v, "__name__", None))
def test_out_of_range_hyperparameters_raise(fn, data, kw, match):
    with pytest.raises(ValueError, match=match):
        fn(*data, **kw)


@pytest.mark.parametrize("fn,data,kw", EDGE_HYPERPARAMETERS,
                         ids=lambda v: getattr(v, "__name__", None))
def test_range_ends_are_accepted(fn, data, kw):
    assert np.isfinite(fn(*data, **kw))


# (case id in CASES, traced hyperparameter, a valid value)
TRACED = [
    ("ce", "label_smoothing", 0.2), ("ce", "z_loss", 1e-2),
    ("ce", "logit_softcap", 3.0), ("ce_smooth_cw", "label_smoothing", 0.3),
    ("ce_soft_smooth_cw", "label_smoothing", 0.3),
    ("ce_soft_smooth_cw", "z_loss", 1e-2),
    ("ce_soft_smooth_cw", "logit_softcap", 3.0),
    ("bce_pw_smooth", "label_smoothing", 0.2),
    ("sigmoid_focal_a.25_g.5", "gamma", 0.5), ("sigmoid_focal_a.25_g.5", "alpha", 0.3),
    ("focal_g.5_cw", "gamma", 0.5), ("focal", "gamma", 2.5),
    ("poly1_e-.5_cw", "epsilon", -0.5), ("poly1", "epsilon", 2.0),
    ("hinge", "margin", 0.7), ("squared_hinge", "margin", 1.3),
    ("multi_hinge_p2_cw", "margin", 0.7), ("multi_hinge", "margin", 1.2),
]
_CASE_BY_ID = {c.id: c for c in CASES}


def _traced_setup(case_id, name, value, dtype):
    """(case, loss of the hyperparameter, Python-number loss) with poisoned excluded
    entries; `fn(h, reduction)`."""
    case = _CASE_BY_ID[case_id]
    shape = (6, K)
    data = _with_ignored(case, case.data(shape, soft_only=True))
    where, weights = _mask_and_weights(case, shape)
    data = _poison(case, data, _kept(case, data, where))
    args = [jnp.asarray(d, dtype if d.dtype.kind == "f" else None) for d in data]
    kw = {"where": jnp.asarray(where), "weights": jnp.asarray(weights, dtype)}

    def fn(h, reduction="mean"):
        return case.fn(*args, **{**case.kwargs, name: h}, **kw, reduction=reduction)

    return case, fn


@pytest.mark.parametrize("case_id,name,value", TRACED)
def test_traced_hyperparameter_under_jit(case_id, name, value):
    """A schedule: the hyperparameter traced under jit equals the Python-number call,
    for every reduction, with NaN / inf in the excluded entries."""
    _, fn = _traced_setup(case_id, name, value, jnp.float32)
    for reduction in ALL_REDUCTIONS:
        traced = jax.jit(lambda h, r=reduction: fn(h, r))(jnp.float32(value))
        np.testing.assert_allclose(traced, fn(value, reduction), rtol=1e-6, atol=1e-7,
                                   err_msg=reduction)
        assert jax.tree.leaves(traced)[0].dtype == jnp.float32
    with jax.enable_x64(True):  # a float64 schedule does not widen a float32 loss
        assert jax.jit(fn)(jnp.float64(value)).dtype == jnp.float32


@pytest.mark.parametrize("case_id,name,value", TRACED)
def test_traced_hyperparameter_gradient(case_id, name, value):
    """d loss / d hyperparameter: finite with NaN / inf in excluded entries, and equal
    to float64 central differences."""
    with jax.enable_x64(True):
        _, fn = _traced_setup(case_id, name, value, jnp.float64)
        for reduction in ("sum", "mean"):
            f = jax.jit(lambda h, r=reduction: fn(h, r))
            grad = jax.grad(f)(jnp.float64(value))
            assert np.isfinite(grad), reduction
            check_grads(f, (jnp.float64(value),), order=1, modes=("rev",), eps=1e-6)


def test_traced_hyperparameter_gradients_analytic():
    """Closed forms: d/d eps of smoothed CE = uniform - nll; d/dz = lse^2; d/d margin
    of the hinge = 1 on the active entries."""
    rng = np.random.default_rng(17)
    with jax.enable_x64(True):
        x = rng.normal(0, 2, (6, K))
        y = rng.integers(0, K, 6)
        nlp = -ref.log_softmax(x)
        lse = np.log(np.exp(x).sum(-1))
        g = jax.grad(lambda e: C.cross_entropy(x, y, label_smoothing=e,
                                               reduction="sum"))(0.1)
        want = (nlp.mean(-1) - nlp[np.arange(6), y]).sum()
        np.testing.assert_allclose(g, want, rtol=1e-12)
        g = jax.grad(lambda z: C.cross_entropy(x, y, z_loss=z, reduction="sum"))(1e-3)
        np.testing.assert_allclose(g, (lse**2).sum(), rtol=1e-12)
        s, t = _make("sign", rng, (6, K))
        g = jax.grad(lambda m: C.hinge_loss(s, t, margin=m, reduction="sum"))(0.8)
        np.testing.assert_allclose(g, np.sum(0.8 - t * s > 0), rtol=1e-12)


def test_checked_cross_entropy_with_static_keywords():
    """Issue 11: checked(cross_entropy) raised TypeError for reduction="none" and a
    TracerBoolConversionError for label_smoothing=0.1."""
    rng = np.random.default_rng(18)
    x = rng.normal(0, 2, (6, K)).astype(np.float32)
    y = rng.integers(0, K, 6)
    f = lossjax.checked(C.cross_entropy)
    np.testing.assert_allclose(f(jnp.asarray(x), jnp.asarray(y), reduction="none"),
                               ref.cross_entropy(x, y), rtol=1e-6)
    want = ref.cross_entropy(x, y, label_smoothing=0.1).mean()
    np.testing.assert_allclose(f(jnp.asarray(x), jnp.asarray(y), label_smoothing=0.1),
                               want, rtol=1e-6)
    # A traced smoothing (an array) goes through checked mode as well.
    np.testing.assert_allclose(f(jnp.asarray(x), jnp.asarray(y),
                                 label_smoothing=jnp.float32(0.1)), want, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_checked_mode_with_the_documented_keywords(case):
    """checked(loss) with the case's keywords (class weights as arrays, numbers and
    strings static) gives the float64 reference for every reduction."""
    shape = (6, K)
    data = _with_ignored(case, case.data(shape))
    where, weights = _mask_and_weights(case, shape)
    kept = _kept(case, data, where)
    norm = case.normalizer(data[1], weights)
    entry = case.reference(*data)
    f = lossjax.checked(case.fn)
    with jax.enable_x64(True):
        for reduction in ALL_REDUCTIONS:
            got = f(*(jnp.asarray(d) for d in data), **case.kwargs, where=where,
                    weights=weights, reduction=reduction)
            if reduction == "sum_and_weight":
                want = (ref.reduce(entry, kept=kept, weights=weights, reduction="sum"),
                        np.where(kept, weights if norm is None else norm, 0).sum())
            else:
                want = ref.reduce(entry, kept=kept, weights=weights,
                                  reduction=reduction, normalizer=norm)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12,
                                       err_msg=reduction)


@pytest.mark.parametrize("case", FIRST_CASES, ids=repr)
def test_checked_mode_catches_bad_values(case):
    x, t = case.data((4, K))
    fn = lossjax.checked(lambda *a, **k: case.fn(*a, **case.kwargs, **k))
    fx = jnp.asarray(x, jnp.float32)
    ft = jnp.asarray(t, jnp.float32 if t.dtype.kind == "f" else None)
    assert np.isfinite(fn(fx, ft))  # good values pass
    name = case.fn.__name__
    bad_x = fx.at[0, 1].set(jnp.nan)
    with pytest.raises(AssertionError, match=f"lossjax.{name}: .* must"):
        fn(bad_x, ft)
    if case.integer:
        with pytest.raises(AssertionError, match="labels must lie in"):
            fn(fx, ft.at[2].set(K))
        # An excluded entry may hold anything.
        where = jnp.array([False, True, True, True])
        assert np.isfinite(fn(bad_x, ft.at[0].set(K), where=where))
        assert np.isfinite(fn(fx, ft.at[0].set(-100)))
    else:
        rule = "must lie in" if case.kind in ("unit", "soft") else "-1 or \\+1"
        with pytest.raises(AssertionError, match=rule):
            fn(fx, ft.at[1, 2].set(1.5))
        where = jnp.ones(ft.shape, bool).at[0, 1].set(False)
        assert np.isfinite(fn(bad_x, ft.at[0, 1].set(7.0), where=where))


# --- chex variants: jit, no jit, pmap over the 8 fake devices ------------------------


class VariantsTest(parameterized.TestCase):
    """jit, no jit and pmap give the float64 reference's value for every case."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters((c.id, c) for c in CASES)
    def test_family_under_variants(self, case):
        shape = (6, K)
        data = _with_ignored(case, case.data(shape))
        where, weights = _mask_and_weights(case, shape)
        want = ref.reduce(case.reference(*data), kept=_kept(case, data, where),
                          weights=weights,
                          normalizer=case.normalizer(data[1], weights))
        args = [jnp.asarray(d, jnp.float32 if d.dtype.kind == "f" else None)
                for d in data]
        kw = {"where": jnp.asarray(where), "weights": jnp.asarray(weights,
                                                                 jnp.float32)}
        f = self.variant(lambda *a: case.fn(*a, **case.kwargs, **kw))
        # float32 math against float64: a few float32 roundings of each term.
        np.testing.assert_allclose(f(*args), want, rtol=1e-5)


def test_pmap_shards_equal_single_device():
    """A pmap over 8 devices with a pmean'd sum equals the single-device sum."""
    n = jax.device_count()
    assert n == 8
    case = CASES[0]
    x, labels = case.data((n, 3, K))
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(labels))

    def shard_loss(x, y):
        return jax.lax.psum(C.cross_entropy(x, y, reduction="sum"), "d")

    got = jax.pmap(shard_loss, axis_name="d")(*args)
    want = C.cross_entropy(*args, reduction="sum")
    np.testing.assert_allclose(got, np.full(n, want), rtol=1e-5)


@pytest.mark.parametrize("fn,kwargs,reference", [
    (C.cross_entropy, {"label_smoothing": 0.2}, ref.cross_entropy),
    (C.multiclass_hinge_loss, {"p": 2}, ref.multiclass_hinge_loss),
], ids=["cross_entropy", "multiclass_hinge"])
def test_axis_name_gives_the_global_class_weighted_reduction(fn, kwargs, reference):
    """With axis_name, shard_map and pmap give the float64 reference on the global
    batch, though the devices keep different numbers of entries (ignore_index) and
    class weights: cross_entropy divides by the kept labels' class weights summed over
    all devices, multi_margin_loss (torch) by the kept entries' weights."""
    n = jax.device_count()
    rng = np.random.default_rng(19)
    x = rng.normal(0, 2, (2 * n, K)).astype(np.float32)
    y = rng.integers(0, K, 2 * n)
    y[[0, 1, 5]] = -100  # device 0 keeps nothing
    w = rng.uniform(0.5, 2.0, 2 * n).astype(np.float32)
    cw = CLASS_WEIGHTS.astype(np.float32)
    kept = y != -100
    entry = np.where(kept, reference(x, np.where(kept, y, 0), class_weights=cw,
                                     **kwargs), 0)
    if fn is C.cross_entropy:
        norm = w * cw[np.where(kept, y, 0)]
    else:
        norm = w
    want = {"sum": ref.reduce(entry, kept=kept, weights=w, reduction="sum"),
            "mean": ref.reduce(entry, kept=kept, weights=w, normalizer=norm)}
    want["sum_and_weight"] = (want["sum"], np.where(kept, norm, 0).sum())

    def per_device(x, y, w):
        return {r: fn(x, y, class_weights=cw, weights=w, reduction=r, axis_name="d",
                      **kwargs) for r in want}

    mesh = jax.make_mesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec("d")
    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec,
                                    out_specs=jax.sharding.PartitionSpec()))
    pmapped = jax.pmap(per_device, axis_name="d")
    args = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
    split = [a.reshape(n, 2, *a.shape[1:]) for a in args]
    for got in (sharded(*args), jax.tree.map(lambda v: v[n - 1], pmapped(*split))):
        for r in want:
            np.testing.assert_allclose(got[r], want[r], rtol=1e-5, err_msg=r)


# --- torch parity ---------------------------------------------------------------------


def _t(a):
    return torch.from_numpy(np.asarray(a))


def _close(ours, theirs, rtol=1e-10):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=rtol,
                               atol=1e-12)


class TestTorchParity:
    """Float64 torch on random inputs, several shapes and options, all reductions."""

    @pytest.mark.parametrize("shape,axis", [((6, K), -1), ((3, K, 4), 1)])
    @pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2},
                                      {"class_weights": True, "label_smoothing": 0.1}])
    def test_cross_entropy_integer_labels(self, shape, axis, opts):
        rng = np.random.default_rng(3)
        x = rng.normal(0, 2, shape)
        lshape = tuple(np.delete(shape, axis))
        y = rng.integers(0, K, lshape)
        y.reshape(-1)[[0, 5]] = -100
        cw = CLASS_WEIGHTS if opts.get("class_weights") else None
        ls = opts.get("label_smoothing", 0.0)
        tx = _t(np.moveaxis(x, axis, 1))  # torch: classes on axis 1
        with jax.enable_x64(True):
            for r in REDUCTIONS:
                ours = C.cross_entropy(jnp.asarray(x), jnp.asarray(y), axis=axis,
                                       label_smoothing=ls, reduction=r,
                                       class_weights=None if cw is None
                                       else jnp.asarray(cw))
                theirs = F.cross_entropy(tx, _t(y), weight=None if cw is None
                                         else _t(cw), label_smoothing=ls,
                                         reduction=r)
                _close(ours, theirs)

    @pytest.mark.parametrize("cw", [None, CLASS_WEIGHTS])
    def test_cross_entropy_float_targets(self, cw):
        rng = np.random.default_rng(4)
        x = rng.normal(0, 2, (3, K, 4))
        t = np.moveaxis(rng.dirichlet(np.ones(K), (3, 4)), -1, 1)
        with jax.enable_x64(True):
            for r in REDUCTIONS:
                ours = C.cross_entropy(jnp.asarray(x), jnp.asarray(t), axis=1,
                                       label_smoothing=0.1, reduction=r,
                                       class_weights=None if cw is None
                                       else jnp.asarray(cw))
                theirs = F.cross_entropy(_t(x), _t(t), label_smoothing=0.1,
                                         weight=None if cw is None else _t(cw),
                                         reduction=r)
                _close(ours, theirs)

    @pytest.mark.parametrize("shape,axis", [((6, K), -1), ((3, K, 4), 1)])
    @pytest.mark.parametrize("cw", [None, CLASS_WEIGHTS])
    def test_nll_loss(self, shape, axis, cw):
        rng = np.random.default_rng(5)
        x = ref.log_softmax(rng.normal(0, 2, shape), axis=axis)
        y = rng.integers(0, K, tuple(np.delete(shape, axis)))
        y.reshape(-1)[[1, 2]] = -100
        with jax.enable_x64(True):
            for r in REDUCTIONS:
                ours = C.nll_loss(jnp.asarray(x), jnp.asarray(y), axis=axis,
                                  reduction=r, class_weights=None if cw is None
                                  else jnp.asarray(cw))
                theirs = F.nll_loss(_t(np.moveaxis(x, axis, 1)), _t(y),
                                    weight=None if cw is None else _t(cw),
                                    reduction=r)
                _close(ours, theirs)

    @pytest.mark.parametrize("shape", [(7,), (6, K), (2, 3, K)])
    def test_binary_cross_entropy(self, shape):
        rng = np.random.default_rng(6)
        x, t = _make("unit", rng, shape)
        pw = rng.uniform(0.5, 3.0, shape[-1:])
        w = rng.uniform(0.5, 2.0, shape)
        with jax.enable_x64(True):
            for r in REDUCTIONS:
                ours = C.binary_cross_entropy(jnp.asarray(x), jnp.asarray(t),
                                              pos_weight=jnp.asarray(pw), reduction=r)
                theirs = F.binary_cross_entropy_with_logits(_t(x), _t(t),
                                                            pos_weight=_t(pw),
                                                            reduction=r)
                _close(ours, theirs)
            # torch's `weight`: the same per-entry products; its "mean" divides by
            # the entry count, ours (the contract) by the sum of weights.
            ours = C.binary_cross_entropy(jnp.asarray(x), jnp.asarray(t),
                                          weights=jnp.asarray(w), reduction="sum")
            _close(ours, F.binary_cross_entropy_with_logits(
                _t(x), _t(t), weight=_t(w), reduction="sum"))
            ours = C.binary_cross_entropy(jnp.asarray(x), jnp.asarray(t),
                                          weights=jnp.asarray(w))
            _close(ours, F.binary_cross_entropy_with_logits(
                _t(x), _t(t), weight=_t(w), reduction="sum") / w.sum())

    @pytest.mark.parametrize("alpha,gamma", [(None, 2.0), (0.25, 2.0), (0.6, 0.5),
                                             (None, 0.0)])
    def test_sigmoid_focal_loss_torchvision(self, alpha, gamma):
        """Against torchvision.ops.sigmoid_focal_loss's body, run in float64 torch."""
        rng = np.random.default_rng(7)
        x, t = _make("unit", rng, (6, K))
        tx, tt = _t(x), _t(t)
        # torchvision/ops/focal_loss.py (torchvision is not installed here).
        p = torch.sigmoid(tx)
        ce = F.binary_cross_entropy_with_logits(tx, tt, reduction="none")
        p_t = p * tt + (1 - p) * (1 - tt)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha is not None:  # torchvision: `if alpha >= 0`
            loss = (alpha * tt + (1 - alpha) * (1 - tt)) * loss
        with jax.enable_x64(True):
            for r in REDUCTIONS:
                ours = C.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(t),
                                            alpha=alpha, gamma=gamma, reduction=r)
                _close(ours, {"none": loss, "sum": loss.sum(),
                              "mean": loss.mean()}[r])

    @pytest.mark.parametrize("p,margin,cw", [(1, 1.0, None), (2, 0.7, None),
                                             (1, 1.3, CLASS_WEIGHTS),
                                             (2, 1.0, CLASS_WEIGHTS)])
    def test_multiclass_hinge_loss(self, p, margin, cw):
        rng = np.random.default_rng(8)
        x = rng.normal(0, 1, (8, K))
        y = rng.integers(0, K, 8)
        with jax.enable_x64(True):
            for r in REDUCTIONS:
                ours = C.multiclass_hinge_loss(
                    jnp.asarray(x), jnp.asarray(y), p=p, margin=margin, reduction=r,
                    class_weights=None if cw is None else jnp.asarray(cw))
                theirs = F.multi_margin_loss(_t(x), _t(y), p=p, margin=margin,
                                             weight=None if cw is None else _t(cw),
                                             reduction=r)
                _close(ours, theirs)

    @pytest.mark.parametrize("shape", [(7,), (3, K)])
    def test_soft_margin_loss(self, shape):
        rng = np.random.default_rng(9)
        s, t = _make("sign", rng, shape)
        with jax.enable_x64(True):
            for r in REDUCTIONS:
                _close(C.soft_margin_loss(jnp.asarray(s), jnp.asarray(t), reduction=r),
                       F.soft_margin_loss(_t(s), _t(t), reduction=r))


# --- sibling identities ---------------------------------------------------------------


class TestIdentities:
    def setup_method(self):
        rng = np.random.default_rng(10)
        self.x = jnp.asarray(rng.normal(0, 3, (6, K)), jnp.float32)
        self.y = jnp.asarray(rng.integers(0, K, 6))
        self.t = jnp.asarray(_make("unit", rng, (6, K))[1], jnp.float32)
        self.s = jnp.asarray(rng.choice([-1.0, 1.0], (6, K)), jnp.float32)
        self.cw = jnp.asarray(CLASS_WEIGHTS, jnp.float32)

    def test_focal_gamma0_is_cross_entropy(self):
        for kw in ({}, {"class_weights": self.cw}):
            for r in REDUCTIONS:
                np.testing.assert_array_equal(
                    C.focal_loss(self.x, self.y, gamma=0.0, reduction=r, **kw),
                    C.cross_entropy(self.x, self.y, reduction=r, **kw))

    def test_poly1_epsilon0_is_cross_entropy(self):
        np.testing.assert_allclose(
            C.poly1_cross_entropy(self.x, self.y, epsilon=0.0, reduction="none"),
            C.cross_entropy(self.x, self.y, reduction="none"), rtol=1e-6)

    def test_traced_smoothing0_is_plain_cross_entropy(self):
        """A traced 0 runs the smoothing term (a Python 0 skips it): it must add 0."""
        with jax.enable_x64(True):
            x, y, t = (np.asarray(a, np.float64) for a in (self.x, self.y, self.t))
            y = y.astype(np.int64)
            cw = np.asarray(CLASS_WEIGHTS)
            for kw in ({}, {"class_weights": cw}):
                got = jax.jit(lambda e, kw=kw: C.cross_entropy(
                    x, y, label_smoothing=e, reduction="none", **kw))(0.0)
                np.testing.assert_allclose(got, ref.cross_entropy(x, y, **kw),
                                           rtol=1e-12)
                soft = jax.nn.one_hot(y, K, dtype=jnp.float64)
                got = jax.jit(lambda e, kw=kw, soft=soft: C.cross_entropy(
                    x, soft, label_smoothing=e, reduction="none", **kw))(0.0)
                np.testing.assert_allclose(got, ref.cross_entropy_soft(x, soft, **kw),
                                           rtol=1e-12)
            got = jax.jit(lambda e: C.binary_cross_entropy(
                x, t, label_smoothing=e, reduction="none"))(0.0)
            np.testing.assert_allclose(got, ref.binary_cross_entropy(x, t), rtol=1e-12)

    def test_one_hot_float_targets_equal_integer_labels(self):
        onehot = jax.nn.one_hot(self.y, K)
        for kw in ({}, {"label_smoothing": 0.3}):
            np.testing.assert_allclose(
                C.cross_entropy(self.x, onehot, reduction="none", **kw),
                C.cross_entropy(self.x, self.y, reduction="none", **kw), rtol=1e-6)

    def test_nll_of_log_softmax_is_cross_entropy(self):
        for kw in ({}, {"class_weights": self.cw}):
            np.testing.assert_allclose(
                C.nll_loss(jax.nn.log_softmax(self.x), self.y, **kw),
                C.cross_entropy(self.x, self.y, **kw), rtol=1e-6)

    def test_sigmoid_focal_gamma0_is_bce(self):
        np.testing.assert_allclose(
            C.sigmoid_focal_loss(self.x, self.t, gamma=0.0, reduction="none"),
            C.binary_cross_entropy(self.x, self.t, reduction="none"), rtol=1e-6)

    def test_soft_margin_is_bce_of_mapped_targets(self):
        np.testing.assert_allclose(
            C.soft_margin_loss(self.x, self.s, reduction="none"),
            C.binary_cross_entropy(self.x, (self.s + 1) / 2, reduction="none"),
            rtol=1e-6)

    @pytest.mark.parametrize("fn", [C.cross_entropy, C.focal_loss, C.nll_loss,
                                    C.poly1_cross_entropy, C.multiclass_hinge_loss])
    def test_axis_equals_moving_axis_last(self, fn):
        rng = np.random.default_rng(11)
        x = jnp.asarray(rng.normal(0, 2, (3, K, 4)), jnp.float32)
        y = jnp.asarray(rng.integers(0, K, (3, 4)))
        np.testing.assert_allclose(
            fn(x, y, axis=1, reduction="none"),
            fn(jnp.moveaxis(x, 1, -1), y, reduction="none"), rtol=1e-6)
        np.testing.assert_allclose(
            fn(x, y, axis=-2, reduction="none"),
            fn(jnp.moveaxis(x, 1, -1), y, reduction="none"), rtol=1e-6)

    def test_ignore_index_equals_where(self):
        y = self.y.at[2].set(-100)
        where = jnp.arange(6) != 2
        for fn in (C.cross_entropy, C.focal_loss, C.multiclass_hinge_loss):
            np.testing.assert_array_equal(fn(self.x, y),
                                          fn(self.x, self.y, where=where))


# --- what is specific to one loss --------------------------------------------------


class TestSigmoidFocal:
    @pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0])
    def test_finite_grads_and_hessians_at_extreme_logits(self, gamma):
        x = jnp.array([1e4, -1e4, 1e4, -1e4, 1e4, -1e4, 30.0, -30.0])
        t = jnp.array([1.0, 1.0, 0.0, 0.0, 0.5, 0.3, 1.0, 0.0])
        f = lambda x: C.sigmoid_focal_loss(x, t, gamma=gamma, alpha=0.25,
                                           reduction="sum")
        assert np.isfinite(f(x))
        assert np.all(np.isfinite(jax.jit(jax.grad(f))(x)))
        assert np.all(np.isfinite(jax.jit(jax.hessian(f))(x)))

    @pytest.mark.parametrize("gamma", [0.5, 2.0])
    def test_second_derivatives_match_finite_differences(self, gamma):
        """The Hessian (diagonal: the loss is elementwise) and the mixed x-t second
        derivative from the custom JVP, against central differences of the gradient."""
        rng = np.random.default_rng(12)
        eps = 1e-6
        with jax.enable_x64(True):
            x = jnp.asarray(rng.normal(0, 2, 6))
            hard = jnp.asarray([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
            soft = jnp.asarray(rng.uniform(0.1, 0.9, 6))
            loss = lambda x, t: C.sigmoid_focal_loss(x, t, gamma=gamma, alpha=0.3,
                                                     reduction="sum")
            grad_x = jax.jit(jax.grad(loss))
            second = jax.jit(lambda x, t, dx, dt: jax.jvp(grad_x, (x, t), (dx, dt))[1])
            ones, zeros = jnp.ones_like(x), jnp.zeros_like(x)
            for t in (hard, soft):
                fd = (grad_x(x + eps, t) - grad_x(x - eps, t)) / (2 * eps)
                np.testing.assert_allclose(second(x, t, ones, zeros), fd, rtol=1e-6,
                                           atol=1e-9)
            fd = (grad_x(x, soft + eps) - grad_x(x, soft - eps)) / (2 * eps)
            np.testing.assert_allclose(second(x, soft, zeros, ones), fd, rtol=1e-6,
                                       atol=1e-9)

    def test_exact_target_gradient_at_hard_targets(self):
        """d/dt at t in {0, 1}, from the closed form: finite differences cannot."""
        with jax.enable_x64(True):
            x = jnp.array([-2.0, -0.3, 0.4, 1.7])
            t = jnp.array([0.0, 1.0, 0.0, 1.0])
            for gamma in (0.5, 2.0):
                got = jax.grad(lambda t, g=gamma: C.sigmoid_focal_loss(x, t, gamma=g,
                                                              reduction="sum"))(t)
                p = jax.nn.sigmoid(x)
                q = t * (1 - p) + (1 - t) * p  # 1 - p_t
                ce = -(t * jnp.log(p) + (1 - t) * jnp.log1p(-p))
                dce = -(jnp.log(p) - jnp.log1p(-p))
                want = gamma * q ** (gamma - 1) * ((1 - p) - p) * ce + q**gamma * dce
                np.testing.assert_allclose(got, want, rtol=1e-10)

    def test_traced_gamma(self):
        x = jnp.array([0.5, -1.0])
        t = jnp.array([1.0, 0.0])
        f = jax.jit(lambda g: C.sigmoid_focal_loss(x, t, gamma=g))
        np.testing.assert_allclose(f(2.0), C.sigmoid_focal_loss(x, t, gamma=2.0),
                                   rtol=1e-6)
        with jax.enable_x64(True):
            check_grads(jax.jit(lambda g: C.sigmoid_focal_loss(x.astype(jnp.float64),
                                                               t, gamma=g)),
                        (jnp.float64(1.5),), order=1)


class TestSoftmaxFocal:
    @pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
    def test_finite_grads_and_hessians_at_extreme_logits(self, gamma):
        x = jnp.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0], [0.0, 0.0, 1e4],
                       [30.0, 0.0, 0.0]])
        y = jnp.array([0, 0, 2, 0])
        f = lambda x: C.focal_loss(x, y, gamma=gamma, reduction="sum")
        assert np.isfinite(f(x))
        assert np.all(np.isfinite(jax.jit(jax.grad(f))(x)))
        assert np.all(np.isfinite(jax.jit(jax.hessian(f))(x)))

    def test_hessian_matches_finite_differences(self):
        rng = np.random.default_rng(13)
        eps = 1e-6
        with jax.enable_x64(True):
            x = jnp.asarray(rng.normal(0, 2, (3, 4)))
            y = jnp.asarray([0, 3, 1])
            grad = jax.jit(jax.grad(lambda x: C.focal_loss(x, y, gamma=0.5,
                                                           reduction="sum")))
            hess = jax.jit(lambda x, v: jax.jvp(grad, (x,), (v,))[1])
            for k in range(4):  # column k of each row's Hessian block
                v = jnp.zeros_like(x).at[:, k].set(1.0)
                fd = (grad(x + eps * v) - grad(x - eps * v)) / (2 * eps)
                np.testing.assert_allclose(hess(x, v), fd, rtol=1e-6, atol=1e-9)

    def test_single_class(self):
        x = jnp.array([[3.0], [-2.0]])
        y = jnp.array([0, 0])
        np.testing.assert_array_equal(C.focal_loss(x, y, reduction="none"), 0.0)
        grad = jax.jit(jax.grad(lambda x: C.focal_loss(x, y)))
        np.testing.assert_array_equal(grad(x), 0.0)


class TestCrossEntropyExtensions:
    def test_z_loss_and_softcap(self):
        rng = np.random.default_rng(14)
        x = rng.normal(0, 5, (6, K))
        y = rng.integers(0, K, 6)
        capped = 4.0 * np.tanh(x / 4.0)
        lse = np.log(np.exp(capped).sum(-1))
        want = ref.cross_entropy(capped, y) + 1e-2 * lse**2
        with jax.enable_x64(True):
            got = C.cross_entropy(jnp.asarray(x), jnp.asarray(y), z_loss=1e-2,
                                  logit_softcap=4.0, reduction="none")
        np.testing.assert_allclose(got, want, rtol=1e-10)


class TestMaskedLogsumexp:
    """cross_entropy's logsumexp: both mask placements (K below and above 64)."""

    @pytest.mark.parametrize("k", [5, C._MASK_LOGITS_MIN_CLASSES + 6])
    def test_values_and_grads_with_poisoned_excluded_rows(self, k):
        rng = np.random.default_rng(15)
        x = rng.normal(0, 3, (6, k))
        kept = np.array([True, False, True, True, False, True])
        w = rng.uniform(0.5, 2.0, 6)
        bad = x.copy()
        bad[1] = np.nan
        bad[4, ::2] = np.inf
        bad[4, 1::2] = -np.inf
        with jax.enable_x64(True):
            f = lambda x: jnp.sum(jnp.asarray(w) * C._masked_logsumexp(
                x, jnp.asarray(kept)))
            lse = np.log(np.exp(x).sum(-1))
            np.testing.assert_allclose(f(jnp.asarray(bad)), (w * lse)[kept].sum(),
                                       rtol=1e-12)
            softmax = np.exp(x - lse[:, None])
            want = np.where(kept[:, None], w[:, None] * softmax, 0.0)
            for grad in (jax.grad(f), jax.jit(jax.grad(f))):
                np.testing.assert_allclose(grad(jnp.asarray(bad)), want, rtol=1e-12,
                                           atol=1e-15)
            check_grads(jax.jit(f), (jnp.asarray(x),), order=2, modes=("rev",))
            # A kept row of -inf logits (all classes masked out) gives -inf, as
            # jax.nn.logsumexp.
            y = np.array(x)
            y[0] = -np.inf
            assert C._masked_logsumexp(jnp.asarray(y), jnp.asarray(kept))[0] == -np.inf

    @pytest.mark.parametrize("k", [5, C._MASK_LOGITS_MIN_CLASSES + 6])
    def test_cross_entropy_where_with_poisoned_rows_equals_slicing(self, k):
        rng = np.random.default_rng(16)
        x = rng.normal(0, 3, (6, k)).astype(np.float32)
        y = rng.integers(0, k, 6)
        y[3] = -100
        where = np.array([True, False, True, True, True, False])
        kept = where & (y != -100)
        bad = x.copy()
        bad[~kept] = np.nan
        bad[5, 0] = np.inf
        for kw in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3},
                   {"class_weights": jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32)}):
            masked = lambda x, kw=kw: C.cross_entropy(x, jnp.asarray(y),
                                               where=jnp.asarray(where), **kw)
            plain = lambda x, kw=kw: C.cross_entropy(x, jnp.asarray(y[kept]), **kw)
            np.testing.assert_allclose(masked(jnp.asarray(bad)), plain(x[kept]),
                                       rtol=1e-6)
            g = jax.grad(masked)(jnp.asarray(bad))
            np.testing.assert_array_equal(g[~kept], 0.0)
            np.testing.assert_allclose(g[kept], jax.grad(plain)(jnp.asarray(x[kept])),
                                       rtol=1e-5, atol=1e-8)


# --- the cross-device matrix (tests/test_matrix.py) ---------------------------------

MK = 4  # classes in the matrix cases: small, so that the matrix stays fast


def _matrix_logits(rng, batch):
    return rng.normal(0.0, 2.0, (batch, MK)).astype(np.float32)


def _matrix_labels(rng, batch):
    labels = rng.integers(0, MK, batch).astype(np.int32)
    # ignore_index: the devices keep different numbers of entries.
    labels[rng.random(batch) < 0.2] = -100
    return labels


def _matrix_int(rng, batch):
    return _matrix_logits(rng, batch), _matrix_labels(rng, batch)


def _matrix_logp(rng, batch):
    return (ref.log_softmax(_matrix_logits(rng, batch)).astype(np.float32),
            _matrix_labels(rng, batch))


def _matrix_soft(rng, batch):
    targets = rng.dirichlet(np.ones(MK), batch).astype(np.float32)
    return _matrix_logits(rng, batch), targets


def _matrix_unit(rng, batch):
    # Soft targets only: the matrix differentiates w.r.t. the targets too.
    return _matrix_logits(rng, batch), rng.uniform(0.05, 0.95, (batch, MK)).astype(
        np.float32)


def _matrix_sign(rng, batch):
    return (_matrix_logits(rng, batch),
            rng.choice([-1.0, 1.0], (batch, MK)).astype(np.float32))


def _matrix_class_weights(rng):
    return {"class_weights": rng.uniform(0.5, 2.0, MK).astype(np.float32)}


def _matrix_pos_weight(rng):
    return {"pos_weight": rng.uniform(0.5, 3.0, MK).astype(np.float32)}


_CE_HYPER = {"label_smoothing": 0.1, "z_loss": 1e-3}

MATRIX_CASES = [
    MatrixCase("cross_entropy", _matrix_int,
               kwargs={**_CE_HYPER, "logit_softcap": 5.0},
               replicated_kwargs=_matrix_class_weights,
               traced={**_CE_HYPER, "logit_softcap": 5.0}, id="int"),
    MatrixCase("cross_entropy", _matrix_soft, kwargs=_CE_HYPER,
               replicated_kwargs=_matrix_class_weights, traced=_CE_HYPER, id="soft"),
    MatrixCase("binary_cross_entropy", _matrix_unit, kwargs={"label_smoothing": 0.1},
               replicated_kwargs=_matrix_pos_weight, traced={"label_smoothing": 0.1}),
    MatrixCase("sigmoid_focal_loss", _matrix_unit, kwargs={"alpha": 0.25, "gamma": 2.0},
               traced={"alpha": 0.25, "gamma": 2.0}),
    MatrixCase("focal_loss", _matrix_int, kwargs={"gamma": 1.5},
               replicated_kwargs=_matrix_class_weights, traced={"gamma": 1.5}),
    MatrixCase("poly1_cross_entropy", _matrix_int, kwargs={"epsilon": 0.5},
               replicated_kwargs=_matrix_class_weights, traced={"epsilon": 0.5}),
    MatrixCase("nll_loss", _matrix_logp, replicated_kwargs=_matrix_class_weights),
    MatrixCase("hinge_loss", _matrix_sign, kwargs={"margin": 0.8},
               traced={"margin": 0.8}),
    MatrixCase("squared_hinge_loss", _matrix_sign, kwargs={"margin": 1.2},
               traced={"margin": 1.2}),
    MatrixCase("soft_margin_loss", _matrix_sign),
    MatrixCase("multiclass_hinge_loss", _matrix_int, kwargs={"margin": 0.9, "p": 2},
               replicated_kwargs=_matrix_class_weights, traced={"margin": 0.9}),
]
