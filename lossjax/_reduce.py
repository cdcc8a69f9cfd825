"""The one implementation of `where`, `weights`, `ignore_index` and `reduction`.

Every public loss computes a per-entry loss and hands it to `reduce_loss`. Before doing
the math, a loss replaces the inputs of excluded entries with harmless values
(`sanitize`), so that an excluded entry contributes exactly 0 to the loss *and* to every
gradient even when its inputs hold inf, NaN or an out-of-range label: `jnp.where` alone
stops the forward value but its backward still multiplies 0 by the NaN local derivative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lossjax import _checks

REDUCTIONS = ("none", "sum", "mean")


def check_reduction(reduction: str) -> None:
    """Raises ValueError unless `reduction` is one of "none", "sum", "mean"."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {REDUCTIONS}, got {reduction!r}."
        )


def compute_dtype(*arrays) -> jnp.dtype:
    """The dtype the math runs in: at least float32, wider if an input is wider.

    bf16/f16 inputs are upcast here so callers never have to; the gradient flows back
    through `astype` and so arrives in the caller's dtype.
    """
    dtype = jnp.float32
    for a in arrays:
        if a is not None and jnp.issubdtype(jnp.result_type(a), jnp.floating):
            dtype = jnp.promote_types(dtype, jnp.result_type(a))
    return dtype


def kept_mask(
    loss_shape: tuple[int, ...],
    *,
    where: jax.Array | None = None,
    labels: jax.Array | None = None,
    ignore_index: int | None = None,
) -> jax.Array | None:
    """Boolean mask of the entries that count, in `loss_shape`, or None for "all".

    `where` (broadcastable to the loss shape) and `labels == ignore_index` are the two
    ways an entry is excluded.
    """
    mask = None
    if where is not None:
        _checks.check_bool("where", where)
        _checks.check_broadcastable("where", where, loss_shape)
        mask = jnp.broadcast_to(where, loss_shape)
    if labels is not None and ignore_index is not None:
        not_ignored = labels != ignore_index
        mask = not_ignored if mask is None else mask & not_ignored
    return mask


def sanitize(x: jax.Array, kept: jax.Array | None, fill=0, *, axis: int | None = None):
    """Replaces the inputs of excluded entries with `fill` before any math is done.

    `kept` has the loss shape; `axis` is the class axis of `x` that the loss reduces
    over (absent from `kept`), if any.
    """
    if kept is None:
        return x
    if axis is not None:
        kept = jnp.expand_dims(kept, axis)
    return jnp.where(kept, x, jnp.asarray(fill, x.dtype))


def reduce_loss(
    loss: jax.Array,
    *,
    kept: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    normalizer: jax.Array | None = None,
) -> jax.Array:
    """Applies the exclusion mask, the weights and the reduction to a per-entry loss.

    Args:
      loss: per-entry loss, in the loss shape.
      kept: bool, the loss shape; False entries contribute exactly 0 (None: all kept).
      weights: float, broadcastable to the loss shape (None: all 1).
      reduction: "none" returns w * loss (excluded entries 0); "sum" returns
        sum(w * loss) over kept entries; "mean" returns sum(w * loss) / sum(w) over
        kept entries, and 0 (with zero, finite gradients) when nothing is kept.
      normalizer: per-entry weights whose kept sum is the denominator of "mean",
        when it differs from `weights` (broadcastable to the loss shape). Integer-label
        losses with class weights pass `weights * class_weights[labels]` here: torch
        divides by the labels' class weights even where they already sit inside the
        entry (label smoothing).

    Returns:
      An array of `loss.dtype`: the loss shape for "none", a scalar otherwise.
    """
    check_reduction(reduction)
    if weights is not None:
        _checks.check_float("weights", weights)
        _checks.check_broadcastable("weights", weights, loss.shape)
        weights = jnp.broadcast_to(weights.astype(loss.dtype), loss.shape)
    if normalizer is None:
        normalizer = weights
    else:
        normalizer = jnp.broadcast_to(normalizer.astype(loss.dtype), loss.shape)
    if kept is not None:
        # Mask the weights too: an excluded entry's weight may itself be NaN, and it must
        # vanish from the mean's denominator.
        zero = jnp.zeros((), loss.dtype)
        loss, weights, normalizer = (
            None if a is None else jnp.where(kept, a, zero)
            for a in (loss, weights, normalizer)
        )
    weighted = loss if weights is None else weights * loss
    if reduction == "none":
        return weighted
    total = jnp.sum(weighted)
    if reduction == "sum":
        return total
    if normalizer is not None:
        count = jnp.sum(normalizer)
    elif kept is not None:
        count = jnp.sum(kept, dtype=loss.dtype)
    else:
        return total / max(loss.size, 1)
    # Two wheres: the inner one keeps the division finite so that its gradient, which the
    # outer one discards when nothing is kept, is not NaN.
    nonzero = count != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, count, 1), 0).astype(
        loss.dtype
    )
