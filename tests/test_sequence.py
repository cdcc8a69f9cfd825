"""Tests for lossjax.sequence: ctc_loss, its padding helpers and the CTC decoders.

References: torch's `F.ctc_loss` (float64, values and gradients), brute force over all
alignments for tiny cases, and a float64 NumPy forward-backward (tests/references.py).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import references as ref
import torch
import torch.nn.functional as F
from jax.test_util import check_grads
from loss_cases import MatrixCase

import lossjax
from lossjax import sequence as S

REDUCTIONS = ("none", "sum", "mean")
ALL_REDUCTIONS = REDUCTIONS + ("sum_and_weight",)


def _batch(rng, batch, num_t, num_classes, max_len, *, blank=0, scale=2.0,
           repeats=True, impossible=False, short=True):
    """Random CTC inputs (NumPy): logits [B, T, K], lengths, right-padded labels."""
    logits = rng.normal(0.0, scale, (batch, num_t, num_classes))
    non_blank = np.array([c for c in range(num_classes) if c != blank])
    labels = rng.choice(non_blank, (batch, max_len))
    label_lengths = rng.integers(0, max_len + 1, batch)
    label_lengths[0] = max_len
    logit_lengths = rng.integers(num_t // 2, num_t + 1, batch) if short else \
        np.full(batch, num_t)
    logit_lengths[0] = num_t
    if repeats and max_len >= 3:
        labels[0, 1] = labels[0, 2]  # a repeat needs a blank in between
        labels[-1, :] = labels[-1, 0]
    # Make every sequence feasible (unless asked otherwise): labels plus the blanks
    # between repeats must fit into the frames.
    for b in range(batch):
        seq = labels[b, :label_lengths[b]]
        need = len(seq) + np.sum(seq[1:] == seq[:-1])
        logit_lengths[b] = max(logit_lengths[b], min(need, num_t))
        if need > logit_lengths[b]:
            label_lengths[b] = min(label_lengths[b], logit_lengths[b] // 2)
    if impossible:
        logit_lengths[1] = 1
        label_lengths[1] = min(2, max_len)
    labels = np.where(np.arange(max_len)[None] < label_lengths[:, None], labels, -1)
    return logits, logit_lengths, labels, label_lengths


def _torch_ctc(logits, logit_lengths, labels, label_lengths, *, blank=0,
               reduction="none", zero_infinity=False, cotangent=None):
    """torch's loss (float64) and its gradient w.r.t. the logits."""
    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    lp = torch.log_softmax(x, -1).transpose(0, 1)
    loss = F.ctc_loss(lp, torch.tensor(np.maximum(labels, 0)),
                      torch.tensor(logit_lengths), torch.tensor(label_lengths),
                      blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    g = torch.ones_like(loss) if cotangent is None else torch.tensor(cotangent)
    loss.backward(g)
    return loss.detach().numpy(), x.grad.numpy()


_beam = jax.jit(S.ctc_beam_search,
                static_argnames=("beam_width", "blank_id", "top_k", "pad_value"))
# Jitted once per shape: eager mode would compile each primitive separately.
_ctc = jax.jit(S.ctc_loss, static_argnames=("blank_id", "zero_infinity", "reduction"))


def _ours(logits, logit_lengths, labels, label_lengths, **kw):
    if not isinstance(logits, jax.Array) or logits.dtype == np.float64:
        logits = jnp.asarray(logits, jnp.float32)
    return _ctc(logits, jnp.asarray(logit_lengths), jnp.asarray(labels),
                jnp.asarray(label_lengths), **kw)


class TestTorchParity:
    @pytest.mark.parametrize("shape,blank", [
        ((4, 12, 5, 4), 0), ((3, 30, 7, 9), 6), ((5, 20, 4, 6), 2), ((2, 9, 3, 0), 0)])
    def test_values_and_grads(self, shape, blank):
        rng = np.random.default_rng(0)
        x, tl, y, yl = _batch(rng, *shape, blank=blank, impossible=shape[0] > 2)
        cot = rng.uniform(0.5, 2.0, shape[0])
        combos = [(r, z) for z in (False, True) for r in REDUCTIONS]

        @jax.jit
        def ours(v):
            # One compilation for every reduction and both zero_infinity settings.
            f = lambda v, r, z: S.ctc_loss(v, tl, y, yl, blank_id=blank,
                                           reduction=r, zero_infinity=z)
            values = [f(v, r, z) for r, z in combos]
            grads = [jax.grad(lambda v, z=z: jnp.sum(jnp.asarray(cot, v.dtype) * f(
                v, "none", z)))(v) for z in (False, True)]
            return values, grads

        values, grads = ours(jnp.asarray(x, jnp.float32))
        for (reduction, zero_infinity), got in zip(combos, values, strict=True):
            want, _ = _torch_ctc(x, tl, y, yl, blank=blank, reduction=reduction,
                                 zero_infinity=zero_infinity)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
            assert not np.isnan(got).any()
        # torch's gradient with zero_infinity (its plain gradient of an infinite loss
        # is NaN; ours is 0 either way).
        _, want_g = _torch_ctc(x, tl, y, yl, blank=blank, zero_infinity=True,
                               cotangent=cot)
        for got_g in grads:
            np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=2e-6)
            # No gradient past a sequence's length.
            for b in range(shape[0]):
                assert np.all(np.asarray(got_g)[b, tl[b]:] == 0)

    def test_impossible_is_inf_or_zero(self):
        # Two repeated labels need 3 frames; 2 are given.
        x = np.zeros((1, 2, 3))
        args = (x, np.array([2]), np.array([[1, 1]]), np.array([2]))
        assert np.isinf(_ours(*args, reduction="none")[0])
        assert _ours(*args, reduction="none", zero_infinity=True)[0] == 0
        g = jax.grad(lambda v: _ours(v, *args[1:], reduction="sum"))(jnp.asarray(x))
        assert np.all(g == 0) and np.all(np.isfinite(g))
        # A label longer than the input.
        args = (np.zeros((1, 3, 4)), np.array([3]), np.array([[1, 2, 3, 1]]),
                np.array([4]))
        assert np.isinf(_ours(*args, reduction="none")[0])

    def test_no_frames(self):
        # T = 0: only the empty label sequence has an alignment (probability 1).
        x = jnp.zeros((2, 0, 4))
        args = (jnp.array([0, 0]), jnp.array([[1, 2], [0, 0]]), jnp.array([2, 0]))
        loss = _ours(x, *args, reduction="none")
        assert np.isinf(loss[0]) and loss[1] == 0
        assert jax.grad(lambda v: _ours(v, *args, reduction="sum"))(x).shape == x.shape


class TestReferences:
    def test_brute_force_over_all_alignments(self):
        rng = np.random.default_rng(0)
        cases = [([1], 4), ([1, 1], 4), ([1, 2], 5), ([2, 1, 2], 5), ([], 3),
                 ([1, 1, 1], 4), ([2, 2], 3)]  # the last two are impossible
        with jax.enable_x64(True):
            for blank in (0, 2):
                for labels, num_t in cases:
                    labels = [c if c != blank else 3 - blank - (blank == 0) for c in
                              labels]
                    x = rng.normal(0.0, 1.5, (1, num_t, 3))
                    want = ref.ctc_brute_force(x[0], labels, blank)
                    y = np.array([labels + [0] * (3 - len(labels))])
                    got = _ctc(jnp.asarray(x), jnp.array([num_t]), jnp.asarray(y),
                                     jnp.array([len(labels)]), blank_id=blank,
                                     reduction="none")
                    assert got.dtype == jnp.float64
                    np.testing.assert_allclose(got[0], want, rtol=1e-12)

    def test_float64_forward_backward_reference_and_check_grads(self):
        rng = np.random.default_rng(1)
        x, tl, y, yl = _batch(rng, 3, 8, 4, 3, short=False)
        with jax.enable_x64(True):
            f = lambda v: _ctc(v, jnp.asarray(tl), jnp.asarray(y), jnp.asarray(yl),
                               reduction="none")
            got = f(jnp.asarray(x))
            grads = jax.jit(jax.grad(lambda v: jnp.sum(f(v))))(jnp.asarray(x))
            for b in range(3):
                want, want_g = ref.ctc_nll_and_grad(x[b], y[b, :yl[b]])
                np.testing.assert_allclose(got[b], want, rtol=1e-12)
                np.testing.assert_allclose(grads[b], want_g, atol=1e-12)
            check_grads(jax.jit(lambda v: S.ctc_loss(v, jnp.asarray(tl), jnp.asarray(y),
                                                     jnp.asarray(yl))),
                        (jnp.asarray(x),), order=1, modes=["rev"])

    def test_long_sequences_stay_accurate(self):
        # T = 1000: the float32 gradient's error against float64 is no worse than
        # optax's (which differentiates through its scan).
        rng = np.random.default_rng(2)
        num_t, num_classes, max_len = 1000, 6, 20
        x = rng.normal(0.0, 3.0, (1, num_t, num_classes))
        y = rng.integers(1, num_classes, (1, max_len))
        want, want_g = ref.ctc_nll_and_grad(x[0], y[0])
        got, got_g = jax.jit(jax.value_and_grad(lambda v: _ours(
            v, [num_t], y, [max_len], reduction="sum")))(jnp.asarray(x, jnp.float32))
        ox, oy = jnp.asarray(x, jnp.float32), jnp.asarray(y)
        opt_g = jax.jit(jax.grad(lambda v: optax.ctc_loss(
            v, jnp.zeros((1, num_t)), oy, jnp.zeros((1, max_len)))[0]))(ox)
        err, opt_err = np.abs(got_g[0] - want_g).max(), np.abs(opt_g[0] - want_g).max()
        assert err <= opt_err, (err, opt_err)
        assert err < 1e-4
        np.testing.assert_allclose(got, want, rtol=1e-5)

    def test_confident_alignments_never_negative(self):
        # Logits peaked on one valid alignment: -log p ~ 1e-7, where f32 rounding
        # makes optax's loss come out negative (optax issue 1771).
        rng = np.random.default_rng(3)
        batch, num_t, num_classes, max_len = 64, 40, 8, 10
        labels = rng.integers(1, num_classes, (batch, max_len))
        path = np.zeros((batch, num_t), int)
        for b in range(batch):
            # Each label for 2 frames, then at least one blank (repeats need it).
            frames = np.sort(rng.choice(num_t // 3, max_len, replace=False)) * 3
            path[b, frames] = labels[b]
            path[b, frames + 1] = labels[b]
        # At these magnitudes optax 0.2.8 returns negative losses for 59 of the 64.
        x = rng.uniform(18.0, 24.0, (batch, num_t, 1)) * np.eye(num_classes)[path]
        args = (np.full(batch, num_t), labels, np.full(batch, max_len))
        loss = _ours(x, *args, reduction="none")
        assert np.all(np.asarray(loss) >= 0) and np.all(np.isfinite(loss))
        assert np.asarray(loss).max() < 1e-5
        g = jax.jit(jax.grad(lambda v: _ours(v, *args)))(jnp.asarray(x, jnp.float32))
        assert np.all(np.isfinite(g))


class TestContract:
    def _inputs(self, seed=0, shape=(4, 10, 5, 3)):
        x, tl, y, yl = _batch(np.random.default_rng(seed), *shape)
        return (jnp.asarray(x, jnp.float32), jnp.asarray(tl), jnp.asarray(y),
                jnp.asarray(yl))

    def test_mean_is_length_normalized_weighted_mean(self):
        x, tl, y, yl = self._inputs()
        w = jnp.array([0.5, 1.0, 2.0, 0.0])
        none = _ours(x, tl, y, yl, reduction="none")
        per = np.asarray(none) / np.maximum(np.asarray(yl), 1)
        np.testing.assert_allclose(_ours(x, tl, y, yl, weights=w),
                                   ref.reduce(per, weights=np.asarray(w)), rtol=1e-6)
        np.testing.assert_allclose(_ours(x, tl, y, yl, weights=w, reduction="sum"),
                                   ref.reduce(none, weights=np.asarray(w),
                                              reduction="sum"), rtol=1e-6)
        np.testing.assert_allclose(_ours(x, tl, y, yl, weights=w, reduction="none"),
                                   np.asarray(w) * none, rtol=1e-6)

    def test_where_equals_slicing_and_masks_nan(self):
        x, tl, y, yl = self._inputs()
        keep = jnp.array([True, False, True, False])
        x_bad = x.at[1].set(jnp.nan).at[3].set(jnp.inf)
        y_bad = y.at[3, 0].set(99)  # out of range, but excluded
        for reduction in REDUCTIONS:
            got = _ours(x_bad, tl, y_bad, yl, where=keep, reduction=reduction)
            want = _ours(x[::2], tl[::2], y[::2], yl[::2], reduction=reduction)
            if reduction == "none":
                np.testing.assert_array_equal(got[1::2], 0.0)
                got = got[::2]
            np.testing.assert_allclose(got, want, rtol=1e-6)
        g = jax.jit(jax.grad(lambda v: _ours(v, tl, y_bad, yl, where=keep)))(x_bad)
        assert np.all(np.asarray(g)[1::2] == 0) and np.all(np.isfinite(g))
        nothing = jnp.zeros(4, bool)
        g = jax.jit(jax.grad(lambda v: _ours(v, tl, y, yl, where=nothing)))(x)
        assert np.all(g == 0)
        assert _ours(x, tl, y, yl, where=jnp.zeros(4, bool)) == 0

    def test_invalid_values_give_nan_for_that_sequence_only(self):
        x, tl, y, yl = self._inputs()
        for bad in (dict(y=y.at[0, 0].set(5)), dict(y=y.at[0, 0].set(0)),  # 0 = blank
                    dict(yl=yl.at[0].set(4)), dict(tl=tl.at[0].set(11)),
                    dict(tl=tl.at[0].set(-1))):
            a = dict(tl=tl, y=y, yl=yl) | bad
            got = np.asarray(_ours(x, a["tl"], a["y"], a["yl"], reduction="none"))
            assert np.isnan(got[0]) and np.all(np.isfinite(got[1:])), bad

    def test_checked_mode_raises(self):
        x, tl, y, yl = self._inputs()
        f = lossjax.checked(lambda *a: S.ctc_loss(*a))
        f(x, tl, y, yl)  # valid inputs pass
        for bad, rule in (((x, tl, y.at[0, 0].set(7), yl), "labels must lie"),
                          ((x, tl, y, yl.at[0].set(4)), "label_lengths must lie"),
                          ((x, tl.at[2].set(11), y, yl), "logit_lengths must lie")):
            with pytest.raises(AssertionError, match=rule):
                f(*bad)

    def test_bad_shapes_and_dtypes(self):
        x, tl, y, yl = self._inputs()
        with pytest.raises(ValueError,
                           match=r"labels has shape \(3, 3\).*\(4, 10, 5\)"):
            S.ctc_loss(x, tl, y[:3], yl)
        with pytest.raises(ValueError, match=r"logit_lengths has shape \(3,\)"):
            S.ctc_loss(x, tl[:3], y, yl)
        with pytest.raises(ValueError, match="rank 3"):
            S.ctc_loss(x[0], tl, y, yl)
        with pytest.raises(TypeError, match="labels must have an integer dtype"):
            S.ctc_loss(x, tl, y.astype(jnp.float32), yl)
        with pytest.raises(TypeError, match="logits must have a floating dtype"):
            S.ctc_loss(y[:, :, None], tl, y, yl)
        with pytest.raises(ValueError, match="blank_id"):
            S.ctc_loss(x, tl, y, yl, blank_id=5)
        with pytest.raises(ValueError, match="reduction"):
            S.ctc_loss(x, tl, y, yl, reduction="avg")

    def test_bf16_and_large_logits(self):
        x, tl, y, yl = self._inputs()
        xb = x.astype(jnp.bfloat16)
        got = _ours(xb, tl, y, yl, reduction="none")
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, _ours(xb.astype(jnp.float32), tl, y, yl,
                                              reduction="none"), rtol=1e-6)
        g = jax.jit(jax.grad(lambda v: S.ctc_loss(v, tl, y, yl)))(xb)
        assert g.dtype == jnp.bfloat16
        big = 1e4 * jnp.sign(x)
        loss, g = jax.jit(jax.value_and_grad(lambda v: S.ctc_loss(v, tl, y, yl)))(big)
        assert np.isfinite(loss) and np.all(np.isfinite(g))

    def test_jit_vmap_and_registry(self):
        x, tl, y, yl = self._inputs()
        f = lambda *a: _ctc(*a, reduction="none")
        np.testing.assert_allclose(f(x, tl, y, yl), S.ctc_loss(x, tl, y, yl,
                                   reduction="none"), rtol=1e-6)
        xs = jnp.stack([x, x[::-1]])
        args = (jnp.stack([tl, tl[::-1]]), jnp.stack([y, y[::-1]]),
                jnp.stack([yl, yl[::-1]]))
        np.testing.assert_allclose(jax.vmap(f)(xs, *args)[1], f(x[::-1], tl[::-1],
                                   y[::-1], yl[::-1]), rtol=1e-6)
        gv = jax.jit(jax.vmap(jax.grad(lambda *a: jnp.sum(f(*a)))))(xs, *args)
        g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a))))(x, tl, y, yl)
        np.testing.assert_allclose(gv[0], g, rtol=1e-5, atol=1e-7)
        assert lossjax.get("ctc_loss") is S.ctc_loss
        assert set(S.__all__) >= {"ctc_loss", "ctc_greedy_decode", "ctc_beam_search",
                                  "padding_mask_to_lengths", "lengths_to_padding_mask"}


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_loss_and_grad(self):
        x, tl, y, yl = TestContract()._inputs(seed=4)
        fn = self.variant(jax.value_and_grad(
            lambda v, a, b, c: S.ctc_loss(v, a, b, c, reduction="sum")))
        loss, g = fn(x, tl, y, yl)
        want, want_g = _torch_ctc(np.asarray(x), np.asarray(tl), np.asarray(y),
                                  np.asarray(yl), reduction="sum")
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=2e-6)

    def test_pmap_over_devices(self):
        n = jax.local_device_count()
        x, tl, y, yl = _batch(np.random.default_rng(5), 2 * n, 8, 4, 3)
        split = lambda a: jnp.asarray(a).reshape((n, 2) + a.shape[1:])
        f = lambda *a: S.ctc_loss(*a, reduction="none")
        got = jax.pmap(f)(split(x.astype(np.float32)), split(tl), split(y), split(yl))
        np.testing.assert_allclose(got.reshape(-1), _ours(x, tl, y, yl,
                                                          reduction="none"), rtol=1e-6)


    def test_shard_map_over_the_batch(self):
        # Batch sharded 8 ways: per-device losses and gradients (w.r.t. the sharded
        # logits) equal the single-device call.
        from jax.sharding import PartitionSpec as P

        n = jax.local_device_count()
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        x, tl, y, yl = (jnp.asarray(a) for a in _batch(np.random.default_rng(6),
                                                         2 * n, 8, 4, 3))
        x = x.astype(jnp.float32)

        def per_device(x, tl, y, yl):
            f = lambda v: S.ctc_loss(v, tl, y, yl, reduction="none")
            return f(x), jax.grad(lambda v: jnp.sum(f(v)))(x)

        loss, grad = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"),
                                           out_specs=P("data")))(x, tl, y, yl)
        want = _ours(x, tl, y, yl, reduction="none")
        want_g = jax.jit(jax.grad(lambda v: _ours(v, tl, y, yl, reduction="sum")))(x)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        np.testing.assert_allclose(grad, want_g, rtol=1e-5, atol=1e-7)
        beam = lambda x, tl: S.ctc_beam_search(x, tl, beam_width=4)
        got = jax.jit(jax.shard_map(beam, mesh=mesh, in_specs=P("data"),
                                    out_specs=P("data")))(x, tl)
        for a, b in zip(got, jax.jit(beam)(x, tl), strict=True):
            np.testing.assert_array_equal(a, b)


class TestPaddingHelpers:
    def test_round_trip_and_optax_one_liner(self):
        rng = np.random.default_rng(6)
        x, tl, y, yl = _batch(rng, 4, 15, 6, 5)
        logit_pad = S.lengths_to_padding_mask(jnp.asarray(tl), 15)
        label_pad = S.lengths_to_padding_mask(jnp.asarray(yl), 5)
        assert logit_pad.dtype == jnp.float32
        np.testing.assert_array_equal(S.padding_mask_to_lengths(logit_pad), tl)
        np.testing.assert_array_equal(S.padding_mask_to_lengths(label_pad), yl)
        xf = jnp.asarray(x, jnp.float32)
        want = optax.ctc_loss(xf, logit_pad, jnp.asarray(np.maximum(y, 0)), label_pad)
        got = _ctc(xf, S.padding_mask_to_lengths(logit_pad), jnp.asarray(y),
                         S.padding_mask_to_lengths(label_pad), reduction="none")
        np.testing.assert_allclose(got, want, rtol=1e-4)


class TestDecoders:
    def test_greedy_decode(self):
        rng = np.random.default_rng(7)
        x = rng.normal(size=(5, 12, 4))
        tl = np.array([12, 7, 0, 12, 3])
        labels, lengths = S.ctc_greedy_decode(jnp.asarray(x), jnp.asarray(tl))
        for b in range(5):
            want = ref.ctc_collapse(np.argmax(x[b, :tl[b]], -1), 0)
            assert lengths[b] == len(want)
            assert tuple(np.asarray(labels[b, :lengths[b]])) == want
            assert np.all(np.asarray(labels[b, lengths[b]:]) == -1)
        labels, _ = jax.jit(lambda v: S.ctc_greedy_decode(v, jnp.asarray(tl),
                                                          blank_id=3, pad_value=9))(x)
        want = ref.ctc_collapse(np.argmax(x[0], -1), 3)
        assert tuple(np.asarray(labels[0, :len(want)])) == want

    @pytest.mark.parametrize("blank", [0, 2])
    def test_beam_search_is_exact_with_a_wide_beam(self, blank):
        # T = 5, K = 3: at most 63 distinct prefixes, so a beam of 64 loses nothing and
        # must find the brute-force argmax over labelings, with its probability.
        rng = np.random.default_rng(8)
        x = rng.normal(0.0, 1.0, (6, 5, 3))
        tl = np.array([5, 5, 5, 4, 3, 5])
        labels, lengths, log_probs = _beam(
            jnp.asarray(x), jnp.asarray(tl), beam_width=64, blank_id=blank, top_k=3)
        for b in range(6):
            probs = ref.ctc_labeling_probs(x[b, :tl[b]], blank)
            ranked = sorted(probs.items(), key=lambda kv: -kv[1])
            for k in range(3):
                got = tuple(np.asarray(labels[b, k, :lengths[b, k]]))
                assert np.isclose(probs[got], ranked[k][1], rtol=1e-5)
                np.testing.assert_allclose(np.exp(log_probs[b, k]), ranked[k][1],
                                           rtol=1e-4)
            best, n = _beam(jnp.asarray(x), jnp.asarray(tl),
                                        beam_width=64, blank_id=blank)
            assert tuple(np.asarray(best[b, :n[b]])) == ranked[0][0] or np.isclose(
                probs[tuple(np.asarray(best[b, :n[b]]))], ranked[0][1])

    def test_beam_search_agrees_with_greedy_on_peaked_outputs(self):
        rng = np.random.default_rng(9)
        path = rng.integers(0, 5, (4, 20))
        x = 12.0 * np.eye(5)[path] + rng.normal(0.0, 0.1, (4, 20, 5))
        tl = jnp.array([20, 15, 20, 9])
        g_labels, g_len = S.ctc_greedy_decode(jnp.asarray(x), tl)
        for width in (1, 4):
            b_labels, b_len = jax.jit(lambda v, width=width: _beam(
                v, tl, beam_width=width))(jnp.asarray(x))
            np.testing.assert_array_equal(b_len, g_len)
            np.testing.assert_array_equal(b_labels, g_labels)


# --- ISSUE 11: padding, hyperparameters, checked mode, devices -----------------------


def _pad_with(x, logit_lengths, fill):
    """`x` with every frame at t >= logit_lengths replaced by `fill` ("mixed": NaN,
    -inf and +inf in turn)."""
    x = np.array(x, np.float32, copy=True)
    pad = np.arange(x.shape[1])[None, :] >= np.asarray(logit_lengths)[:, None]
    if fill == "mixed":
        values = np.array([np.nan, -np.inf, np.inf], np.float32)
        fills = values[np.arange(x.size).reshape(x.shape) % 3]
        return np.where(pad[..., None], fills, x)
    return np.where(pad[..., None], np.float32(fill), x)


def _ref_reductions(x, tl, y, yl, *, blank=0, zero_infinity=False, where=None,
                    weights=None):
    """Every reduction from torch's float64 per-sequence losses (and "mean" as
    torch: each sequence / its label length, then the weighted mean)."""
    none, _ = _torch_ctc(x, tl, y, yl, blank=blank, zero_infinity=zero_infinity)
    per = none / np.maximum(yl, 1)
    kept = None if where is None else np.asarray(where)
    w = None if weights is None else np.asarray(weights, np.float64)
    w1 = np.ones(len(none)) if w is None else w
    k1 = np.ones(len(none), bool) if kept is None else kept
    return {"none": ref.reduce(none, kept=kept, weights=w, reduction="none"),
            "sum": ref.reduce(none, kept=kept, weights=w, reduction="sum"),
            "mean": ref.reduce(per, kept=kept, weights=w, reduction="mean"),
            "sum_and_weight": (ref.reduce(per, kept=kept, weights=w, reduction="sum"),
                               np.sum(np.where(k1, w1, 0.0)))}


class TestNonFinitePadding:
    @pytest.mark.parametrize("fill", ["nan", "-inf", "+inf", "mixed"])
    def test_values_and_grads_equal_clean_padding(self, fill):
        # Frames past logit_lengths holding NaN / -inf (where(mask, logits, -inf)) /
        # +inf: the loss equals the clean-padding call and torch's, the gradient is 0
        # and finite past the lengths and equal to the clean one elsewhere.
        rng = np.random.default_rng(10)
        x, tl, y, yl = _batch(rng, 6, 12, 5, 4)
        where = np.array([True, True, False, True, True, True])
        w = rng.uniform(0.5, 2.0, 6).astype(np.float32)
        cot = rng.uniform(0.5, 2.0, 6).astype(np.float32)
        bad = _pad_with(x, tl, {"nan": np.nan, "-inf": -np.inf, "+inf": np.inf}.get(
            fill, fill))
        bad[2] = np.nan  # an excluded sequence, NaN everywhere

        @jax.jit
        def run(v):
            f = lambda v, r: S.ctc_loss(v, tl, y, yl, where=where, weights=w,
                                        reduction=r)
            values = {r: f(v, r) for r in ALL_REDUCTIONS}
            grads = {"none": jax.grad(lambda v: jnp.sum(cot * f(v, "none")))(v),
                     "mean": jax.grad(lambda v: f(v, "mean"))(v)}
            return values, grads

        clean_values, clean_grads = run(jnp.asarray(x, jnp.float32))
        values, grads = run(jnp.asarray(bad))
        want = _ref_reductions(x, tl, y, yl, where=where, weights=w)
        pad = np.arange(12)[None, :] >= tl[:, None]
        pad[2] = True
        for r in ALL_REDUCTIONS:
            np.testing.assert_array_equal(values[r], clean_values[r])
            np.testing.assert_allclose(values[r], want[r], rtol=2e-5, atol=1e-5)
        _, want_g = _torch_ctc(x, tl, y, yl, cotangent=cot * w * where)
        for r, g in grads.items():
            g = np.asarray(g)
            assert np.all(np.isfinite(g)), r
            assert np.all(g[pad] == 0), r
            np.testing.assert_array_equal(g, clean_grads[r])
        np.testing.assert_allclose(grads["none"], want_g, rtol=1e-4, atol=2e-6)

    def test_checked_mode_looks_only_at_counted_frames(self):
        rng = np.random.default_rng(11)
        x, tl, y, yl = _batch(rng, 4, 10, 5, 3)
        bad = _pad_with(x, tl, "mixed")
        where = np.array([True, False, True, True])
        f = lossjax.checked(S.ctc_loss)
        want = _ref_reductions(x, tl, y, yl, where=where)
        for r in ALL_REDUCTIONS:
            np.testing.assert_allclose(f(bad, tl, y, yl, where=where, reduction=r),
                                       want[r], rtol=2e-5, atol=1e-5)
        # A NaN in a counted frame of an excluded sequence passes; of a kept one fails.
        excluded = bad.copy()
        excluded[1, 0, 0] = np.nan
        f(excluded, tl, y, yl, where=where)
        kept = bad.copy()
        kept[3, tl[3] - 1, 2] = np.nan
        with pytest.raises(AssertionError, match="ctc_loss: logits"):
            f(kept, tl, y, yl, where=where)


class TestHyperparametersAndChecked:
    def test_blank_id_out_of_range_names_the_range(self):
        x, tl, y, yl = TestContract()._inputs()
        for bad in (-1, 5, np.int64(9)):
            with pytest.raises(ValueError, match=r"blank_id must be in \[0, 5\)"):
                S.ctc_loss(x, tl, y, yl, blank_id=bad)
        for bad in (1.0, True, jnp.array(0)):
            with pytest.raises(TypeError, match="blank_id must be a Python int"):
                S.ctc_loss(x, tl, y, yl, blank_id=bad)

    def test_zero_infinity_is_a_bool_static_or_traced(self):
        x, tl, y, yl = (jnp.asarray(a) for a in _batch(
            np.random.default_rng(12), 4, 10, 5, 3, impossible=True))
        x = x.astype(jnp.float32)
        with pytest.raises(TypeError, match="zero_infinity must be a bool"):
            S.ctc_loss(x, tl, y, yl, zero_infinity=1)
        traced = jax.jit(lambda z: S.ctc_loss(x, tl, y, yl, zero_infinity=z,
                                              reduction="none"))
        for z in (False, True):
            want, _ = _torch_ctc(np.asarray(x), np.asarray(tl), np.asarray(y),
                                 np.asarray(yl), zero_infinity=z)
            np.testing.assert_allclose(traced(jnp.asarray(z)), want, rtol=2e-5)
            np.testing.assert_array_equal(
                traced(jnp.asarray(z)), _ours(x, tl, y, yl, zero_infinity=z,
                                              reduction="none"))

    def test_checked_with_blank_id_zero_infinity_every_reduction(self):
        # checked() used to trace blank_id and raise ValueError for blank_id=0.
        rng = np.random.default_rng(13)
        f = lossjax.checked(S.ctc_loss)
        x, tl, y, yl = _batch(rng, 4, 10, 5, 3, impossible=True)
        x = x.astype(np.float32)
        want = _ref_reductions(x, tl, y, yl, blank=0)
        np.testing.assert_allclose(f(x, tl, y, yl, blank_id=0, reduction="none"),
                                   want["none"], rtol=2e-5)
        x, tl, y, yl = _batch(rng, 4, 10, 5, 3, blank=4, impossible=True)
        x = x.astype(np.float32)
        for z in (False, True):
            want = _ref_reductions(x, tl, y, yl, blank=4, zero_infinity=z)
            for r in ALL_REDUCTIONS:
                np.testing.assert_allclose(
                    f(x, tl, y, yl, blank_id=4, zero_infinity=z, reduction=r),
                    want[r], rtol=2e-5, atol=1e-5, err_msg=f"{r} {z}")

    def test_sum_and_weight_accumulates_micro_batches_exactly(self):
        rng = np.random.default_rng(14)
        x, tl, y, yl = _batch(rng, 8, 10, 5, 3)
        x = x.astype(np.float32)
        w = rng.uniform(0.5, 2.0, 8).astype(np.float32)
        parts = [_ours(x[s], tl[s], y[s], yl[s], weights=w[s],
                       reduction="sum_and_weight") for s in (slice(0, 3), slice(3, 8))]
        total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        np.testing.assert_allclose(total, _ref_reductions(x, tl, y, yl, weights=w)[
            "mean"], rtol=2e-5)


class TestAxisName:
    """"mean" (per-sequence / label length, then the weighted mean) and "sum" over
    the global batch with axis_name, vs torch on the concatenated batch."""

    def _global(self):
        n = jax.local_device_count()
        rng = np.random.default_rng(15)
        x, tl, y, yl = _batch(rng, 2 * n, 8, 4, 3)
        where = rng.random(2 * n) < 0.7
        where[:2] = False  # the first device keeps nothing
        w = rng.uniform(0.5, 2.0, 2 * n).astype(np.float32)
        return n, x.astype(np.float32), tl, y, yl, where, w

    def _want(self, x, tl, y, yl, where, w):
        want = _ref_reductions(x, tl, y, yl, where=where, weights=w)
        none, _ = _torch_ctc(x, tl, y, yl)
        denom = np.sum(w * where)
        _, g_mean = _torch_ctc(x, tl, y, yl,
                               cotangent=w * where / np.maximum(yl, 1) / denom)
        _, g_sum = _torch_ctc(x, tl, y, yl, cotangent=w * where)
        return want, {"mean": g_mean, "sum": g_sum}

    def _loss(self, x, tl, y, yl, where, w, r, axis_name):
        return S.ctc_loss(x, tl, y, yl, where=where, weights=w, reduction=r,
                          axis_name=axis_name)

    def test_shard_map(self):
        from jax.sharding import PartitionSpec as P

        n, *data = self._global()
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

        def per_device(*a):
            out = {r: self._loss(*a, r, "data") for r in ("sum", "mean")}
            grads = {r: jax.grad(lambda v, r=r: self._loss(v, *a[1:], r, "data"))(
                a[0]) for r in ("sum", "mean")}
            return out, grads

        out, grads = jax.jit(jax.shard_map(
            per_device, mesh=mesh, in_specs=P("data"),
            out_specs=({"sum": P(), "mean": P()}, P("data"))))(*data)
        want, want_g = self._want(*data)
        for r in ("sum", "mean"):
            np.testing.assert_allclose(out[r], want[r], rtol=2e-5)
            np.testing.assert_allclose(grads[r], want_g[r], rtol=1e-4, atol=2e-6)

    def test_pmap(self):
        n, *data = self._global()
        split = lambda a: np.asarray(a).reshape((n, 2) + np.shape(a)[1:])

        def per_device(*a):
            return {r: jax.value_and_grad(
                lambda v, r=r: self._loss(v, *a[1:], r, "data"))(a[0])
                for r in ("sum", "mean")}

        got = jax.pmap(per_device, axis_name="data")(*map(split, data))
        want, want_g = self._want(*data)
        for r in ("sum", "mean"):
            value, grad = got[r]
            np.testing.assert_allclose(value, np.full(n, want[r]), rtol=2e-5)
            np.testing.assert_allclose(np.asarray(grad).reshape(want_g[r].shape),
                                       want_g[r], rtol=1e-4, atol=2e-6)


def _matrix_data(fill, blank, impossible):
    def data(rng, batch):
        x, tl, y, yl = _batch(rng, batch, 12, 5, 4, blank=blank, impossible=impossible)
        return (_pad_with(x, tl, fill), tl.astype(np.int32),
                np.where(y < 0, blank, y).astype(np.int32), yl.astype(np.int32))
    return data


MATRIX_CASES = [
    # The usual where(mask, logits, -inf) padding past logit_lengths.
    MatrixCase("ctc_loss", _matrix_data(-np.inf, 0, False), kwargs={"blank_id": 0},
               id="neg_inf_padding"),
    # The last class as blank, an impossible sequence zeroed, NaN/+-inf padding.
    MatrixCase("ctc_loss", _matrix_data("mixed", 4, True),
               kwargs={"blank_id": 4, "zero_infinity": True}, id="zero_infinity"),
]
