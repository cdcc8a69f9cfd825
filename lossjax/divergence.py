"""Divergences between distributions along a class `axis`: KL and Jensen-Shannon.

Each loss gives one value per distribution: the loss shape is the input shape without
`axis`, so "mean" over `[batch, num_classes]` inputs is the mean over the batch
(torch's `reduction="batchmean"`, the true mean KL), not torch's "mean" over elements.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lossjax import _checks
from lossjax._reduce import (
    AxisName,
    compute_dtype,
    kept_mask,
    reduce_loss,
    sanitize,
)

__all__ = ["kl_divergence", "kl_divergence_with_logits", "js_divergence"]
LOSS_NAMES = tuple(__all__)


def _pair_setup(loss: str, names: tuple[str, str], a, b, axis: int, where):
    """Checks two same-shape float inputs, moves `axis` last and builds the kept mask.

    Returns (a, b) with the axis last and not yet upcast, the kept mask in the loss
    shape (or None) and the same mask with a trailing class axis.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    _checks.check_float(names[0], a)
    _checks.check_float(names[1], b)
    _checks.check_same_shape(names[0], a, names[1], b)
    _checks.check_rank(names[0], a, 1, at_least=True)
    axis = _checks.normalize_axis(axis, a.ndim)
    a, b = jnp.moveaxis(a, axis, -1), jnp.moveaxis(b, axis, -1)
    kept = kept_mask(a.shape[:-1], where=where)
    kept_c = None if kept is None else kept[..., None]
    return a, b, kept, kept_c


@jax.custom_jvp
def _kl_term(prob, log_t, log_q, pos):
    """`prob * (log_t - log_q)` where `pos`, exactly 0 elsewhere.

    Where `pos` is False the target probability `prob` is 0 and `log_q` may be -inf
    (0 log 0 = 0). The rule below differentiates `log_q` as the plain product does,
    `-prob * d log_q` with no mask (`prob` is already 0 there): the gradient with
    respect to the log-predictions is then one multiply per class, as for an
    unmasked KL, where differentiating the `where` would add selects on every class.
    """
    return jnp.where(pos, prob * (log_t - jnp.where(pos, log_q, 0.0)), 0.0)


@_kl_term.defjvp
def _kl_term_jvp(primals, tangents):
    prob, log_t, log_q, pos = primals
    d_prob, d_log_t, d_log_q, _ = tangents
    diff = log_t - jnp.where(pos, log_q, 0.0)
    value = jnp.where(pos, prob * diff, 0.0)
    return value, jnp.where(pos, d_prob * diff + prob * d_log_t, 0.0) - prob * d_log_q


def kl_divergence(
    log_predictions: jax.Array,
    targets: jax.Array,
    *,
    axis: int = -1,
    log_targets: bool = False,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence KL(targets || predictions) along `axis`.

    Distillation and matching a predicted distribution to a target one. Argument
    order and meaning follow `torch.nn.functional.kl_div(input, target)`: the model's
    log-probabilities first, the target distribution (probabilities, or
    log-probabilities with `log_targets=True`) second. Summing "none" over `axis`
    equals torch's "none"; our "mean" over `[batch, num_classes]` equals torch's
    "batchmean". `optax.losses.kl_divergence` is the same per distribution.

    Zero target probabilities contribute exactly 0 (0 log 0 = 0), with a finite
    gradient, even where `log_predictions` is -inf (torch gives NaN there). A negative
    target probability gives NaN for its distribution; targets are not required to sum
    to 1 (as torch). Checked mode asserts targets in [0, 1] (log-targets <= 0) and
    finite inputs, -inf allowed where the target probability is 0.

    .. math::
        \ell = \sum_k t_k \,(\log t_k - \log q_k)

    Args:
      log_predictions: float, `[..., num_classes, ...]`: log-probabilities `log q`,
        classes on `axis` (e.g. `jax.nn.log_softmax(logits)`).
      targets: float, the shape of `log_predictions`: probabilities `t`, or
        log-probabilities if `log_targets`.
      axis: the class axis; it is absent from the loss shape.
      log_targets: whether `targets` are log-probabilities (the stable choice for a
        softmax teacher; torch's `log_target`).
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": the loss shape (`log_predictions.shape` without `axis`); "sum", "mean":
      a scalar, "sum_and_weight" a pair of scalars.
      dtype `promote_types(log_predictions.dtype, float32)`.

    Example:
      >>> import jax, jax.numpy as jnp, lossjax
      >>> log_q = jax.nn.log_softmax(jnp.array([[1.0, 0.0], [0.0, 0.0]]))
      >>> lossjax.kl_divergence(log_q, jnp.array([[1.0, 0.0], [0.5, 0.5]]),
      ...                       reduction="none")
      Array([0.3133, 0.    ], dtype=float32)

    References:
      Kullback & Leibler, On Information and Sufficiency, 1951. Hinton et al.,
      Distilling the Knowledge in a Neural Network, 2015.

    See also: `kl_divergence_with_logits`, `js_divergence`, `cross_entropy`.
    """
    lp, t, kept, kept_c = _pair_setup(
        "kl_divergence", ("log_predictions", "targets"), log_predictions, targets,
        axis, where)
    name = "kl_divergence"
    if log_targets:
        _checks.assert_values(name, "targets (log_targets=True) must be <= 0.",
                              t <= 0, kept_c)
        target_zero = t == -jnp.inf
    else:
        _checks.assert_finite(name, "targets", t, kept_c)
        _checks.assert_unit_interval(name, "targets", t, kept_c)
        target_zero = t == 0
    _checks.assert_values(
        name, "log_predictions must be finite (-inf only where the target is 0).",
        jnp.isfinite(lp) | (target_zero & (lp == -jnp.inf)), kept_c)
    dtype = compute_dtype(lp, t)
    lp = sanitize(lp, kept, 0, axis=-1).astype(dtype)
    t = sanitize(t, kept, 0, axis=-1).astype(dtype)
    # Excluded entries were sanitized above; zero-probability classes of kept entries
    # are not (log_q may stay -inf): `_kl_term`'s custom JVP keeps them exact.
    # They take its constant 0 branch: their -inf logs (and the infinite slope of
    # t log t at 0) reach neither value nor gradient.
    if log_targets:
        pos = t != -jnp.inf
        term = _kl_term(jnp.exp(t), jnp.where(pos, t, 0.0), lp, pos)
    else:
        # A negative or NaN target gets a NaN log, so a NaN entry, with no select.
        pos = t != 0
        term = _kl_term(t, jnp.log(jnp.where(pos, t, 1.0)), lp, pos)
    return reduce_loss(jnp.sum(term, axis=-1), kept=kept, weights=weights,
                       reduction=reduction, axis_name=axis_name)


def kl_divergence_with_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""KL(p || q) between `p = softmax(logits_p)` and `q = softmax(logits_q)`.

    Distillation from a teacher's logits (`logits_p`) to a student's (`logits_q`),
    or any KL penalty between two categorical heads, without forming either softmax:
    both are taken in log space, so the loss and its gradients are finite for any
    finite logits. Equals `kl_divergence(log_softmax(logits_q), log_softmax(logits_p),
    log_targets=True)`, `optax.losses.kl_divergence_with_log_targets` on the two
    log-softmaxes, and torch's `kl_div(log_softmax(logits_q), log_softmax(logits_p),
    log_target=True)` (summed over the class axis).

    The names leave the naming table on purpose: both inputs are `logits`, and
    `_p` / `_q` say which side of KL(p || q) each is on, read in the order of the
    math. Mind that this order (reference first) is the reverse of `kl_divergence`'s,
    which follows torch's (model first).

    .. math::
        \ell = \sum_k p_k (\log p_k - \log q_k),\quad
        \log p = \mathrm{log\_softmax}(x_p),\ \log q = \mathrm{log\_softmax}(x_q)

    Args:
      logits_p: float, `[..., num_classes, ...]`: logits of the reference
        distribution p, classes on `axis`.
      logits_q: float, the shape of `logits_p`: logits of the approximating
        distribution q (the model).
      axis: the class axis; it is absent from the loss shape.
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": the loss shape (`logits_p.shape` without `axis`); "sum", "mean": a
      scalar, "sum_and_weight" a pair of scalars.
      dtype `promote_types(logits_p.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.kl_divergence_with_logits(jnp.array([10.0, 0.0]),
      ...                                   jnp.array([1.0, 0.0]))
      Array(0.3128, dtype=float32)

    References:
      Hinton et al., Distilling the Knowledge in a Neural Network, 2015.

    See also: `kl_divergence`, `js_divergence`, `cross_entropy`.
    """
    xp, xq, kept, kept_c = _pair_setup(
        "kl_divergence_with_logits", ("logits_p", "logits_q"), logits_p, logits_q,
        axis, where)
    _checks.assert_finite("kl_divergence_with_logits", "logits_p", xp, kept_c)
    _checks.assert_finite("kl_divergence_with_logits", "logits_q", xq, kept_c)
    dtype = compute_dtype(xp, xq)
    log_p = jax.nn.log_softmax(sanitize(xp, kept, 0, axis=-1).astype(dtype), axis=-1)
    log_q = jax.nn.log_softmax(sanitize(xq, kept, 0, axis=-1).astype(dtype), axis=-1)
    # exp(log_p) underflows to exactly 0 for hopeless classes, where the finite
    # difference of logs it multiplies keeps 0 * finite = 0.
    entry = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def js_divergence(
    logits_p: jax.Array,
    logits_q: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Jensen-Shannon divergence between `softmax(logits_p)` and `softmax(logits_q)`.

    A symmetric, bounded (by log 2) divergence: consistency regularization between
    two views or two models, and the objective behind the original GAN. In nats. No
    torch or optax counterpart. Computed in log space: the mixture's log is
    `logaddexp(log p, log q) - log 2`, so no softmax, division or log of a sum is
    formed and the loss and gradients stay finite for any finite logits.

    The names leave the naming table on purpose: both inputs are `logits`, the
    divergence is symmetric so neither is a target, and `_p` / `_q` are the
    distributions' names in the formula.

    .. math::
        \ell = \tfrac12 \sum_k p_k (\log p_k - \log m_k)
             + \tfrac12 \sum_k q_k (\log q_k - \log m_k),\quad m = \tfrac12 (p + q)

    Args:
      logits_p: float, `[..., num_classes, ...]`, classes on `axis`.
      logits_q: float, the shape of `logits_p`.
      axis: the class axis; it is absent from the loss shape.
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": the loss shape (`logits_p.shape` without `axis`), values in
      [0, log 2]; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(logits_p.dtype,
      float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.js_divergence(jnp.array([[0.0, 0.0], [30.0, 0.0]]),
      ...                       jnp.array([[0.0, 0.0], [0.0, 30.0]]),
      ...                       reduction="none")
      Array([0.    , 0.6931], dtype=float32)

    References:
      Lin, Divergence Measures Based on the Shannon Entropy, 1991.

    See also: `kl_divergence_with_logits`, `kl_divergence`.
    """
    xp, xq, kept, kept_c = _pair_setup(
        "js_divergence", ("logits_p", "logits_q"), logits_p, logits_q, axis, where)
    _checks.assert_finite("js_divergence", "logits_p", xp, kept_c)
    _checks.assert_finite("js_divergence", "logits_q", xq, kept_c)
    dtype = compute_dtype(xp, xq)
    log_p = jax.nn.log_softmax(sanitize(xp, kept, 0, axis=-1).astype(dtype), axis=-1)
    log_q = jax.nn.log_softmax(sanitize(xq, kept, 0, axis=-1).astype(dtype), axis=-1)
    log_m = jnp.logaddexp(log_p, log_q) - math.log(2.0)
    entry = 0.5 * jnp.sum(
        jnp.exp(log_p) * (log_p - log_m) + jnp.exp(log_q) * (log_q - log_m), axis=-1)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)
