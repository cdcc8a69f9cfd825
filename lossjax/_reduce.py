"""The one implementation of `where`, `weights`, `ignore_index`, `reduction` and the
batch axis `axis_name`.

Every public loss computes a per-entry loss and hands it to `reduce_loss`. An excluded
entry must contribute exactly 0 to the loss *and* to every gradient even when its inputs
hold inf, NaN or an out-of-range label: `jnp.where` alone stops the forward value, but
its backward still multiplies 0 by the NaN local derivative. Most losses therefore
replace the inputs of excluded entries with harmless values first (`sanitize`). Where
a value cannot be replaced before the math, the loss stays exact another way and says
how in a comment: a custom derivative rule that selects before it multiplies
(`kl_divergence`'s zero-probability classes, cross-entropy's masked logsumexp and row
dot), a select whose transpose zeroes the frames that do not count (`ctc_loss` past
`logit_lengths`), or per-token coefficients that are zero for excluded tokens
(`linear_cross_entropy`'s token-block kernel).

With `axis_name`, "sum" and "mean" are over the global batch sharded over that mesh /
pmap axis: the numerator and the kept weight are summed over it with `global_sum`, whose
gradient is exact under `shard_map` and under `pmap` alike (see there).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lossjax import _checks

REDUCTIONS = ("none", "sum", "mean", "sum_and_weight")

AxisName = Hashable | Sequence[Hashable] | None


def check_reduction(reduction: str) -> None:
    """Raises ValueError unless `reduction` is one of `REDUCTIONS`."""
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


def hyperparameter(value, dtype):
    """A float hyperparameter as the math uses it.

    A Python number stays as it is (weakly typed, so it follows the data's dtype); an
    array, traced or not (a schedule, a learnable value, a NumPy scalar), is cast to
    the compute `dtype`, which keeps the loss's dtype rule and lets its gradient flow.
    """
    if type(value) in (int, float):
        return value
    return jnp.asarray(value).astype(dtype)


def _axes(axis_name: AxisName) -> tuple:
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def varying_axes(x) -> frozenset:
    """The manual mesh axes over which `x` varies inside `shard_map` (empty elsewhere:
    under `pmap`, or `shard_map(check_vma=False)`, JAX tracks no variance)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _psum_with_identity_grad(x, axes):
    return lax.psum(x, axes)


def _psum_fwd(x, axes):
    return lax.psum(x, axes), None


def _psum_bwd(axes, _, g):
    # d(sum over devices)/d(this device's share) is 1: the cotangent passes unchanged.
    return (g,)


_psum_with_identity_grad.defvjp(_psum_fwd, _psum_bwd)


def global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Sum of `x` over the devices of `axis_name`, with the exact gradient everywhere.

    The result is the same on every device; the gradient w.r.t. each device's `x` is
    the cotangent of the sum itself, as if the global batch sat on one device.

    Inside `shard_map` (with its default `check_vma=True`) JAX knows that `x` varies
    over the axis and transposes `lax.psum` into that broadcast. Under `pmap` (and
    `shard_map(check_vma=False)`) it does not, and transposes a `psum` into another
    `psum`: the gradient would come out N times too large on N devices. There the sum
    carries its own derivative rule, which passes the cotangent through unchanged.
    That is exact when the sum's cotangent is the same on every device, as when it
    feeds only the global loss (a numerator, a kept weight, a combined logsumexp that
    every shard then uses alike); a global sum that feeds per-device values again (a
    global normalizer inside per-token coefficients) needs every device's cotangent
    back, which under pmap only a `psum` of cotangents gives: keep such sums local
    and reduce once at the end, as `reduce_loss` does.
    """
    axes = _axes(axis_name)
    if not axes:
        return x
    varying = varying_axes(x)
    tracked = tuple(a for a in axes if a in varying)
    untracked = tuple(a for a in axes if a not in varying)
    if tracked:
        x = lax.psum(x, tracked)
    if untracked:
        x = _psum_with_identity_grad(x, untracked)
    return x


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
    axis_name: AxisName = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Applies the exclusion mask, the weights and the reduction to a per-entry loss.

    This is the one place where lossjax's losses reduce, and the way to write a loss of
    one's own that keeps the contract: compute the per-entry loss from inputs whose
    excluded entries were replaced (`sanitize`), then return `reduce_loss(...)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> def cubic_error(predictions, targets, *, where=None, weights=None,
      ...                 reduction="mean", axis_name=None):
      ...     kept = None if where is None else jnp.broadcast_to(where, targets.shape)
      ...     p = lossjax.sanitize(predictions, kept)
      ...     t = lossjax.sanitize(targets, kept)
      ...     return lossjax.reduce_loss(jnp.abs(p - t) ** 3, kept=kept,
      ...                                weights=weights, reduction=reduction,
      ...                                axis_name=axis_name)
      >>> cubic_error(jnp.array([1.0, 2.0, jnp.nan]), jnp.array([0.0, 0.0, 0.0]),
      ...             where=jnp.array([True, True, False]))
      Array(4.5, dtype=float32)

    Args:
      loss: per-entry loss, in the loss shape.
      kept: bool, the loss shape; False entries contribute exactly 0 (None: all kept).
      weights: float, broadcastable to the loss shape (None: all 1).
      reduction: "none" returns w * loss (excluded entries 0); "sum" returns
        sum(w * loss) over kept entries; "mean" returns sum(w * loss) / sum(w) over
        kept entries, and 0 (with zero, finite gradients) when nothing is kept;
        "sum_and_weight" returns the pair (sum(w * loss), sum(w)) that "mean"
        divides, for accumulating an exact mean over micro-batches: add up both
        over the micro-batches, then divide once.
      normalizer: per-entry weights whose kept sum is the denominator of "mean",
        when it differs from `weights` (broadcastable to the loss shape). Integer-label
        losses with class weights pass `weights * class_weights[labels]` here: torch
        divides by the labels' class weights even where they already sit inside the
        entry (label smoothing).
      axis_name: the mesh / pmap axis name (or tuple of names) over which the batch
        is sharded, inside `shard_map` or `pmap`. "sum", "mean" and
        "sum_and_weight" are then over the global batch (numerator and kept weight
        summed with `global_sum`), equal on every device to the single-device value
        on the concatenated batch; "none" stays local. Gradients w.r.t. each
        device's inputs are its slice of the global gradient, under `shard_map` and
        `pmap` alike. `shard_map` sums the gradient of a replicated parameter over
        the devices by itself; under `pmap`, where each device holds its own copy,
        `lax.psum(grads, axis_name)` gives the global gradient (not `pmean`: the
        loss is already the global mean).

    Returns:
      An array of `loss.dtype`: the loss shape for "none", a scalar for "sum" and
      "mean", a pair of scalars for "sum_and_weight".
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
        # Mask the weights too: an excluded entry's weight may itself be NaN, and it
        # must vanish from the mean's denominator.
        zero = jnp.zeros((), loss.dtype)
        loss, weights, normalizer = (
            None if a is None else jnp.where(kept, a, zero)
            for a in (loss, weights, normalizer)
        )
    weighted = loss if weights is None else weights * loss
    if reduction == "none":
        return weighted
    total = global_sum(jnp.sum(weighted), axis_name)
    if reduction == "sum":
        return total
    if normalizer is not None:
        count = jnp.sum(normalizer)
    elif kept is not None:
        count = jnp.sum(kept, dtype=loss.dtype)
    else:
        count = jnp.asarray(loss.size, loss.dtype)
    count = global_sum(count, axis_name)
    if reduction == "sum_and_weight":
        return total, count
    # Two wheres: the inner one keeps the division finite so that its gradient, which
    # the outer one discards when nothing is kept, is not NaN.
    nonzero = count != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, count, 1), 0).astype(
        loss.dtype
    )
