"""Sequence losses: connectionist temporal classification (CTC) and its decoders."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lossjax import _checks
from lossjax._reduce import compute_dtype, kept_mask, reduce_loss

__all__ = [
    "ctc_loss",
    "ctc_greedy_decode",
    "ctc_beam_search",
    "padding_mask_to_lengths",
    "lengths_to_padding_mask",
]
LOSS_NAMES = ("ctc_loss",)

_NEG_INF = -np.inf


# --- optax-style padding masks ---------------------------------------------------------


def padding_mask_to_lengths(paddings: jax.Array) -> jax.Array:
    """Lengths `[batch]` (int32) from optax-style right-padding masks `[batch, time]`.

    optax's CTC takes `paddings` with 1.0 at padded steps and 0.0 at real ones (right
    padding); lossjax takes lengths. Switching from optax is one line::

        optax.ctc_loss(logits, logit_paddings, labels, label_paddings)
        # becomes
        lossjax.ctc_loss(logits, padding_mask_to_lengths(logit_paddings), labels,
                         padding_mask_to_lengths(label_paddings), reduction="none")

    Args:
      paddings: float or bool `[batch, time]`, 1 (True) where padded.

    Returns:
      int32 `[batch]`: the number of unpadded steps per row.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.padding_mask_to_lengths(jnp.array([[0., 0., 1.], [0., 0., 0.]]))
      Array([2, 3], dtype=int32)

    See also: `lengths_to_padding_mask`.
    """
    _checks.check_rank("paddings", paddings, 2)
    return jnp.sum(jnp.asarray(paddings) == 0, axis=-1, dtype=jnp.int32)


def lengths_to_padding_mask(
    lengths: jax.Array, max_len: int, dtype=jnp.float32
) -> jax.Array:
    """Optax-style right-padding mask `[batch, max_len]` from lengths `[batch]`.

    The inverse of `padding_mask_to_lengths`: 1.0 at padded steps (`t >= length`),
    0.0 at real ones, in `dtype` (float32 as optax expects by default).

    Args:
      lengths: int `[batch]`.
      max_len: the padded length (static).
      dtype: dtype of the mask.

    Returns:
      `[batch, max_len]` of `dtype`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.lengths_to_padding_mask(jnp.array([2, 3]), 3)
      Array([[0., 0., 1.],
             [0., 0., 0.]], dtype=float32)

    See also: `padding_mask_to_lengths`.
    """
    _checks.check_int("lengths", lengths)
    _checks.check_rank("lengths", lengths, 1)
    steps = jnp.arange(max_len)
    return (steps[None, :] >= jnp.asarray(lengths)[:, None]).astype(dtype)


# --- CTC loss: forward (alpha) and backward (beta) recursions in log space ---------


def _lse3(a, b, c):
    """log(e^a + e^b + e^c) that is -inf (never NaN) when all three are -inf."""
    # max + log of exp-sums: one log and three exps, cheaper than two logaddexps.
    m = jnp.maximum(jnp.maximum(a, b), c)
    m = jnp.where(m == _NEG_INF, 0.0, m)
    return m + jnp.log(jnp.exp(a - m) + jnp.exp(b - m) + jnp.exp(c - m))


def _shift_right(x, n):
    """x[..., s - n] along the last axis, -inf where s < n."""
    n = min(n, x.shape[-1])
    pad = jnp.full(x.shape[:-1] + (n,), _NEG_INF, x.dtype)
    return jnp.concatenate([pad, x[..., : x.shape[-1] - n]], axis=-1)


def _shift_left(x, n):
    """x[..., s + n] along the last axis, -inf where s + n >= S."""
    n = min(n, x.shape[-1])
    pad = jnp.full(x.shape[:-1] + (n,), _NEG_INF, x.dtype)
    return jnp.concatenate([x[..., n:], pad], axis=-1)


def _extended(labels, blank_id):
    """Blank-interleaved labels [B, 2L+1] and the skip mask (s-2 -> s allowed)."""
    batch, max_len = labels.shape
    ext = jnp.full((batch, 2 * max_len + 1), blank_id, labels.dtype)
    ext = ext.at[:, 1::2].set(labels)
    # A skip over a blank is allowed into a label that differs from the previous one.
    prev = jnp.concatenate([jnp.full((batch, 2), blank_id, ext.dtype), ext], 1)[:, :-2]
    odd = (jnp.arange(ext.shape[1]) % 2 == 1)[None, :]
    skip = odd & (ext != prev) & (jnp.arange(ext.shape[1]) >= 2)[None, :]
    return ext, skip


def _emissions(logp, ext):
    """log-probs [B, T, K] gathered at the extended labels, time-major [T, B, S]."""
    # Transpose the small [B, T, K] first, then gather S entries from each contiguous
    # row of K with a full [T, B, S] index: an index broadcast over T would make XLA
    # gather strided columns of T, and transposing the [B, S, T] result is slow on CPU.
    # Never a one-hot of the labels.
    logp = jnp.swapaxes(logp, 0, 1)
    idx = jnp.broadcast_to(ext[None], (logp.shape[0],) + ext.shape)
    return jnp.take_along_axis(logp, idx, axis=2, mode="promise_in_bounds")


def _alpha_scan(emit, skip, logit_lengths, save):
    """Forward variables, rescaled per frame.

    Returns (final alpha [B, S], log scale [B], alphas [T, B, S] or None): the true
    log alpha of frame t is alphas[t] plus the sum of the per-frame maxima up to t;
    the final one is `final + log_scale`.
    """
    num_t, batch, num_s = emit.shape
    skip_bias = jnp.where(skip, 0.0, _NEG_INF).astype(emit.dtype)
    init = jnp.full((batch, num_s), _NEG_INF, emit.dtype).at[:, 0].set(0.0)

    def step(alpha, xs):
        e, t = xs
        new = e + _lse3(alpha, _shift_right(alpha, 1), _shift_right(alpha, 2) + skip_bias)
        # Subtracting each frame's maximum keeps the values O(1): rounding then does
        # not grow with the magnitude of log alpha over long sequences.
        peak = jnp.max(new, axis=-1)
        active = (t < logit_lengths) & (peak > _NEG_INF)
        peak = jnp.where(active, peak, 0.0)
        # Past its length a sequence's alpha is frozen, so the final carry holds the
        # alpha of its last frame.
        new = jnp.where((t < logit_lengths)[:, None], new - peak[:, None], alpha)
        return new, ((new, peak) if save else peak)

    # unroll > 1 measured several times slower on CPU (XLA duplicates the shifts).
    final, out = lax.scan(step, init, (emit, jnp.arange(num_t)))
    alphas, peaks = out if save else (None, out)
    # Summed after the loop (pairwise) rather than carried: less rounding.
    return final, jnp.sum(peaks, axis=0), alphas


def _final_states_mask(label_lengths, num_s):
    s = jnp.arange(num_s)[None, :]
    last = 2 * label_lengths[:, None]
    return (s == last) | (s == last - 1)


def _log_likelihood(alpha_final, log_scale, label_lengths):
    """log p(labels | x): logsumexp of alpha over the two final states."""
    final = jnp.where(_final_states_mask(label_lengths, alpha_final.shape[-1]),
                      alpha_final, _NEG_INF)
    m = jnp.max(final, axis=-1)
    m_safe = jnp.where(m == _NEG_INF, 0.0, m)
    return log_scale + m_safe + jnp.log(
        jnp.sum(jnp.exp(final - m_safe[:, None]), axis=-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ctc_core(logits, logit_lengths, labels, label_lengths, blank_id):
    ext, skip = _extended(labels, blank_id)
    emit = _emissions(jax.nn.log_softmax(logits, axis=-1), ext)
    final, log_scale, _ = _alpha_scan(emit, skip, logit_lengths, save=False)
    # Clamped at 0: f32 rounding can push a confident alignment's -log p slightly
    # below 0 (optax issue 1771), which turns into NaN downstream.
    return jnp.maximum(-_log_likelihood(final, log_scale, label_lengths), 0.0)


def _ctc_core_fwd(logits, logit_lengths, labels, label_lengths, blank_id):
    ext, skip = _extended(labels, blank_id)
    logp = jax.nn.log_softmax(logits, axis=-1)
    emit = _emissions(logp, ext)
    final, log_scale, alphas = _alpha_scan(emit, skip, logit_lengths, save=True)
    log_z = _log_likelihood(final, log_scale, label_lengths)
    nll = jnp.maximum(-log_z, 0.0)
    # The emissions are re-gathered in the backward pass (cheap) rather than saved.
    return nll, (logp, logit_lengths, labels, label_lengths, alphas, log_z)


def _occupancy_to_classes(occ, labels, blank_id, num_classes):
    """Sums the state occupancies [T, B, S] into classes, [B, T, K]."""
    occ_blank = jnp.sum(occ[:, :, 0::2], axis=-1)  # [T, B]: blanks are the even states
    occ_labels = occ[:, :, 1::2]  # [T, B, L]
    # A matmul with the one-hot of the labels, [B, L, K] (never [B, T, K]): measured
    # 2x faster on CPU than a scatter-add of the T*B*L occupancies. HIGHEST precision
    # so that GPUs and TPUs do not round the occupancies to tf32 / bf16.
    onehot = jax.nn.one_hot(labels, num_classes, dtype=occ.dtype)  # [B, L, K]
    occ_k = jnp.einsum("tbl,blk->btk", occ_labels, onehot,
                       precision=lax.Precision.HIGHEST)
    return occ_k.at[:, :, blank_id].add(occ_blank.T)


def _ctc_core_bwd(blank_id, res, g):
    logp, logit_lengths, labels, label_lengths, alphas, log_z = res
    num_t, batch, num_s = alphas.shape
    ext, skip = _extended(labels, blank_id)
    emit = _emissions(logp, ext)
    # skip_bias[s] = 0 where s -> s + 2 is allowed (skip[s + 2]), else -inf.
    skip_bias = _shift_left(jnp.where(skip, 0.0, _NEG_INF).astype(alphas.dtype), 2)
    final_init = jnp.where(_final_states_mask(label_lengths, num_s), 0.0, _NEG_INF)
    possible = jnp.isfinite(log_z)

    def step(bh_next, xs):
        e, t = xs
        beta = _lse3(bh_next, _shift_left(bh_next, 1),
                     _shift_left(bh_next, 2) + skip_bias)
        beta = jnp.where((t >= logit_lengths - 1)[:, None], final_init, beta)
        # Rescaled per frame like alpha; the scale cancels in the occupancies.
        peak = jnp.max(beta, axis=-1, keepdims=True)
        beta = beta - jnp.where(peak > _NEG_INF, peak, 0.0)
        return e + beta, beta

    init = jnp.full((batch, num_s), _NEG_INF, alphas.dtype)
    _, betas = lax.scan(step, init, (emit, jnp.arange(num_t)), reverse=True)
    # Posterior occupancy of state s at frame t (0 past the sequence's length),
    # computed outside the scan where XLA vectorizes it over all frames at once.
    valid_t = (jnp.arange(num_t)[:, None] < logit_lengths[None, :])[:, :, None]
    # Normalized per frame rather than by the global log p: the occupancies of a frame
    # sum to exactly 1, and the rounding that alpha and beta accumulate over long
    # sequences (shared by all states of a frame) cancels.
    log_occ = alphas + betas
    peak = jnp.max(log_occ, axis=-1, keepdims=True)
    occ = jnp.exp(log_occ - jnp.where(jnp.isfinite(peak), peak, 0.0))
    total = jnp.sum(occ, axis=-1, keepdims=True)
    occ = jnp.where(valid_t & (total > 0), occ / jnp.where(total > 0, total, 1.0), 0.0)
    occ_k = _occupancy_to_classes(occ, labels, blank_id, logp.shape[-1])
    valid = jnp.arange(num_t)[None, :] < logit_lengths[:, None]  # [B, T]
    scale = jnp.where(possible, g, 0.0)[:, None, None] * valid[:, :, None]
    # d(-log p)/d logits = softmax - occupancy (the log_softmax Jacobian folded in).
    grad = (jnp.exp(logp) - occ_k) * scale
    return grad, None, None, None


_ctc_core.defvjp(_ctc_core_fwd, _ctc_core_bwd)


def _ctc_inputs(loss, logits, logit_lengths, labels, label_lengths, blank_id):
    """Trace-time checks shared by the CTC loss; returns (batch, time, classes, L)."""
    _checks.check_float("logits", logits)
    _checks.check_int("logit_lengths", logit_lengths)
    _checks.check_int("labels", labels)
    _checks.check_int("label_lengths", label_lengths)
    _checks.check_rank("logits", logits, 3)
    _checks.check_rank("labels", labels, 2)
    batch, num_t, num_classes = logits.shape
    against = f"logits of shape {logits.shape} ([batch, time, classes])"
    _checks.check_shape("logit_lengths", logit_lengths, (batch,), against=against)
    _checks.check_shape("labels", labels, (batch, labels.shape[1]), against=against)
    _checks.check_shape("label_lengths", label_lengths, (batch,), against=against)
    if not isinstance(blank_id, (int, np.integer)) or not 0 <= blank_id < num_classes:
        raise ValueError(
            f"blank_id must be an int in [0, {num_classes}), got {blank_id!r}.")
    return batch, num_t, num_classes, labels.shape[1]


def ctc_loss(
    logits: jax.Array,
    logit_lengths: jax.Array,
    labels: jax.Array,
    label_lengths: jax.Array,
    *,
    blank_id: int = 0,
    zero_infinity: bool = False,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Connectionist temporal classification (CTC) loss, with an analytic gradient.

    For sequence labelling without a frame-level alignment (speech and handwriting
    recognition): the negative log-probability of the label sequence, summed over all
    frame-level alignments that collapse to it (merge repeats, then drop blanks).
    Matches `torch.nn.functional.ctc_loss` applied to `log_softmax(logits)` moved to
    time-major, in every reduction and with `zero_infinity`; unlike `optax.ctc_loss`
    it takes lengths (see `padding_mask_to_lengths` to switch in one line), gives
    `inf` (not ~1e5) when no alignment fits, and is never negative.

    .. math::
        \ell_b = -\log \sum_{\pi \in \mathcal{B}^{-1}(y_b)}
                 \prod_{t < T_b} \mathrm{softmax}(x_{b,t})_{\pi_t},
        \qquad
        \frac{\partial \ell_b}{\partial x_{b,t,k}} = \mathrm{softmax}(x_{b,t})_k -
        \sum_{s:\, y'_s = k} \frac{\alpha_t(s)\, \beta_t(s)}{p(y_b \mid x_b)}

    with :math:`\mathcal{B}` the collapse map, :math:`y'` the labels with blanks
    interleaved, and :math:`\alpha, \beta` the forward and backward variables. Both
    recursions run in log space in float32 (bf16 / f16 logits are upcast), and the
    gradient comes from them directly (a `jax.custom_vjp`) rather than from autodiff
    through the time loop: O(B·T·(2L+1)) memory, nothing of size B·T·L·K.

    Args:
      logits: float `[batch, time, num_classes]`, unnormalized; `blank_id` is one of
        the classes.
      logit_lengths: int `[batch]`, the number of valid frames per sequence (frames at
        `t >= logit_lengths` are ignored and get zero gradient); at most `time`.
      labels: int `[batch, max_label_len]`, right-padded label ids (the padding value
        is never read); valid labels lie in `[0, num_classes)` and differ from
        `blank_id`.
      label_lengths: int `[batch]`, at most `max_label_len`.
      blank_id: the class id of the blank.
      zero_infinity: if True, a sequence with no valid alignment (its labels,
        counting a blank between repeats, need more than `logit_lengths` frames) has
        loss 0 and zero gradient instead of `inf`, as torch's flag.
      where: bool, broadcastable to `[batch]`; False sequences count for nothing, with
        zero gradient even if their logits hold NaN.
      weights: float, broadcastable to `[batch]`; per-sequence weights.
      reduction: "none", "sum" or "mean". "mean" divides each sequence's loss by its
        label length (clamped to at least 1) and then takes the weighted mean over
        the kept sequences (`sum(w * loss / length) / sum(w)`), torch's convention;
        "none" and "sum" use the loss not divided by length.

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar. dtype
      `promote_types(logits.dtype, float32)`. An invalid sequence (a label out of
      range or equal to `blank_id`, or a length out of range) gives NaN; wrap the
      call in `lossjax.checked` to raise instead. The gradient of an infinite loss
      is 0 (torch returns NaN there unless `zero_infinity`).

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]])
      >>> labels, label_lengths = jnp.array([[1, 2]]), jnp.array([2])
      >>> lossjax.ctc_loss(logits, jnp.array([3]), labels, label_lengths,
      ...                  reduction="none")
      Array([0.5578], dtype=float32)
      >>> lossjax.ctc_loss(logits, jnp.array([1]), labels, label_lengths,
      ...                  reduction="none")  # 2 labels cannot fit in 1 frame
      Array([inf], dtype=float32)

    References:
      Graves et al., Connectionist Temporal Classification: Labelling Unsegmented
      Sequence Data with Recurrent Neural Networks, ICML 2006.

    See also: `ctc_greedy_decode`, `ctc_beam_search`, `padding_mask_to_lengths`.
    """
    batch, num_t, num_classes, max_len = _ctc_inputs(
        "ctc_loss", logits, logit_lengths, labels, label_lengths, blank_id)
    if reduction not in ("none", "sum", "mean"):
        reduce_loss(jnp.zeros(()), reduction=reduction)  # raises the usual error
    kept = kept_mask((batch,), where=where)
    positions = jnp.arange(max_len)[None, :]
    in_label = positions < label_lengths[:, None]
    label_ok = (labels >= 0) & (labels < num_classes) & (labels != blank_id)
    _checks.assert_values(
        "ctc_loss",
        f"labels must lie in [0, {num_classes}) and differ from blank_id={blank_id}.",
        label_ok | ~in_label, None if kept is None else kept[:, None])
    _checks.assert_values(
        "ctc_loss", f"label_lengths must lie in [0, {max_len}] (max_label_len).",
        (label_lengths >= 0) & (label_lengths <= max_len), kept)
    _checks.assert_values(
        "ctc_loss", f"logit_lengths must lie in [0, {num_t}] (time).",
        (logit_lengths >= 0) & (logit_lengths <= num_t), kept)
    _checks.assert_finite("ctc_loss", "logits", logits,
                          None if kept is None else kept[:, None, None])
    valid = (jnp.all(label_ok | ~in_label, axis=1)
             & (label_lengths >= 0) & (label_lengths <= max_len)
             & (logit_lengths >= 0) & (logit_lengths <= num_t))
    # Sanitize before any math: excluded sequences become empty (loss 0, no NaN from
    # their logits), invalid ones are computed on safe values and turned into NaN
    # afterwards (an index is never clamped silently into a different label).
    use = valid if kept is None else valid & kept
    x = logits.astype(compute_dtype(logits))
    if kept is not None:
        x = jnp.where(kept[:, None, None], x, jnp.zeros((), x.dtype))
    safe_labels = jnp.where(label_ok & in_label & use[:, None], labels, blank_id)
    safe_logit_lengths = jnp.where(use, logit_lengths, 0).astype(jnp.int32)
    safe_label_lengths = jnp.where(use, label_lengths, 0).astype(jnp.int32)
    nll = _ctc_core(x, safe_logit_lengths, safe_labels.astype(jnp.int32),
                    safe_label_lengths, int(blank_id))
    if zero_infinity:
        nll = jnp.where(jnp.isinf(nll), jnp.zeros((), nll.dtype), nll)
    nll = jnp.where(valid, nll, jnp.nan)
    if reduction == "mean":
        # torch divides each sequence by its target length, clamped to at least 1.
        nll = nll / jnp.maximum(safe_label_lengths, 1).astype(nll.dtype)
    return reduce_loss(nll, kept=kept, weights=weights, reduction=reduction)


# --- decoders -------------------------------------------------------------------------


def _check_decode_inputs(logits, logit_lengths, blank_id):
    _checks.check_float("logits", logits)
    _checks.check_int("logit_lengths", logit_lengths)
    _checks.check_rank("logits", logits, 3)
    batch, _, num_classes = logits.shape
    _checks.check_shape("logit_lengths", logit_lengths, (batch,),
                        against=f"logits of shape {logits.shape} ([batch, time, "
                        "classes])")
    if not isinstance(blank_id, (int, np.integer)) or not 0 <= blank_id < num_classes:
        raise ValueError(
            f"blank_id must be an int in [0, {num_classes}), got {blank_id!r}.")


def _compact(tokens, keep, pad_value):
    """Moves the kept tokens [B, T] to the front of each row, the rest `pad_value`."""
    num_t = tokens.shape[1]
    position = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, num_t)  # num_t: dropped
    out = jnp.full(tokens.shape, pad_value, tokens.dtype)
    rows = jnp.arange(tokens.shape[0])[:, None]
    out = out.at[rows, position].set(tokens, mode="drop")
    return out, jnp.sum(keep, axis=1, dtype=jnp.int32)


def ctc_greedy_decode(
    logits: jax.Array,
    logit_lengths: jax.Array,
    *,
    blank_id: int = 0,
    pad_value: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Best-path CTC decoding: argmax per frame, merge repeats, drop blanks.

    Fast and usually within a fraction of a point of beam search for well-trained
    models. Jittable with fixed shapes: the decoded labels are left-aligned in a
    `[batch, time]` array (a decoding never has more labels than frames).

    Args:
      logits: float `[batch, time, num_classes]` (log-probs or unnormalized).
      logit_lengths: int `[batch]`; frames at `t >= logit_lengths` are ignored.
      blank_id: the class id of the blank.
      pad_value: fills the label array after each sequence's `lengths`.

    Returns:
      `(labels, lengths)`: int32 `[batch, time]` (padded with `pad_value`) and int32
      `[batch]`.

    Example:
      >>> import jax, jax.numpy as jnp, lossjax
      >>> best = jnp.array([[1, 1, 0, 1, 2, 2]])  # argmax per frame; 0 is blank
      >>> labels, lengths = lossjax.ctc_greedy_decode(
      ...     10.0 * jax.nn.one_hot(best, 3), jnp.array([6]))
      >>> labels, lengths
      (Array([[ 1,  1,  2, -1, -1, -1]], dtype=int32), Array([3], dtype=int32))

    See also: `ctc_beam_search`, `ctc_loss`.
    """
    _check_decode_inputs(logits, logit_lengths, blank_id)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T]
    previous = jnp.concatenate(
        [jnp.full((best.shape[0], 1), -1, best.dtype), best[:, :-1]], axis=1)
    in_length = jnp.arange(best.shape[1])[None, :] < logit_lengths[:, None]
    keep = (best != blank_id) & (best != previous) & in_length
    return _compact(best, keep, pad_value)


def _logaddexp(a, b):
    # jnp.logaddexp is NaN-free for two -inf operands and stable for large gaps.
    return jnp.logaddexp(a, b)


def ctc_beam_search(
    logits: jax.Array,
    logit_lengths: jax.Array,
    *,
    beam_width: int = 8,
    blank_id: int = 0,
    top_k: int | None = None,
    pad_value: int = -1,
):
    r"""CTC prefix beam search: the most probable label sequence, summed over paths.

    Keeps the `beam_width` most probable label prefixes, each with the log-probability
    of its alignments that end in a blank and in a non-blank, so that alignments
    collapsing to the same prefix are merged (unlike best-path decoding, which takes
    one alignment). No language model. Jittable with fixed shapes: prefixes are
    tracked by a 64-bit rolling hash (two 32-bit hashes) for merging and rebuilt at
    the end from per-frame back-pointers. With a beam at least as large as the number
    of distinct prefixes, the search is exact.

    .. math::
        \hat y = \arg\max_y \sum_{\pi \in \mathcal{B}^{-1}(y)} \prod_t p_t(\pi_t)

    Args:
      logits: float `[batch, time, num_classes]`, unnormalized (log_softmax inside).
      logit_lengths: int `[batch]`; frames at `t >= logit_lengths` are ignored.
      beam_width: number of prefixes kept per frame (static).
      blank_id: the class id of the blank.
      top_k: if None, return the best hypothesis only; otherwise the `top_k` best
        (at most `beam_width`), best first, and their log-probabilities.
      pad_value: fills the label array after each hypothesis' length.

    Returns:
      `top_k=None`: `(labels, lengths)`, int32 `[batch, time]` and `[batch]`.
      Otherwise `(labels, lengths, log_probs)` with shapes `[batch, top_k, time]`,
      `[batch, top_k]`, `[batch, top_k]` (float32; -inf for hypotheses that do not
      exist, e.g. when fewer prefixes than `top_k` are possible).

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> logits = jnp.log(jnp.array([[[0.4, 0.6], [0.4, 0.6]]]))  # blank = 0
      >>> lossjax.ctc_beam_search(logits, jnp.array([2]), beam_width=4)
      (Array([[ 1, -1]], dtype=int32), Array([1], dtype=int32))

    Here best-path decoding also yields [1]; the beam sums the three paths (1 1),
    (0 1), (1 0) that collapse to it: 0.36 + 0.24 + 0.24 = 0.84.

    References:
      Hannun et al., First-Pass Large Vocabulary Continuous Speech Recognition using
      Bi-Directional Recurrent DNNs, 2014 (prefix beam search).

    See also: `ctc_greedy_decode`, `ctc_loss`.
    """
    _check_decode_inputs(logits, logit_lengths, blank_id)
    batch, num_t, num_classes = logits.shape
    width = int(beam_width)
    if width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width!r}.")
    if top_k is not None and not 1 <= top_k <= width:
        raise ValueError(f"top_k must lie in [1, beam_width={width}], got {top_k!r}.")
    logp = jax.nn.log_softmax(logits.astype(compute_dtype(logits)), axis=-1)
    logp = jnp.swapaxes(logp, 0, 1)  # [T, B, K]
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    is_blank = classes == blank_id
    mult = (jnp.uint32(1000003), jnp.uint32(2654435761))

    def extend_hash(h, c, m):
        return h * m + (c.astype(jnp.uint32) + jnp.uint32(1))

    neg_inf = jnp.asarray(_NEG_INF, logp.dtype)
    # Beam 0 is the empty prefix; the others are empty slots (-inf).
    p_b = jnp.full((batch, width), neg_inf).at[:, 0].set(0.0)
    p_nb = jnp.full((batch, width), neg_inf)
    last = jnp.full((batch, width), -1, jnp.int32)
    h1 = jnp.zeros((batch, width), jnp.uint32)
    h2 = jnp.zeros((batch, width), jnp.uint32)
    length = jnp.zeros((batch, width), jnp.int32)

    def step(carry, xs):
        p_b, p_nb, last, h1, h2, length = carry
        lp, t = xs  # lp [B, K]
        total = _logaddexp(p_b, p_nb)  # [B, W]
        alive = total > neg_inf
        lp_blank = lp[:, blank_id][:, None]
        # Staying on the same prefix: a blank after anything, or the last label again.
        lp_last = jnp.take_along_axis(lp, jnp.maximum(last, 0), axis=1)
        stay_b = total + lp_blank
        stay_nb = jnp.where(last >= 0, p_nb + lp_last, neg_inf)
        # Extending by label c: after a blank only, if c repeats the last label.
        repeat = last[:, :, None] == classes[None, None, :]  # [B, W, K]
        ext_nb = jnp.where(repeat, p_b[:, :, None], total[:, :, None]) + lp[:, None, :]
        ext_nb = jnp.where(is_blank[None, None, :], neg_inf, ext_nb)
        ext_h1 = extend_hash(h1[:, :, None], classes[None, None, :], mult[0])
        ext_h2 = extend_hash(h2[:, :, None], classes[None, None, :], mult[1])
        ext_len = length[:, :, None] + 1
        # An extension equal to an existing live prefix is merged into it.
        same = ((ext_h1[:, :, :, None] == h1[:, None, None, :])
                & (ext_h2[:, :, :, None] == h2[:, None, None, :])
                & (ext_len[:, :, :, None] == length[:, None, None, :])
                & alive[:, None, None, :]
                & ~is_blank[None, None, :, None])  # [B, W, K, W']
        merged_in = jnp.where(same, ext_nb[..., None], neg_inf)
        stay_nb = _logaddexp(stay_nb, jax.nn.logsumexp(merged_in, axis=(1, 2)))
        ext_nb = jnp.where(jnp.any(same, axis=-1), neg_inf, ext_nb)
        # Candidates: W stays, then W * K extensions; keep the W most probable.
        cand_b = jnp.concatenate(
            [stay_b, jnp.full((batch, width * num_classes), neg_inf)], axis=1)
        cand_nb = jnp.concatenate([stay_nb, ext_nb.reshape(batch, -1)], axis=1)
        score = _logaddexp(cand_b, cand_nb)
        _, pick = lax.top_k(score, width)  # [B, W], best first
        is_ext = pick >= width
        parent = jnp.where(is_ext, (pick - width) // num_classes, pick)
        token = jnp.where(is_ext, (pick - width) % num_classes, -1).astype(jnp.int32)

        def take(a):
            return jnp.take_along_axis(a, parent, axis=1)

        new = (
            jnp.take_along_axis(cand_b, pick, axis=1),
            jnp.take_along_axis(cand_nb, pick, axis=1),
            jnp.where(is_ext, token, take(last)),
            jnp.where(is_ext, extend_hash(take(h1), token, mult[0]), take(h1)),
            jnp.where(is_ext, extend_hash(take(h2), token, mult[1]), take(h2)),
            take(length) + is_ext,
        )
        # Past a sequence's length nothing changes: identity back-pointers.
        active = (t < logit_lengths)[:, None]
        new = tuple(jnp.where(active, n, o) for n, o in zip(new, carry))
        parent = jnp.where(active, parent, jnp.arange(width)[None, :])
        token = jnp.where(active, token, -1)
        return new, (parent, token)

    carry = (p_b, p_nb, last, h1, h2, length)
    carry, (parents, tokens) = lax.scan(step, carry, (logp, jnp.arange(num_t)))
    p_b, p_nb, _, _, _, length = carry
    score = _logaddexp(p_b, p_nb)
    k = 1 if top_k is None else top_k
    log_probs, beam = lax.top_k(score, k)  # [B, k]

    def backtrack(beam, xs):
        parent, token = xs  # [B, W]
        emitted = jnp.take_along_axis(token, beam, axis=1)
        return jnp.take_along_axis(parent, beam, axis=1), emitted

    _, emitted = lax.scan(backtrack, beam, (parents, tokens), reverse=True)
    emitted = jnp.moveaxis(emitted, 0, -1)  # [B, k, T]: the token emitted per frame
    flat = emitted.reshape(batch * k, num_t)
    labels, lengths = _compact(flat, flat >= 0, pad_value)
    labels, lengths = labels.reshape(batch, k, num_t), lengths.reshape(batch, k)
    if top_k is None:
        return labels[:, 0], lengths[:, 0]
    return labels, lengths, log_probs
