"""Classification losses: softmax and sigmoid cross-entropy, focal and hinge losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lossjax import _checks
from lossjax._reduce import (
    AxisName,
    compute_dtype,
    hyperparameter,
    kept_mask,
    reduce_loss,
    sanitize,
)

__all__ = [
    "binary_cross_entropy",
    "cross_entropy",
    "focal_loss",
    "hinge_loss",
    "multiclass_hinge_loss",
    "nll_loss",
    "poly1_cross_entropy",
    "sigmoid_focal_loss",
    "soft_margin_loss",
    "squared_hinge_loss",
]
LOSS_NAMES = tuple(__all__)


def _softcap(logits: jax.Array, cap) -> jax.Array:
    # tanh capping (Gemma 2): keeps |logits| < cap with slope 1 near 0.
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _check_cross_entropy_hyperparameters(label_smoothing, z_loss, logit_softcap):
    _checks.check_range("label_smoothing", label_smoothing, low=0, high=1)
    _checks.check_range("z_loss", z_loss, low=0)
    if logit_softcap is not None:
        _checks.check_range("logit_softcap", logit_softcap, low=0, low_open=True)


def _integer_label_setup(loss: str, logits, labels, axis, class_weights, ignore_index,
                         where, *, name: str = "logits", finite: bool = True,
                         sanitize_rows: bool = True):
    """Shared front half of the integer-label losses.

    Checks shapes and dtypes, moves the class axis last, builds the kept mask, runs the
    value checks and sanitizes excluded entries. Returns (logits [..., K] in the compute
    dtype, safe labels, in-range mask, kept mask, class weights or None). `name` is the
    data argument's name in errors; `finite=False` only forbids NaN (log-probabilities
    may be -inf). `sanitize_rows=False` leaves excluded rows as they are, for callers
    whose math keeps them out of the values and gradients by itself (a separate
    sanitizing pass over `[..., K]` costs up to 2.5x the whole loss on CPU).
    """
    _checks.check_float(name, logits)
    _checks.check_int("labels", labels)
    axis = _checks.normalize_axis(axis, jnp.ndim(logits))
    logits = jnp.moveaxis(logits, axis, -1)
    num_classes = logits.shape[-1]
    _checks.check_shape("labels", labels, logits.shape[:-1],
                        against=f"{name} of shape {logits.shape} (class axis {axis})")
    if class_weights is not None:
        _checks.check_float("class_weights", class_weights)
        _checks.check_shape("class_weights", class_weights, (num_classes,),
                            against=f"{num_classes} classes")
    kept = kept_mask(labels.shape, where=where, labels=labels,
                     ignore_index=ignore_index)
    _checks.assert_labels_in_range(loss, labels, num_classes, kept)
    kept_c = None if kept is None else kept[..., None]
    if finite:
        _checks.assert_finite(loss, name, logits, kept_c)
    else:
        _checks.assert_values(loss, f"{name} must not be NaN.", ~jnp.isnan(logits),
                              kept_c)
    in_range = (labels >= 0) & (labels < num_classes)
    # Out-of-range labels gather class 0 and are turned into NaN afterwards: never a
    # silently clamped (or, for negative labels, wrapped) index.
    safe_labels = jnp.where(in_range, labels, 0)
    if kept is not None:
        safe_labels = jnp.where(kept, safe_labels, 0)
    if sanitize_rows:
        logits = sanitize(logits, kept, 0, axis=-1)
    logits = logits.astype(compute_dtype(logits))
    return logits, safe_labels, in_range, kept, class_weights


def _take_label(values: jax.Array, labels: jax.Array) -> jax.Array:
    """values[..., labels] along the last axis, with no one-hot."""
    return jnp.take_along_axis(values, labels[..., None], axis=-1)[..., 0]


def _take_kept_label(values, labels, kept):
    """values[..., labels], 0 in excluded rows (which may hold NaN or inf)."""
    picked = _take_label(values, labels)
    return picked if kept is None else jnp.where(kept, picked, 0)


def _all_kept(kept, shape):
    return jnp.ones(shape, bool) if kept is None else kept


# Class counts from which _masked_logsumexp masks the logits before the exp rather than
# the exp's residual after it. On XLA:CPU the first form's gradient is up to 3x slower
# below this line, the second's up to 1.3x slower above it (measured at 10, 32, 64,
# 128, 256, 512, 1000 and 32000 classes; both match optax on their own side).
_MASK_LOGITS_MIN_CLASSES = 64


@jax.custom_jvp
def _masked_logsumexp(x: jax.Array, kept: jax.Array) -> jax.Array:
    """logsumexp over the last axis where `kept`, 0 elsewhere.

    Rows that are not kept may hold anything (NaN, inf): their value and their gradient
    are exactly 0. This replaces sanitizing the logits with a separate `where` pass over
    `[..., K]` before `jax.nn.logsumexp`, which made cross_entropy up to 2.5x slower
    than optax on CPU; here the mask rides inside the passes the gradient needs anyway.
    Second derivatives are exact in kept rows (those of a non-kept row holding NaN/inf
    may be NaN when K < 64).
    """
    return jnp.where(kept, jax.nn.logsumexp(x, axis=-1), 0)


@_masked_logsumexp.defjvp
def _masked_logsumexp_jvp(primals, tangents):
    x, kept = primals
    dx = tangents[0]
    rows = kept[..., None]
    # The shift cancels in every output, so it needs no derivative; a row of -inf
    # shifts by 0 (jax.nn.logsumexp's rule).
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1))
    m = jnp.where(kept & jnp.isfinite(m), m, 0)
    if x.shape[-1] >= _MASK_LOGITS_MIN_CLASSES:
        e = jnp.exp(jnp.where(rows, x, 0) - m[..., None])
        masked_e = e
    else:
        e = jnp.exp(x - m[..., None])
        masked_e = jnp.where(rows, e, 0)
    total = jnp.sum(e, axis=-1)
    lse = jnp.where(kept, jnp.log(total) + m, 0)
    # d lse = sum(softmax * dx): the row's 1 / total is applied after the reduction,
    # and is 0 (not 1 / NaN) in excluded rows.
    inv_total = jnp.where(kept, 1 / jnp.where(kept, total, 1), 0)
    return lse, jnp.sum(masked_e * dx, axis=-1) * inv_total


def _label_weight(class_weights, safe_labels, dtype):
    """class_weights[labels] in `dtype`, or None without class weights."""
    if class_weights is None:
        return None
    # jnp, not the caller's type: a NumPy array cannot be indexed by a tracer.
    return jnp.asarray(class_weights, dtype)[safe_labels]


def _reduce_class_weighted(entry, label_weight, *, kept, weights, reduction,
                           axis_name):
    """reduce_loss for an integer-label loss whose entries already hold w_y * loss.

    torch's convention: the labels' class weights are also the "mean" denominator
    (and the weight of "sum_and_weight").
    """
    normalizer = None
    if label_weight is not None:
        normalizer = label_weight if weights is None else weights * label_weight
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       normalizer=normalizer, axis_name=axis_name)


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
    axis_name: AxisName = None,
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
        May be a traced scalar (a schedule).
      class_weights: float `[num_classes]`. For integer labels an entry's weight is
        `class_weights[label]` (also in the "mean" denominator, as torch); for float
        targets each class's term is scaled inside the entry.
      ignore_index: integer labels equal to it are excluded (as `where=False`).
      z_loss: coefficient (>= 0) of `logsumexp(logits)**2` added to each entry; may
        be a traced scalar.
      logit_softcap: if set to s > 0, logits become `s * tanh(logits / s)` first;
        may be a traced scalar.
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": the loss shape (`logits.shape` without `axis`); "sum", "mean": a scalar;
      "sum_and_weight": a pair of scalars. dtype `promote_types(logits.dtype,
      float32)`.

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
    _check_cross_entropy_hyperparameters(label_smoothing, z_loss, logit_softcap)
    if jnp.issubdtype(jnp.result_type(labels), jnp.floating):
        return _cross_entropy_soft(
            logits, labels, axis=axis, label_smoothing=label_smoothing,
            class_weights=class_weights, z_loss=z_loss, logit_softcap=logit_softcap,
            where=where, weights=weights, reduction=reduction, axis_name=axis_name)
    x, safe_labels, in_range, kept, class_weights = _integer_label_setup(
        "cross_entropy", logits, labels, axis, class_weights, ignore_index, where,
        sanitize_rows=False)
    lse, x = _softcap_and_logsumexp(x, kept, logit_softcap)
    # -log p_y = lse - x_y: the log-softmax is never materialized.
    nll = lse - _take_kept_label(x, safe_labels, kept)
    label_weight = _label_weight(class_weights, safe_labels, x.dtype)
    if label_weight is not None:
        nll = label_weight * nll
    if not _checks.is_zero(label_smoothing):
        eps = hyperparameter(label_smoothing, x.dtype)
        nll = (1.0 - eps) * nll + eps * _uniform_term(x, lse, kept, class_weights)
    entry = _add_z_loss(nll, lse, z_loss)
    entry = jnp.where(in_range, entry, jnp.nan)
    return _reduce_class_weighted(entry, label_weight, kept=kept, weights=weights,
                                  reduction=reduction, axis_name=axis_name)


def _softcap_and_logsumexp(x, kept, logit_softcap):
    """(logsumexp of the soft-capped logits, masked to 0 in excluded rows; the logits
    as the loss uses them)."""
    if logit_softcap is not None:
        # tanh's derivative at an excluded NaN would be NaN: sanitize first.
        x = _softcap(sanitize(x, kept, 0, axis=-1),
                     hyperparameter(logit_softcap, x.dtype))
    # Exact without sanitize: _masked_logsumexp's custom JVP masks inside its own
    # passes (a sanitizing pass over [..., K] is slow on CPU); the gather's and the
    # means' derivatives do not depend on the values; reduce_loss drops the entries.
    return _masked_logsumexp(x, _all_kept(kept, x.shape[:-1])), x


def _uniform_term(x, lse, kept, class_weights):
    """(1 / K) sum_k w_k (-log p_k): label smoothing's uniform part, 0 where excluded.

    = lse * mean(w) - mean(w * x), torch's form (class-weighted, not renormalized).
    """
    if class_weights is None:
        uniform = lse - jnp.mean(x, axis=-1)
    else:
        w = jnp.asarray(class_weights).astype(x.dtype)
        # mean(w * x) as a masked row dot: the gradient w.r.t. the class weights, a
        # sum over rows, never meets an excluded row's NaN, at no sanitizing pass.
        w_x = _masked_row_dot(x, w, _all_kept(kept, x.shape[:-1])) / x.shape[-1]
        uniform = jnp.mean(w) * lse - w_x
    # Excluded rows may hold NaN here: masked, so that the gradient of a traced
    # label_smoothing (a sum over rows) stays finite.
    return uniform if kept is None else jnp.where(kept, uniform, 0)


def _add_z_loss(entry, lse, z_loss):
    # PaLM's z-loss; lse is already 0 in excluded rows.
    if _checks.is_zero(z_loss):
        return entry
    return entry + hyperparameter(z_loss, lse.dtype) * lse**2


def _cross_entropy_soft(logits, targets, *, axis, label_smoothing, class_weights,
                        z_loss, logit_softcap, where, weights, reduction, axis_name):
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
    x, t = x.astype(dtype), t.astype(dtype)
    lse, x = _softcap_and_logsumexp(x, kept, logit_softcap)
    smoothing = not _checks.is_zero(label_smoothing)
    if smoothing or class_weights is not None:
        # t masked inside the elementwise ops that fuse into the row dot: the gradient
        # of a traced label_smoothing or of the class weights (sums over rows) then
        # never meets an excluded row's NaN target.
        t = sanitize(t, kept, 0, axis=-1)
    if smoothing:
        eps = hyperparameter(label_smoothing, dtype)
        t = (1.0 - eps) * t + eps / num_classes
    if class_weights is not None:
        t = t * jnp.asarray(class_weights).astype(dtype)
    # As for integer labels, excluded rows are not sanitized (a slow pass on CPU):
    # exact through _masked_row_dot's custom JVP, which masks before it multiplies.
    # sum_k t_k (lse - x_k) in one reduction (not lse * sum(t) - sum(t * x), one pass
    # more), without forming log-softmax; 0 * log 0 never arises as logits are finite.
    entry = _masked_row_dot(t, lse[..., None] - x, _all_kept(kept, x.shape[:-1]))
    entry = _add_z_loss(entry, lse, z_loss)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


@jax.custom_jvp
def _masked_row_dot(a: jax.Array, b: jax.Array, kept: jax.Array) -> jax.Array:
    """sum(a * b) over the last axis where `kept`, else 0.

    Rows that are not kept may hold anything: their value and gradients are exactly 0,
    the mask being applied inside the gradient's own pass, not as a sanitizing pass.
    """
    return jnp.where(kept, jnp.sum(a * b, axis=-1), 0)


def _masked_row_dot_jvp(primals, tangents):
    a, b, kept = primals
    da, db, _ = tangents
    rows = kept[..., None]
    out = jnp.where(kept, jnp.sum(a * b, axis=-1), 0)
    tangent = jnp.zeros_like(out)
    if not isinstance(da, SymbolicZero):
        tangent = tangent + jnp.sum(jnp.where(rows, b, 0) * da, axis=-1)
    if not isinstance(db, SymbolicZero):
        tangent = tangent + jnp.sum(jnp.where(rows, a, 0) * db, axis=-1)
    return out, tangent


_masked_row_dot.defjvp(_masked_row_dot_jvp, symbolic_zeros=True)


# --- elementwise (sigmoid and margin) losses ------------------------------------------


def _elementwise_setup(loss: str, inputs, targets, where, *, name: str,
                       target_rule: str = "unit"):
    """Shared front half of the elementwise losses (loss shape = `inputs.shape`).

    Checks dtypes and shapes, builds the kept mask, runs the value checks and sanitizes
    excluded entries (inputs -> 0, targets -> 0 or 1) before any math. `target_rule` is
    "unit" (targets in [0, 1]) or "sign" (targets in {-1, +1}). Returns (inputs,
    targets, kept), both arrays in the compute dtype.
    """
    _checks.check_float(name, inputs)
    _checks.check_float("targets", targets)
    _checks.check_same_shape(name, inputs, "targets", targets)
    dtype = compute_dtype(inputs, targets)
    kept = kept_mask(jnp.shape(inputs), where=where)
    _checks.assert_finite(loss, name, inputs, kept)
    if target_rule == "unit":
        _checks.assert_unit_interval(loss, "targets", targets, kept)
        fill = 0
    else:
        _checks.assert_values(loss, "targets must be -1 or +1.",
                              (targets == 1) | (targets == -1), kept)
        fill = 1
    inputs = sanitize(inputs, kept, 0).astype(dtype)
    targets = sanitize(targets, kept, fill).astype(dtype)
    return inputs, targets, kept


def binary_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    pos_weight: jax.Array | None = None,
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Sigmoid (binary) cross-entropy between logits and probabilities in [0, 1].

    For binary and multi-label classification (one independent sigmoid per entry) and
    for soft binary targets. Matches
    `torch.nn.functional.binary_cross_entropy_with_logits` including `pos_weight`
    (broadcast against `logits`, so a `[num_classes]` vector weights the positives of
    each class, as in torch) and `optax.sigmoid_binary_cross_entropy`. Label smoothing
    follows Keras: targets become `t * (1 - eps) + eps / 2`. The loss is elementwise
    (unlike Keras, no hidden mean over the last axis). With `weights`, "mean" divides
    by the kept entries' sum of weights (the lossjax contract), whereas torch's
    `weight` argument divides by the number of entries.

    .. math::
        \ell = -\left[w_+\, \tilde t \log \sigma(x)
                      + (1 - \tilde t) \log \sigma(-x)\right],
        \quad \tilde t = (1 - \varepsilon)\, t + \varepsilon / 2

    Args:
      logits: float, any shape `[...]`.
      targets: float in [0, 1], the same shape as `logits`.
      pos_weight: float, broadcastable to `logits` (e.g. `[num_classes]`); multiplies
        the positive term, torch's `pos_weight`.
      label_smoothing: epsilon in [0, 1], Keras's convention; may be a traced
        scalar.
      where: bool, broadcastable to `logits.shape`; False entries count for nothing.
      weights: float, broadcastable to `logits.shape`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": `logits.shape`; "sum", "mean": a scalar; "sum_and_weight": a pair of
      scalars. dtype `promote_types(logits.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> logits = jnp.array([2.0, -1.0, 0.0])
      >>> lossjax.binary_cross_entropy(logits, jnp.array([1.0, 0.0, 1.0]),
      ...                              reduction="none")
      Array([0.1269 , 0.3133, 0.6931], dtype=float32)

    See also: `sigmoid_focal_loss`, `cross_entropy`, `soft_margin_loss`.
    """
    _checks.check_range("label_smoothing", label_smoothing, low=0, high=1)
    x, t, kept = _elementwise_setup("binary_cross_entropy", logits, targets, where,
                                    name="logits")
    if not _checks.is_zero(label_smoothing):
        eps = hyperparameter(label_smoothing, x.dtype)
        t = (1.0 - eps) * t + 0.5 * eps
    # -log sigmoid(+-x) = softplus(-+x) = max(-+x, 0) + log1p(exp(-|x|)): both share one
    # exp and one log1p (two log_sigmoid calls cost 1.5x on CPU), every term is >= 0
    # (torch's (1 - t) x + softplus(-x) cancels, losing small losses), and it is finite
    # for any finite x. One `where` picks the side for all three pieces, so that the
    # derivative at x = 0 is exact (jnp.abs and jnp.maximum would disagree there).
    positive_x = x >= 0
    shared = jnp.log1p(jnp.exp(jnp.where(positive_x, -x, x)))
    neg_log_p = jnp.where(positive_x, 0, -x) + shared
    neg_log_not_p = jnp.where(positive_x, x, 0) + shared
    positive = t * neg_log_p
    if pos_weight is not None:
        _checks.check_float("pos_weight", pos_weight)
        _checks.check_broadcastable("pos_weight", pos_weight, x.shape)
        positive = jnp.asarray(pos_weight).astype(x.dtype) * positive
    entry = positive + (1.0 - t) * neg_log_not_p
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def _safe_log(u: jax.Array) -> jax.Array:
    # log 0 = -inf with a zero (not NaN) local derivative; the exact derivative of the
    # one caller comes from its custom JVP below.
    positive = u > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, u, 1)), -jnp.inf)


def _log_one_minus_pt(x: jax.Array, t: jax.Array) -> jax.Array:
    # log(1 - p_t) = log((1 - t) sigmoid(x) + t sigmoid(-x)) as a logaddexp of
    # log_sigmoid terms: never rounds to log(0) for hard targets at large |x|.
    return jnp.logaddexp(_safe_log(1.0 - t) + jax.nn.log_sigmoid(x),
                         _safe_log(t) + jax.nn.log_sigmoid(-x))


@jax.custom_jvp
def _sigmoid_focal_factor(x, t, gamma):
    """(1 - p_t) ** gamma with p_t = t sigmoid(x) + (1 - t) sigmoid(-x)."""
    return jnp.exp(gamma * _log_one_minus_pt(x, t))


def _sigmoid_focal_factor_jvp(primals, tangents):
    # Each derivative is written as ONE exponential of a sum of logs, so the factor
    # gamma * (1 - p_t) ** (gamma - 1), infinite at p_t = 1 when gamma < 1, is never
    # formed on its own (0 * inf). The x-exponent is bounded above by 0 for any gamma,
    # so first and second derivatives in x stay finite at |x| = 1e4. The t-derivative
    # is exact, and genuinely overflows there when gamma < 1; symbolic zeros keep it
    # out of the x-only derivatives (0 * inf would be NaN).
    x, t, gamma = primals
    dx, dt, dgamma = tangents
    log_p, log_not_p = jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
    log_q = _log_one_minus_pt(x, t)
    factor = jnp.exp(gamma * log_q)
    rest = (gamma - 1.0) * log_q
    out = jnp.zeros_like(factor)
    if not isinstance(dx, SymbolicZero):
        # d/dx: gamma (1 - 2t) sigmoid(x) sigmoid(-x) (1 - p_t)^(gamma - 1).
        out = out + gamma * (1.0 - 2.0 * t) * jnp.exp(log_p + log_not_p + rest) * dx
    if not isinstance(dt, SymbolicZero):
        # d/dt: gamma (sigmoid(-x) - sigmoid(x)) (1 - p_t)^(gamma - 1).
        out = out + gamma * (jnp.exp(log_not_p + rest) - jnp.exp(log_p + rest)) * dt
    if not isinstance(dgamma, SymbolicZero):
        out = out + factor * log_q * dgamma
    return factor, out


_sigmoid_focal_factor.defjvp(_sigmoid_focal_factor_jvp, symbolic_zeros=True)


def sigmoid_focal_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    alpha: float | None = None,
    gamma: float = 2.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Sigmoid focal loss (RetinaNet): binary cross-entropy scaled by (1 - p_t)^gamma.

    For dense detection and other binary / multi-label problems with many easy
    negatives: the factor `(1 - p_t)^gamma` down-weights well-classified entries.
    Matches `torchvision.ops.sigmoid_focal_loss` (soft targets in [0, 1] too), except
    that `alpha=None` (the default here; torchvision's default is 0.25 and it disables
    the weighting with `alpha < 0`) means no alpha weighting, as in
    `optax.sigmoid_focal_loss`. The factor is computed as `exp(gamma * log(1 - p_t))`
    with `log(1 - p_t)` built from `log_sigmoid` terms, under a custom derivative: the
    loss, its gradients and its Hessian in `logits` stay finite at |logits| = 1e4 for
    every `gamma >= 0`, including `gamma < 1`, where `(1 - p_t)^gamma` has an infinite
    derivative at `p_t = 1`. Gradients w.r.t. `targets` are exact too (for `gamma < 1`
    they genuinely overflow at extreme logits).

    .. math::
        \ell = -\alpha_t (1 - p_t)^\gamma
               \left[t \log \sigma(x) + (1 - t) \log \sigma(-x)\right],
        \quad p_t = t\,\sigma(x) + (1 - t)\,\sigma(-x),
        \quad \alpha_t = \alpha t + (1 - \alpha)(1 - t)

    Args:
      logits: float, any shape `[...]`.
      targets: float in [0, 1], the same shape as `logits`.
      alpha: weight of the positive class in [0, 1], or None for no alpha weighting;
        may be a traced scalar.
      gamma: focusing exponent, >= 0; 0 gives (alpha-weighted) binary cross-entropy.
        May be a traced scalar.
      where: bool, broadcastable to `logits.shape`; False entries count for nothing.
      weights: float, broadcastable to `logits.shape`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": `logits.shape`; "sum", "mean": a scalar; "sum_and_weight": a pair of
      scalars. dtype `promote_types(logits.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> logits = jnp.array([2.0, -1.0, 0.0])
      >>> lossjax.sigmoid_focal_loss(logits, jnp.array([1.0, 0.0, 1.0]),
      ...                            alpha=0.25, reduction="none")
      Array([0.0004509, 0.01699, 0.04332 ], dtype=float32)

    References:
      Lin et al., Focal Loss for Dense Object Detection, ICCV 2017.

    See also: `binary_cross_entropy`, `focal_loss`.
    """
    _checks.check_range("gamma", gamma, low=0)
    if alpha is not None:
        _checks.check_range("alpha", alpha, low=0, high=1)
    x, t, kept = _elementwise_setup("sigmoid_focal_loss", logits, targets, where,
                                    name="logits")
    # log_sigmoid forms: finite for any finite logit.
    entry = -(t * jax.nn.log_sigmoid(x) + (1.0 - t) * jax.nn.log_sigmoid(-x))
    if not _checks.is_zero(gamma):
        entry = entry * _sigmoid_focal_factor(x, t, jnp.asarray(gamma).astype(x.dtype))
    if alpha is not None:
        alpha = hyperparameter(alpha, x.dtype)
        entry = (alpha * t + (1.0 - alpha) * (1.0 - t)) * entry
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


# --- softmax (integer-label) losses ---------------------------------------------------


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: int = -1,
    gamma: float = 2.0,
    class_weights: jax.Array | None = None,
    ignore_index: int = -100,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Softmax focal loss: cross-entropy scaled by (1 - p_y)^gamma.

    For single-label classification with class imbalance or many easy examples (Lin et
    al.'s focal loss with a softmax instead of per-class sigmoids). `gamma = 0` is
    exactly `cross_entropy`. Class weights act as in `cross_entropy` (torch's
    convention): an entry's weight is `class_weights[label]`, also in the "mean"
    denominator. Neither torch nor optax has a softmax focal loss.

    `log(1 - p_y)` is computed exactly as `logsumexp` over the other classes minus
    `logsumexp` over all, not as `log1p(-p_y)`: it stays finite (and accurate) when
    `p_y` rounds to 1, so the loss, its gradient and its Hessian stay finite at
    |logits| = 1e4 for every `gamma >= 0`, `gamma < 1` included. This costs a second
    pass over the logits when `gamma != 0`.

    .. math::
        \ell = -w_y\, (1 - p_y)^\gamma \log p_y,
        \quad p = \mathrm{softmax}(x)

    Args:
      logits: float, `[..., num_classes, ...]` with the classes on `axis`.
      labels: integer class ids, `logits.shape` without `axis`.
      axis: the class axis of `logits`.
      gamma: focusing exponent, >= 0; may be a traced scalar.
      class_weights: float `[num_classes]`; entry weight `class_weights[label]`.
      ignore_index: labels equal to it are excluded (as `where=False`).
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": the loss shape (`logits.shape` without `axis`); "sum", "mean": a scalar;
      "sum_and_weight": a pair of scalars. dtype `promote_types(logits.dtype,
      float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
      >>> lossjax.focal_loss(logits, jnp.array([0, 1]), reduction="none")
      Array([0.004144, 0.09908], dtype=float32)

    References:
      Lin et al., Focal Loss for Dense Object Detection, ICCV 2017.

    See also: `cross_entropy`, `sigmoid_focal_loss`, `poly1_cross_entropy`.
    """
    _checks.check_range("gamma", gamma, low=0)
    x, safe_labels, in_range, kept, class_weights = _integer_label_setup(
        "focal_loss", logits, labels, axis, class_weights, ignore_index, where)
    lse = jax.nn.logsumexp(x, axis=-1)
    log_p = _take_label(x, safe_labels) - lse
    entry = -log_p
    if not _checks.is_zero(gamma):
        num_classes = x.shape[-1]
        if num_classes == 1:
            # p_y = 1: the factor is 0 (0 ** gamma), and 0 * log p_y = 0.
            entry = jnp.zeros_like(entry)
        else:
            others = jnp.arange(num_classes) != safe_labels[..., None]
            # log(1 - p_y) = logsumexp over k != y minus logsumexp over all: exact even
            # where p_y rounds to 1, so no 0 * inf in the derivatives.
            log_q = jax.nn.logsumexp(x, axis=-1, where=others) - lse
            entry = jnp.exp(hyperparameter(gamma, x.dtype) * log_q) * entry
    label_weight = _label_weight(class_weights, safe_labels, x.dtype)
    if label_weight is not None:
        entry = label_weight * entry
    entry = jnp.where(in_range, entry, jnp.nan)
    return _reduce_class_weighted(entry, label_weight, kept=kept, weights=weights,
                                  reduction=reduction, axis_name=axis_name)


def poly1_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    epsilon: float = 1.0,
    axis: int = -1,
    class_weights: jax.Array | None = None,
    ignore_index: int = -100,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Poly-1 cross-entropy (PolyLoss): cross-entropy plus epsilon * (1 - p_y).

    A drop-in alternative to `cross_entropy` for classification whose leading
    polynomial coefficient is tuned by `epsilon` (positive values help on ImageNet-style
    tasks in the paper; `epsilon = 0` is exactly `cross_entropy`). Class weights weight
    the whole entry, as in `cross_entropy` (also in the "mean" denominator). Neither
    torch nor optax ships it; it matches the paper's reference implementation with
    one-hot labels.

    .. math::
        \ell = w_y \left[-\log p_y + \varepsilon (1 - p_y)\right],
        \quad p = \mathrm{softmax}(x)

    Args:
      logits: float, `[..., num_classes, ...]` with the classes on `axis`.
      labels: integer class ids, `logits.shape` without `axis`.
      epsilon: added to the coefficient (1) of the first polynomial term, >= -1
        (the paper's range: the coefficient 1 + epsilon stays >= 0); may be a
        traced scalar.
      axis: the class axis of `logits`.
      class_weights: float `[num_classes]`; entry weight `class_weights[label]`.
      ignore_index: labels equal to it are excluded (as `where=False`).
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": the loss shape (`logits.shape` without `axis`); "sum", "mean": a scalar;
      "sum_and_weight": a pair of scalars. dtype `promote_types(logits.dtype,
      float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
      >>> lossjax.poly1_cross_entropy(logits, jnp.array([0, 1]), reduction="none")
      Array([0.3261, 0.9753], dtype=float32)

    References:
      Leng et al., PolyLoss: A Polynomial Expansion Perspective of Classification Loss
      Functions, ICLR 2022.

    See also: `cross_entropy`, `focal_loss`.
    """
    _checks.check_range("epsilon", epsilon, low=-1)
    x, safe_labels, in_range, kept, class_weights = _integer_label_setup(
        "poly1_cross_entropy", logits, labels, axis, class_weights, ignore_index, where,
        sanitize_rows=False)
    # Exact without sanitize, as in cross_entropy: _masked_logsumexp's custom JVP
    # masks inside its passes; nll is 0 in excluded rows.
    nll = (_masked_logsumexp(x, _all_kept(kept, x.shape[:-1]))
           - _take_kept_label(x, safe_labels, kept))
    # 1 - p_y = -expm1(log p_y): accurate when p_y is close to 1.
    entry = nll - hyperparameter(epsilon, x.dtype) * jnp.expm1(-nll)
    label_weight = _label_weight(class_weights, safe_labels, x.dtype)
    if label_weight is not None:
        entry = label_weight * entry
    entry = jnp.where(in_range, entry, jnp.nan)
    return _reduce_class_weighted(entry, label_weight, kept=kept, weights=weights,
                                  reduction=reduction, axis_name=axis_name)


def nll_loss(
    log_predictions: jax.Array,
    labels: jax.Array,
    *,
    axis: int = -1,
    class_weights: jax.Array | None = None,
    ignore_index: int = -100,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Negative log-likelihood of integer labels under given log-probabilities.

    For models that already output log-probabilities (a `log_softmax` head, a mixture,
    a CRF marginal). Matches `torch.nn.functional.nll_loss` (weight, ignore_index,
    reduction; "mean" divides by the labels' class weights), with the class axis last by
    default where torch has it at 1. The input is used as given: it is not normalized,
    and a `-inf` log-probability at the label gives an infinite loss.

    .. math::
        \ell = -w_y \, \log\hat p_y

    Args:
      log_predictions: float, `[..., num_classes, ...]` with the classes on `axis`.
      labels: integer class ids, `log_predictions.shape` without `axis`.
      axis: the class axis of `log_predictions`.
      class_weights: float `[num_classes]`; entry weight `class_weights[label]`.
      ignore_index: labels equal to it are excluded (as `where=False`).
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": the loss shape (`log_predictions.shape` without `axis`); "sum", "mean": a
      scalar; "sum_and_weight": a pair of scalars. dtype
      `promote_types(log_predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> log_p = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]))
      >>> lossjax.nll_loss(log_p, jnp.array([0, 1]), reduction="none")
      Array([0.3567, 1.386 ], dtype=float32)

    See also: `cross_entropy` (the same loss on logits, fused with log-softmax).
    """
    x, safe_labels, in_range, kept, class_weights = _integer_label_setup(
        "nll_loss", log_predictions, labels, axis, class_weights, ignore_index, where,
        name="log_predictions", finite=False, sanitize_rows=False)
    # A gather's derivative does not depend on the values: excluded rows need no
    # sanitizing pass over [..., K], only their picked value zeroed.
    entry = -_take_kept_label(x, safe_labels, kept)
    label_weight = _label_weight(class_weights, safe_labels, x.dtype)
    if label_weight is not None:
        entry = label_weight * entry
    entry = jnp.where(in_range, entry, jnp.nan)
    return _reduce_class_weighted(entry, label_weight, kept=kept, weights=weights,
                                  reduction=reduction, axis_name=axis_name)


# --- margin losses --------------------------------------------------------------------


def hinge_loss(
    scores: jax.Array,
    targets: jax.Array,
    *,
    margin: float = 1.0,
    squared: bool = False,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Binary hinge loss max(0, margin - t * s) for targets in {-1, +1}.

    For max-margin (SVM-style) binary or multi-label classifiers. Keras's `hinge`
    (`squared=True`: `squared_hinge`) and `optax.hinge_loss`, but elementwise (Keras
    takes a hidden mean over the last axis) and targets must already be -1 / +1 (Keras
    silently maps {0, 1} targets to {-1, +1}; checked mode rejects them here). The
    gradient at the kink is 0.

    .. math::
        \ell = \max(0, m - t s) \quad\text{or, squared,}\quad \max(0, m - t s)^2

    Args:
      scores: float, any shape `[...]`.
      targets: float in {-1, +1}, the same shape as `scores`.
      margin: m >= 0, the margin; may be a traced scalar.
      squared: square the hinge (smooth, as Keras's `squared_hinge`).
      where: bool, broadcastable to `scores.shape`; False entries count for nothing.
      weights: float, broadcastable to `scores.shape`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": `scores.shape`; "sum", "mean": a scalar; "sum_and_weight": a pair of
      scalars. dtype `promote_types(scores.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> scores = jnp.array([2.0, 0.5, -0.5])
      >>> lossjax.hinge_loss(scores, jnp.array([1.0, 1.0, 1.0]), reduction="none")
      Array([0. , 0.5, 1.5], dtype=float32)

    See also: `squared_hinge_loss`, `multiclass_hinge_loss`, `soft_margin_loss`.
    """
    return _hinge("hinge_loss", scores, targets, margin=margin, squared=squared,
                  where=where, weights=weights, reduction=reduction,
                  axis_name=axis_name)


def _hinge(loss, scores, targets, *, margin, squared, where, weights, reduction,
           axis_name):
    _checks.check_range("margin", margin, low=0)
    s, t, kept = _elementwise_setup(loss, scores, targets, where, name="scores",
                                    target_rule="sign")
    entry = jax.nn.relu(hyperparameter(margin, s.dtype) - t * s)
    if squared:
        entry = entry**2
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def squared_hinge_loss(
    scores: jax.Array,
    targets: jax.Array,
    *,
    margin: float = 1.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Squared binary hinge loss max(0, margin - t * s)^2 for targets in {-1, +1}.

    `hinge_loss(..., squared=True)` under its own name, because Keras users look for
    `squared_hinge` and a registry name (`config.loss.name`) cannot carry a flag.
    Keras's `squared_hinge`, but elementwise and without the {0, 1} -> {-1, +1}
    mapping.

    .. math::
        \ell = \max(0, m - t s)^2

    Args:
      scores: float, any shape `[...]`.
      targets: float in {-1, +1}, the same shape as `scores`.
      margin: m >= 0, the margin; may be a traced scalar.
      where: bool, broadcastable to `scores.shape`; False entries count for nothing.
      weights: float, broadcastable to `scores.shape`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": `scores.shape`; "sum", "mean": a scalar; "sum_and_weight": a pair of
      scalars. dtype `promote_types(scores.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> scores = jnp.array([2.0, 0.5, -0.5])
      >>> lossjax.squared_hinge_loss(scores, jnp.array([1.0, 1.0, 1.0]),
      ...                            reduction="none")
      Array([0.  , 0.25, 2.25], dtype=float32)

    See also: `hinge_loss`.
    """
    return _hinge("squared_hinge_loss", scores, targets, margin=margin, squared=True,
                  where=where, weights=weights, reduction=reduction,
                  axis_name=axis_name)


def soft_margin_loss(
    scores: jax.Array,
    targets: jax.Array,
    *,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Logistic (soft-margin) loss log(1 + exp(-t * s)) for targets in {-1, +1}.

    The smooth counterpart of `hinge_loss` for ±1 targets; equal to
    `binary_cross_entropy(s, (t + 1) / 2)`. Matches
    `torch.nn.functional.soft_margin_loss`.

    .. math::
        \ell = \log(1 + e^{-t s})

    Args:
      scores: float, any shape `[...]`.
      targets: float in {-1, +1}, the same shape as `scores`.
      where: bool, broadcastable to `scores.shape`; False entries count for nothing.
      weights: float, broadcastable to `scores.shape`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": `scores.shape`; "sum", "mean": a scalar; "sum_and_weight": a pair of
      scalars. dtype `promote_types(scores.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> scores = jnp.array([2.0, 0.0, -1.0])
      >>> lossjax.soft_margin_loss(scores, jnp.array([1.0, -1.0, 1.0]),
      ...                          reduction="none")
      Array([0.1269 , 0.6931, 1.313], dtype=float32)

    See also: `hinge_loss`, `binary_cross_entropy`.
    """
    s, t, kept = _elementwise_setup("soft_margin_loss", scores, targets, where,
                                    name="scores", target_rule="sign")
    # softplus, not log1p(exp(.)): finite for any finite score.
    entry = jax.nn.softplus(-t * s)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def multiclass_hinge_loss(
    scores: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 1.0,
    p: int = 1,
    axis: int = -1,
    class_weights: jax.Array | None = None,
    ignore_index: int = -100,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Multi-class hinge loss (Weston-Watkins), torch's `multi_margin_loss`.

    For max-margin multi-class classifiers: every other class j whose score comes within
    `margin` of the label's score adds a penalty. Matches
    `torch.nn.functional.multi_margin_loss` (p, margin, weight, reduction), including
    its division by `num_classes` and its class weights, which multiply the entry but,
    unlike `cross_entropy`, are NOT in the "mean" denominator: torch's "mean" divides by
    the number of entries, and so does this loss (per-entry `weights`, if given, form
    the denominator as usual). Entries whose label is `ignore_index` are excluded
    (torch has no ignore_index here).

    .. math::
        \ell = \frac{w_y}{K} \sum_{j \ne y} \max(0,\, m - s_y + s_j)^p

    Args:
      scores: float, `[..., num_classes, ...]` with the classes on `axis`.
      labels: integer class ids, `scores.shape` without `axis`.
      margin: m >= 0, the margin; may be a traced scalar.
      p: 1 or 2, the power of each hinge (torch allows only these).
      axis: the class axis of `scores`.
      class_weights: float `[num_classes]`; the entry is scaled by
        `class_weights[label]` (not in the "mean" denominator, as torch).
      ignore_index: labels equal to it are excluded (as `where=False`).
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).

    Returns:
      "none": the loss shape (`scores.shape` without `axis`); "sum", "mean": a scalar;
      "sum_and_weight": a pair of scalars. dtype `promote_types(scores.dtype,
      float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> scores = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
      >>> lossjax.multiclass_hinge_loss(scores, jnp.array([0, 1]), reduction="none")
      Array([0. , 0.3333], dtype=float32)

    References:
      Weston and Watkins, Support Vector Machines for Multi-Class Pattern Recognition,
      ESANN 1999.

    See also: `hinge_loss`, `cross_entropy`.
    """
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}.")
    _checks.check_range("margin", margin, low=0)
    s, safe_labels, in_range, kept, class_weights = _integer_label_setup(
        "multiclass_hinge_loss", scores, labels, axis, class_weights, ignore_index,
        where, name="scores")
    num_classes = s.shape[-1]
    others = jnp.arange(num_classes) != safe_labels[..., None]
    margin = hyperparameter(margin, s.dtype)
    hinge = jax.nn.relu(margin - _take_label(s, safe_labels)[..., None] + s)
    if p == 2:
        hinge = hinge**2
    entry = jnp.sum(jnp.where(others, hinge, 0), axis=-1) / num_classes
    label_weight = _label_weight(class_weights, safe_labels, s.dtype)
    if label_weight is not None:
        entry = label_weight * entry
    entry = jnp.where(in_range, entry, jnp.nan)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)
