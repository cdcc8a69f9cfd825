"""Classification losses: softmax and sigmoid cross-entropy, focal losses, hinge losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lossjax import _checks
from lossjax._reduce import compute_dtype, kept_mask, reduce_loss, sanitize

__all__ = ["cross_entropy"]
LOSS_NAMES = ("cross_entropy",)


def _softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    # tanh capping (Gemma 2): keeps |logits| < cap with slope 1 near 0.
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _integer_label_setup(loss: str, logits, labels, axis, class_weights, ignore_index,
                         where):
    """Shared front half of the integer-label softmax losses.

    Checks shapes and dtypes, moves the class axis last, builds the kept mask, runs the
    value checks and sanitizes excluded entries. Returns (logits [..., K] in the compute
    dtype, safe labels, in-range mask, kept mask, class weights or None).
    """
    _checks.check_float("logits", logits)
    _checks.check_int("labels", labels)
    axis = _checks.normalize_axis(axis, jnp.ndim(logits))
    logits = jnp.moveaxis(logits, axis, -1)
    num_classes = logits.shape[-1]
    _checks.check_shape("labels", labels, logits.shape[:-1],
                        against=f"logits of shape {logits.shape} (class axis {axis})")
    if class_weights is not None:
        _checks.check_float("class_weights", class_weights)
        _checks.check_shape("class_weights", class_weights, (num_classes,),
                            against=f"{num_classes} classes")
    kept = kept_mask(labels.shape, where=where, labels=labels, ignore_index=ignore_index)
    _checks.assert_labels_in_range(loss, labels, num_classes, kept)
    _checks.assert_finite(loss, "logits", logits,
                          None if kept is None else kept[..., None])
    in_range = (labels >= 0) & (labels < num_classes)
    # Out-of-range labels gather class 0 and are turned into NaN afterwards: never a
    # silently clamped (or, for negative labels, wrapped) index.
    safe_labels = jnp.where(in_range, labels, 0)
    if kept is not None:
        safe_labels = jnp.where(kept, safe_labels, 0)
    logits = sanitize(logits, kept, 0, axis=-1).astype(compute_dtype(logits))
    return logits, safe_labels, in_range, kept, class_weights


def _take_label(values: jax.Array, labels: jax.Array) -> jax.Array:
    """values[..., labels] along the last axis, with no one-hot."""
    return jnp.take_along_axis(values, labels[..., None], axis=-1)[..., 0]


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: int = -1,
    label_smoothing: float = 0.0,
    class_weights: jax.Array | None = None,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Softmax cross-entropy against integer labels or target distributions.

    The default loss for single-label classification and language modelling. Integer
    `labels` (class ids) and float `labels` (a distribution over classes per entry,
    e.g. soft or mixup targets) are told apart by dtype at trace time. Matches
    `torch.nn.functional.cross_entropy` (weight, ignore_index, label_smoothing,
    reduction) for both kinds of labels and any class `axis`; `z_loss` (PaLM) and
    `logit_softcap` (Gemma 2) are extensions with no torch counterpart.

    .. math::
        \ell = -\sum_k w_k\, \tilde t_k \log \mathrm{softmax}(c(x))_k
               + \lambda_z \,\mathrm{logsumexp}(c(x))^2,
        \quad \tilde t = (1-\varepsilon)\, t + \varepsilon / K,
        \quad c(x) = s \tanh(x / s)

    with `t` the one-hot of the label (never built) or the given distribution.

    Args:
      logits: float, `[..., num_classes, ...]` with the classes on `axis`.
      labels: integer class ids of shape `logits.shape` without `axis`, or float
        targets of the same shape as `logits`.
      axis: the class axis of `logits`.
      label_smoothing: epsilon in [0, 1]; mixes the targets with the uniform
        distribution, torch's convention (the uniform part is class-weighted too).
      class_weights: float `[num_classes]`. For integer labels an entry's weight is
        `class_weights[label]` (also in the "mean" denominator, as torch); for float
        targets each class's term is scaled inside the entry.
      ignore_index: integer labels equal to it are excluded (as `where=False`).
      z_loss: coefficient of `logsumexp(logits)**2` added to each entry.
      logit_softcap: if set to s, logits become `s * tanh(logits / s)` first.
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum" or "mean".

    Returns:
      "none": the loss shape (`logits.shape` without `axis`); "sum", "mean": a scalar.
      dtype `promote_types(logits.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
      >>> lossjax.cross_entropy(logits, jnp.array([0, 1]), reduction="none")
      Array([0.1698, 0.5514], dtype=float32)
      >>> lossjax.cross_entropy(logits, jnp.array([0, -100]))  # -100 is ignored
      Array(0.1698, dtype=float32)

    References:
      Szegedy et al., Rethinking the Inception Architecture (label smoothing), 2016.
      Chowdhery et al., PaLM (z-loss), 2022. Gemma Team, Gemma 2 (logit soft-capping),
      2024.

    See also: `focal_loss`, `binary_cross_entropy`, `linear_cross_entropy`.
    """
    _checks.check_float("logits", logits)
    if jnp.issubdtype(jnp.result_type(labels), jnp.floating):
        return _cross_entropy_soft(
            logits, labels, axis=axis, label_smoothing=label_smoothing,
            class_weights=class_weights, z_loss=z_loss, logit_softcap=logit_softcap,
            where=where, weights=weights, reduction=reduction)
    x, safe_labels, in_range, kept, class_weights = _integer_label_setup(
        "cross_entropy", logits, labels, axis, class_weights, ignore_index, where)
    x = _softcap(x, logit_softcap)
    lse = jax.nn.logsumexp(x, axis=-1)
    # -log p_y = lse - x_y: the log-softmax is never materialized.
    nll = lse - _take_label(x, safe_labels)
    label_weight = None
    if class_weights is not None:
        label_weight = class_weights.astype(x.dtype)[safe_labels]
        nll = label_weight * nll
    if label_smoothing:
        # Uniform part: (eps / K) * sum_k w_k * (-log p_k) = eps * (lse * mean(w) -
        # mean(w * x)), torch's form (class-weighted, not renormalized).
        if class_weights is None:
            uniform = lse - jnp.mean(x, axis=-1)
        else:
            w = class_weights.astype(x.dtype)
            uniform = jnp.mean(w) * lse - jnp.mean(w * x, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    entry = nll + z_loss * lse**2 if z_loss else nll
    entry = jnp.where(in_range, entry, jnp.nan)
    normalizer = None
    if label_weight is not None:
        normalizer = label_weight if weights is None else weights * label_weight
        if weights is None:
            weights = jnp.ones((), x.dtype)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       normalizer=normalizer)


def _cross_entropy_soft(logits, targets, *, axis, label_smoothing, class_weights,
                        z_loss, logit_softcap, where, weights, reduction):
    """cross_entropy for float target distributions (same shape as logits)."""
    _checks.check_same_shape("logits", logits, "labels", targets)
    axis = _checks.normalize_axis(axis, jnp.ndim(logits))
    dtype = compute_dtype(logits, targets)
    x = jnp.moveaxis(logits, axis, -1)
    t = jnp.moveaxis(targets, axis, -1)
    num_classes = x.shape[-1]
    if class_weights is not None:
        _checks.check_float("class_weights", class_weights)
        _checks.check_shape("class_weights", class_weights, (num_classes,),
                            against=f"{num_classes} classes")
    kept = kept_mask(x.shape[:-1], where=where)
    kept_c = None if kept is None else kept[..., None]
    _checks.assert_finite("cross_entropy", "logits", x, kept_c)
    _checks.assert_unit_interval("cross_entropy", "float labels", t, kept_c)
    x = sanitize(x, kept, 0, axis=-1).astype(dtype)
    t = sanitize(t, kept, 0, axis=-1).astype(dtype)
    x = _softcap(x, logit_softcap)
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / num_classes
    if class_weights is not None:
        t = t * class_weights.astype(dtype)
    lse = jax.nn.logsumexp(x, axis=-1)
    # sum_k t_k (lse - x_k), without forming log-softmax; 0 * log 0 never arises since
    # logits are finite.
    entry = lse * jnp.sum(t, axis=-1) - jnp.sum(t * x, axis=-1)
    if z_loss:
        entry = entry + z_loss * lse**2
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction)
