"""Sequence losses: connectionist temporal classification (CTC) and its decoders."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lossjax import _checks
from lossjax._reduce import (
    AxisName,
    check_reduction,
    compute_dtype,
    kept_mask,
    reduce_loss,
)

__all__ = [
    "ctc_loss",
    "ctc_greedy_decode",
    "ctc_beam_search",
    "padding_mask_to_lengths",
    "lengths_to_padding_mask",
]
LOSS_NAMES = ("ctc_loss",)

_NEG_INF = -np.inf
_CHUNK = 8  # frames between two renormalizations of alpha and beta


# --- optax-style padding masks --------------------------------------------------------


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
#
# Layout, chosen by measurement on XLA:CPU (see benchmarks/ctc.py):
# - The 2L+1 states of the blank-extended labels are kept as two arrays, the L+1 blank
#   states (blank j between labels j-1 and j) and the L label states. Blank j sums
#   its two predecessors (itself, label j-1); label j sums itself and either that same
#   sum (when label j may follow label j-1 directly) or blank j alone. Each pair then
#   costs 2 exps and 2 logs per frame: 3 and 2 with a three-term sum for the label
#   (B=32, T=800: alpha loop 21 -> 16 ms), 4 and 2 with the states interleaved.
# - States first, batch last ([L, B]): the shift to the previous state is then a shift
#   of whole rows, which XLA vectorizes over the batch; along the minor axis the same
#   shift made every step about 2x slower.
# - Emissions are gathered from the logits inside each step (one frame, [L, B]) rather
#   than as a [T, L, B] table before the loop: the table and its transpose cost more
#   than the loop's work on large inputs, and keeping XLA's temporaries small (the
#   table alone is 10 MiB at B=32, T=800, L=100) avoids fresh pages on every call.
# - The backward pass never stores beta: each step of its loop turns alpha and beta
#   into the frame's occupancies and scatters them onto the K classes at once.
# - Both recursions shift their values back to a maximum of 0 every _CHUNK frames (an
#   inner scan per chunk) rather than every frame: the per-frame maximum cost two
#   reductions per step, which dominate small problems. Within a chunk the values
#   drift by at most _CHUNK frames of log-probs, so the rounding stays that of the
#   inputs' own log-probs (measured at T = 1000 against float64: unchanged).


def _lse2(a, b):
    """log(e^a + e^b), -inf (never NaN) when both are -inf."""
    m = jnp.maximum(a, b)
    m_safe = jnp.where(m == _NEG_INF, 0.0, m)
    # One exp and one log: the larger term contributes exp(0) = 1 exactly. log(1 + x)
    # rather than log1p: as accurate in absolute terms, and measured 1.4x faster in
    # XLA's CPU loop (log1p is the slowest of the three transcendentals there).
    return m + jnp.log(1.0 + jnp.exp(jnp.minimum(a, b) - m_safe))


def _pad_states(x, before, after):
    """Pads the state axis (0) with -inf: a shift when the other end is sliced off."""
    return jnp.pad(x, ((before, after),) + ((0, 0),) * (x.ndim - 1),
                   constant_values=_NEG_INF)


def _peak(blank, label):
    """Per-sequence maximum over the states [B]; 0 where every state is -inf."""
    peak = jnp.maximum(jnp.max(blank, axis=0), jnp.max(label, axis=0, initial=_NEG_INF))
    return jnp.where(peak > _NEG_INF, peak, 0.0)


class _Problem(NamedTuple):
    """What both recursions read: the logits, their logsumexp and the labels."""
    logits: jax.Array  # [B, T, K] float32
    lse: jax.Array  # [B, T]: log_softmax = logits - lse
    labels: jax.Array  # [L, B] int32, padding already replaced by the blank
    frame_index: jax.Array  # [L, B] int32: where label j of sequence b is in a frame's
    #                         flattened [B * K] logits
    real: jax.Array  # [L, B] bool: label j exists (j < label_length)
    direct: jax.Array  # [L, B] bool: label j may follow label j-1 directly
    logit_lengths: jax.Array  # [B]
    label_lengths: jax.Array  # [B]
    blank_id: int

    @classmethod
    def build(cls, logits, logit_lengths, labels, label_lengths, blank_id):
        lse = jax.nn.logsumexp(logits, axis=-1)
        labels = labels.T
        previous = jnp.concatenate(
            [jnp.full((1,) + labels.shape[1:], -1, labels.dtype), labels[:-1]], axis=0)
        # A repeated label needs a blank in between.
        direct = labels != previous
        real = jnp.arange(labels.shape[0])[:, None] < label_lengths[None, :]
        frame_index = labels + logits.shape[-1] * jnp.arange(labels.shape[1])[None, :]
        return cls(logits, lse, labels, frame_index, real, direct, logit_lengths,
                   label_lengths, blank_id)

    def emissions(self, t):
        """Log-probs of frame t: the blank [B] and the labels [L, B] (-inf past each
        label length)."""
        x = lax.dynamic_index_in_dim(self.logits, t, axis=1, keepdims=False)  # [B, K]
        lse = lax.dynamic_index_in_dim(self.lse, t, axis=1, keepdims=False)
        # One index per entry into the flattened frame: cheaper than a 2-D gather.
        label = x.reshape(-1).at[self.frame_index].get(mode="promise_in_bounds")
        return x[:, self.blank_id] - lse, jnp.where(self.real, label - lse[None],
                                                    _NEG_INF)

    def zeros(self, num_states):
        """A [num_states, B] float32 zero built from the inputs: under shard_map a
        loop's carry must vary over the mesh axes like the values computed from them."""
        return jnp.zeros((num_states, 1), self.lse.dtype) + jnp.zeros_like(
            self.lse[:, 0])[None, :]


def _chunked_scan(step, renormalize, carry, num_t, reverse=False):
    """`lax.scan` of `step(carry, t)` over frames, renormalizing every _CHUNK frames.

    The frames run in chunks (an inner scan inside an outer one); after each chunk,
    `renormalize(carry) -> (carry, shift)`. Returns (carry, per-frame outputs with
    the chunks flattened and cut to `num_t`, the shifts per chunk [chunks, B]).
    """
    num_chunks = -(-num_t // _CHUNK)

    def chunk(carry, c):
        frames = c * _CHUNK + jnp.arange(_CHUNK)
        carry, out = lax.scan(step, carry, frames, reverse=reverse)
        carry, shift = renormalize(carry)
        return carry, (out, shift)

    carry, (out, shifts) = lax.scan(chunk, carry, jnp.arange(num_chunks),
                                    reverse=reverse)
    out = jax.tree.map(
        lambda x: x.reshape((num_chunks * _CHUNK,) + x.shape[2:])[:num_t], out)
    return carry, out, shifts


def _alpha_scan(p: _Problem, save: bool):
    """Forward variables, shifted to a maximum of 0 every _CHUNK frames.

    Returns (final blank alpha [L+1, B], final label alpha [L, B], log scale [B], and
    if `save` the per-frame alphas ([T, L+1, B], [T, L, B]) with their offsets
    [T, B]: the true log alpha of frame t is the saved one plus its offset).
    """
    num_labels, num_t = p.labels.shape[0], p.logits.shape[1]
    init_blank = p.zeros(num_labels + 1) + jnp.where(
        jnp.arange(num_labels + 1) == 0, 0.0, _NEG_INF)[:, None]
    init_label = p.zeros(num_labels) + _NEG_INF

    def step(carry, t):
        blank, label, saved = carry
        e_blank, e_label = p.emissions(t)
        # Blank j comes from itself or label j - 1; label j from itself, blank j, and
        # label j - 1 when the two labels differ (then the sum into blank j).
        into_blank = _lse2(blank, _pad_states(label, 1, 0))
        new_blank = into_blank + e_blank[None]
        new_label = _lse2(label, jnp.where(p.direct, into_blank[:-1], blank[:-1])) \
            + e_label
        # Past its length a sequence's alpha is frozen, so the final carry holds the
        # alpha of its last frame.
        running = (t < p.logit_lengths)[None]
        new_blank = jnp.where(running, new_blank, blank)
        new_label = jnp.where(running, new_label, label)
        # Written into [T, ...] buffers carried by the loop (in place), not stacked
        # per chunk and copied out. Frames past T (in the last chunk) write at T - 1
        # (dynamic indices clamp) the same frozen values as frame T - 1. `saved` is
        # empty when nothing is kept (the zip stops there).
        saved = tuple(lax.dynamic_update_index_in_dim(buffer, value, t, 0)
                      for buffer, value in zip(saved, (new_blank, new_label),
                                               strict=False))
        return (new_blank, new_label, saved), None

    def renormalize(carry):
        blank, label, saved = carry
        peak = _peak(blank, label)
        return (blank - peak[None], label - peak[None], saved), peak

    saved = tuple(jnp.broadcast_to(x, (num_t,) + x.shape)
                  for x in (init_blank, init_label)) if save else ()
    (blank, label, alphas), _, peaks = _chunked_scan(
        step, renormalize, (init_blank, init_label, saved), num_t)
    # Summed after the loop (pairwise) rather than carried: less rounding.
    log_scale = jnp.sum(peaks, axis=0)
    if not save:
        return blank, label, log_scale, None
    # The offset of a frame is the sum of the peaks of the chunks before its own.
    offsets = jnp.cumsum(peaks, axis=0) - peaks
    offsets = jnp.repeat(offsets, _CHUNK, axis=0)[:num_t]
    return blank, label, log_scale, (alphas, offsets)


def _log_likelihood(p: _Problem, blank, label, log_scale):
    """log p(labels | x) from the final alphas: the last blank or the last label."""
    lengths = p.label_lengths
    last_blank = jnp.take_along_axis(blank, lengths[None], axis=0)[0]
    if label.shape[0]:
        last_label = jnp.take_along_axis(label, jnp.maximum(lengths - 1, 0)[None],
                                         axis=0)[0]
        last_label = jnp.where(lengths > 0, last_label, _NEG_INF)
    else:
        last_label = jnp.full(last_blank.shape, _NEG_INF, blank.dtype)
    return log_scale + _lse2(last_blank, last_label)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ctc_core(logits, logit_lengths, labels, label_lengths, blank_id):
    p = _Problem.build(logits, logit_lengths, labels, label_lengths, blank_id)
    blank, label, log_scale, _ = _alpha_scan(p, save=False)
    # Clamped at 0: f32 rounding can push a confident alignment's -log p slightly
    # below 0 (optax issue 1771), which turns into NaN downstream.
    return jnp.maximum(-_log_likelihood(p, blank, label, log_scale), 0.0)


def _ctc_core_fwd(logits, logit_lengths, labels, label_lengths, blank_id):
    p = _Problem.build(logits, logit_lengths, labels, label_lengths, blank_id)
    blank, label, log_scale, alphas = _alpha_scan(p, save=True)
    log_z = _log_likelihood(p, blank, label, log_scale)
    return jnp.maximum(-log_z, 0.0), (p, alphas, log_z)


def _occupancy_scan(p: _Problem, alphas, log_z, scale):
    """Backward variables, each frame turned into class occupancies at once.

    beta (without the frame's own emission) runs backwards in time, shifted to a
    maximum of 0 every _CHUNK frames like alpha. At frame t the state occupancies
    alpha * beta / p(labels) are normalized to sum to 1, scattered onto the classes
    and multiplied by `scale` [B]. Returns the class occupancies [T, K, B] (0 past
    each sequence's length).
    """
    (alpha_blank, alpha_label), alpha_offsets = alphas
    num_labels, num_t = p.labels.shape[0], p.logits.shape[1]
    num_classes = p.logits.shape[-1]
    positions = jnp.arange(num_labels + 1)[:, None]
    final_blank = jnp.where(positions == p.label_lengths[None], 0.0, _NEG_INF)
    final_label = jnp.where(positions[:-1] == p.label_lengths[None] - 1, 0.0, _NEG_INF)
    # May label j go on to label j + 1 directly? (The last one has no next label.)
    direct_next = jnp.concatenate([p.direct[1:], jnp.zeros_like(p.direct[:1])])
    columns = jnp.broadcast_to(jnp.arange(p.labels.shape[1])[None], p.labels.shape)
    # Frames past the end (t >= T, in the last chunk) read frame T - 1 (dynamic
    # indices clamp, as in the alpha loop); their results are masked and cut.
    log_z = jnp.where(jnp.isfinite(log_z), log_z, 0.0)

    def step(carry, t):
        next_blank, next_label, offset = carry  # beta + emission of frame t + 1
        # Blank j goes on to itself or label j; label j to itself, blank j + 1, and
        # label j + 1 when the two labels differ (then the sum out of blank j + 1).
        blank = _lse2(next_blank, _pad_states(next_label, 0, 1))
        label = _lse2(next_label, jnp.where(direct_next, blank[1:], next_blank[1:]))
        last = t >= p.logit_lengths - 1
        blank = jnp.where(last[None], final_blank, blank)
        label = jnp.where(last[None], final_label, label)
        offset = jnp.where(last, 0.0, offset)
        # The frame's occupancies: log(alpha * beta / p) up to rounding in the
        # offsets, which only has to keep exp in range; the frame's sum then
        # normalizes them (the rounding that the offsets and log p accumulate over
        # long sequences, shared by the frame's states, cancels).
        shift = (lax.dynamic_index_in_dim(alpha_offsets, t, keepdims=False)
                 + offset - log_z)[None]
        occ_blank = jnp.exp(lax.dynamic_index_in_dim(alpha_blank, t, keepdims=False)
                            + blank + shift)
        occ_label = jnp.exp(lax.dynamic_index_in_dim(alpha_label, t, keepdims=False)
                            + label + shift)
        occ_blank = jnp.sum(occ_blank, axis=0)
        total = occ_blank + jnp.sum(occ_label, axis=0)
        kept = (t < p.logit_lengths) & (total > 0)
        norm = jnp.where(kept, scale / jnp.where(total > 0, total, 1.0), 0.0)  # [B]
        # Onto the classes: a scatter-add per frame ([L, B] -> [K, B]), never a
        # [B, T, L, K] one-hot; the blanks all go to one class.
        occ = jnp.zeros((num_classes,) + norm.shape, norm.dtype)
        occ = occ.at[p.labels, columns].add(occ_label * norm[None],
                                            mode="promise_in_bounds")
        occ = occ.at[p.blank_id].add(occ_blank * norm)
        e_blank, e_label = p.emissions(t)
        return (blank + e_blank[None], label + e_label, offset), occ

    def renormalize(carry):
        blank, label, offset = carry
        peak = _peak(blank, label)
        return (blank - peak[None], label - peak[None], offset + peak), None

    init = (p.zeros(num_labels + 1) + _NEG_INF, p.zeros(num_labels) + _NEG_INF,
            p.zeros(1)[0])
    _, occ, _ = _chunked_scan(step, renormalize, init, num_t, reverse=True)
    return occ


def _ctc_core_bwd(blank_id, res, g):
    p, alphas, log_z = res
    p = p._replace(blank_id=blank_id)  # a Python int again, not a residual array
    # An impossible alignment (infinite loss) gets zero gradient.
    scale = jnp.where(jnp.isfinite(log_z), g, 0.0)
    occ = jnp.transpose(_occupancy_scan(p, alphas, log_z, scale), (2, 0, 1))  # [B,T,K]
    valid = jnp.arange(p.logits.shape[1])[None, :] < p.logit_lengths[:, None]
    softmax = jnp.exp(p.logits - p.lse[..., None])
    # d(-log p)/d logits = softmax - occupancy (the log_softmax Jacobian folded in).
    # A select, not a product with `valid`: frames that do not count may hold NaN or
    # +-inf (padding), so their softmax is NaN, and 0 * NaN is NaN. Their occupancy is
    # an exact 0 (beta restarts from its final values there, alpha is frozen).
    grad = jnp.where(valid[..., None], softmax * scale[:, None, None], 0.0) - occ
    return grad, None, None, None


_ctc_core.defvjp(_ctc_core_fwd, _ctc_core_bwd)


def _check_blank_id(blank_id, num_classes):
    """blank_id picks a class (a static index): a Python int in [0, num_classes)."""
    if isinstance(blank_id, bool) or not isinstance(blank_id, (int, np.integer)):
        raise TypeError(
            f"blank_id must be a Python int in [0, {num_classes}) (static: it picks "
            f"the blank class), got {blank_id!r}.")
    _checks.check_range("blank_id", blank_id, low=0, high=num_classes, high_open=True)


def _ctc_inputs(logits, logit_lengths, labels, label_lengths, blank_id):
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
    _check_blank_id(blank_id, num_classes)
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
    axis_name: AxisName = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
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
    through the time loop: O(B·T·(2L+1)) memory, nothing of size B·T·L·K. Both are
    shifted back to a maximum of 0 every few frames and the state occupancies are
    normalized per frame, so the float32 gradient stays accurate on long inputs
    (T = 1000: max error 1.5e-5 to 4e-5 against float64 for logits of scale 3 to
    300, where optax's autodiff gradient is off by 1.3e-3 to 1.2e-2). Being a
    `custom_vjp`, it supports reverse mode (grad, vjp) but not forward mode (jvp,
    jacfwd).

    Args:
      logits: float `[batch, time, num_classes]`, unnormalized; `blank_id` is one of
        the classes.
      logit_lengths: int `[batch]`, the number of valid frames per sequence, at most
        `time`. Frames at `t >= logit_lengths` are ignored whatever they hold (NaN,
        -inf from `where(mask, logits, -inf)`, +inf) and get an exact, finite zero
        gradient; checked mode does not look at them.
      labels: int `[batch, max_label_len]`, right-padded label ids (the padding value
        is never read); valid labels lie in `[0, num_classes)` and differ from
        `blank_id`.
      label_lengths: int `[batch]`, at most `max_label_len`.
      blank_id: the class id of the blank, a Python int in `[0, num_classes)`
        (static; out of range raises ValueError).
      zero_infinity: bool; if True, a sequence with no valid alignment (its labels,
        counting a blank between repeats, need more than `logit_lengths` frames) has
        loss 0 and zero gradient instead of `inf`, as torch's flag. A bool array
        (traced) is accepted too.
      where: bool, broadcastable to `[batch]`; False sequences count for nothing, with
        zero gradient even if their logits hold NaN.
      weights: float, broadcastable to `[batch]`; per-sequence weights.
      reduction: "none", "sum", "mean" or "sum_and_weight". "mean" divides each
        sequence's loss by its label length (clamped to at least 1) and then takes
        the weighted mean over the kept sequences (`sum(w * loss / length) /
        sum(w)`), torch's convention; "sum_and_weight" returns that numerator and
        denominator (for exact accumulation over micro-batches); "none" and "sum"
        use the loss not divided by length.
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum" / "mean" are then over the global batch, with exact values and
        gradients under `shard_map` and `pmap`; "none" stays local (see the README's
        loss contract).

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar; "sum_and_weight": a pair of
      scalars. dtype `promote_types(logits.dtype, float32)`. An invalid sequence (a
      label out of range or equal to `blank_id`, or a length out of range) gives NaN;
      wrap the call in `lossjax.checked` to raise instead. The gradient of an
      infinite loss is 0 (torch returns NaN there unless `zero_infinity`).

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
        logits, logit_lengths, labels, label_lengths, blank_id)
    check_reduction(reduction)
    if not isinstance(zero_infinity, (bool, np.bool_)):
        # A bool array (traced, e.g. under `checked`) is applied with a select.
        if jnp.result_type(zero_infinity) != jnp.bool_ or jnp.ndim(zero_infinity):
            raise TypeError(f"zero_infinity must be a bool, got {zero_infinity!r}.")
    kept = kept_mask((batch,), where=where)
    positions = jnp.arange(max_len)[None, :]
    in_label = positions < label_lengths[:, None]
    frames = jnp.arange(num_t)[None, :]
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
    # Only the frames that count: padding past logit_lengths may hold anything.
    counted = frames < logit_lengths[:, None]
    _checks.assert_finite("ctc_loss", "logits (frames t < logit_lengths)", logits,
                          (counted if kept is None else counted & kept[:, None])[
                              ..., None])
    valid = (jnp.all(label_ok | ~in_label, axis=1)
             & (label_lengths >= 0) & (label_lengths <= max_len)
             & (logit_lengths >= 0) & (logit_lengths <= num_t))
    # Sanitize before any math: excluded sequences become empty (loss 0, no NaN from
    # their logits), invalid ones are computed on safe values and turned into NaN
    # afterwards (an index is never clamped silently into a different label).
    use = valid if kept is None else valid & kept
    safe_labels = jnp.where(label_ok & in_label & use[:, None], labels, blank_id)
    safe_logit_lengths = jnp.where(use, logit_lengths, 0).astype(jnp.int32)
    safe_label_lengths = jnp.where(use, label_lengths, 0).astype(jnp.int32)
    # Frames that do not count (past logit_lengths, and every frame of an excluded
    # or invalid sequence, whose length is 0 here) are never sanitized on the input:
    # the recursions only keep values of counted frames (alpha is frozen past the
    # length, beta restarts there) and the backward selects their gradient to an
    # exact 0, whatever they hold (NaN, +-inf). A select on the input costs a copy of
    # the logits: 12-16% of the small benchmark case (benchmarks/ctc.py).
    x = logits.astype(compute_dtype(logits))
    if num_t:
        nll = _ctc_core(x, safe_logit_lengths, safe_labels.astype(jnp.int32),
                        safe_label_lengths, int(blank_id))
    else:  # no frames: only the empty label sequence has an alignment
        nll = jnp.where(safe_label_lengths == 0, 0.0, jnp.inf).astype(x.dtype)
    if isinstance(zero_infinity, (bool, np.bool_)):
        if zero_infinity:
            nll = jnp.where(jnp.isinf(nll), jnp.zeros((), nll.dtype), nll)
    else:
        nll = jnp.where(zero_infinity & jnp.isinf(nll), jnp.zeros((), nll.dtype), nll)
    nll = jnp.where(valid, nll, jnp.nan)
    if reduction in ("mean", "sum_and_weight"):
        # torch divides each sequence by its target length, clamped to at least 1;
        # "sum_and_weight" returns the two sums that "mean" divides.
        nll = nll / jnp.maximum(safe_label_lengths, 1).astype(nll.dtype)
    return reduce_loss(nll, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


# --- decoders -------------------------------------------------------------------------


def _check_decode_inputs(logits, logit_lengths, blank_id):
    _checks.check_float("logits", logits)
    _checks.check_int("logit_lengths", logit_lengths)
    _checks.check_rank("logits", logits, 3)
    batch, _, num_classes = logits.shape
    _checks.check_shape("logit_lengths", logit_lengths, (batch,),
                        against=f"logits of shape {logits.shape} ([batch, time, "
                        "classes])")
    _check_blank_id(blank_id, num_classes)


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
    # Built from the inputs (+ 0), not from constants alone: under shard_map the
    # carry must vary over the mesh axes like the values the loop computes from them.
    zero = jnp.zeros_like(logp[0, :, :1])  # [B, 1]
    izero = zero.astype(jnp.int32)
    p_b = zero + jnp.where(jnp.arange(width) == 0, 0.0, neg_inf)
    p_nb = zero + jnp.full((width,), neg_inf)
    last = izero + jnp.full((width,), -1, jnp.int32)
    h1 = (izero + jnp.zeros((width,), jnp.int32)).astype(jnp.uint32)
    h2 = h1
    length = izero + jnp.zeros((width,), jnp.int32)

    def step(carry, xs):
        p_b, p_nb, last, h1, h2, length = carry
        lp, t = xs  # lp [B, K]
        total = jnp.logaddexp(p_b, p_nb)  # [B, W]
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
        stay_nb = jnp.logaddexp(stay_nb, jax.nn.logsumexp(merged_in, axis=(1, 2)))
        ext_nb = jnp.where(jnp.any(same, axis=-1), neg_inf, ext_nb)
        # Candidates: W stays, then W * K extensions; keep the W most probable.
        cand_b = jnp.concatenate(
            [stay_b, jnp.full((batch, width * num_classes), neg_inf)], axis=1)
        cand_nb = jnp.concatenate([stay_nb, ext_nb.reshape(batch, -1)], axis=1)
        score = jnp.logaddexp(cand_b, cand_nb)
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
        new = tuple(jnp.where(active, n, o) for n, o in zip(new, carry, strict=True))
        parent = jnp.where(active, parent, jnp.arange(width)[None, :])
        token = jnp.where(active, token, -1)
        return new, (parent, token)

    carry = (p_b, p_nb, last, h1, h2, length)
    carry, (parents, tokens) = lax.scan(step, carry, (logp, jnp.arange(num_t)))
    p_b, p_nb, _, _, _, length = carry
    score = jnp.logaddexp(p_b, p_nb)
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
