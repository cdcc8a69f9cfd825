"""The pairwise and multi-label margin losses of `torch.nn.functional`.

Each equals its torch namesake for every reduction: `triplet_margin_loss`,
`cosine_embedding_loss`, `margin_ranking_loss`, `hinge_embedding_loss`,
`multilabel_margin_loss` and `multilabel_soft_margin_loss`, under the lossjax
contract (`where`, `weights`, `reduction`, `axis_name`, traced margins).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
    "cosine_embedding_loss",
    "hinge_embedding_loss",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "triplet_margin_loss",
]

LOSS_NAMES = tuple(__all__)


def _p_norm(x, p):
    """||x||_p over the last axis, with a zero gradient (not NaN) at x == 0."""
    a = jnp.abs(x)
    total = jnp.sum(a * a if p == 2 else a**p, axis=-1)
    nonzero = total > 0
    safe = jnp.where(nonzero, total, 1)
    return jnp.where(nonzero, jnp.sqrt(safe) if p == 2 else safe ** (1 / p), 0)


def _vectors_setup(loss, arrays, names, where):
    """Rows-of-vectors losses: loss shape = `shape[:-1]`."""
    for name, a in zip(names, arrays, strict=True):
        _checks.check_float(name, a)
        _checks.check_rank(name, a, 1, at_least=True)
    for name, a in zip(names[1:], arrays[1:], strict=True):
        _checks.check_same_shape(names[0], arrays[0], name, a)
    dtype = compute_dtype(*arrays)
    shape = jnp.shape(arrays[0])[:-1]
    kept = kept_mask(shape, where=where)
    row = None if kept is None else kept[..., None]
    out = []
    for name, a in zip(names, arrays, strict=True):
        _checks.assert_finite(loss, name, a, row)
        out.append(sanitize(a, kept, 0, axis=-1).astype(dtype))
    return out, kept


def triplet_margin_loss(
    anchor: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    margin=1.0,
    p: float = 2.0,
    eps: float = 1e-6,
    swap: bool = False,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Triplet margin loss with torch's semantics.

    For metric learning on given (anchor, positive, negative) triplets. As
    `torch.nn.functional.triplet_margin_loss`: d(x, y) = ||x - y + eps||_p (the eps
    inside the norm, as torch's `pairwise_distance`), `swap` uses
    min(d(a, n), d(p, n)) (Balntas et al. 2016). optax's `triplet_margin_loss` omits
    the absolute value (wrong for odd p) and has no swap. The argument names are
    torch's.

    .. math::
        \ell = \max\big(0, d(a, p) - d(a, n) + m\big)

    Args:
      anchor, positive, negative: float `[..., dim]`, one shape.
      margin: m; may be a traced scalar.
      p: the norm's order, > 0.
      eps: added to each difference before the norm, >= 0.
      swap: the distance swap.
      where: bool, broadcastable to `anchor.shape[:-1]`.
      weights: float, broadcastable to `anchor.shape[:-1]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis for "sum" / "mean" over the global batch.

    Returns:
      "none": `anchor.shape[:-1]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> a = jnp.array([[0.0, 0.0]])
      >>> lossjax.triplet_margin_loss(a, a + 1.0, a + 2.0, margin=2.0, eps=0.0,
      ...                             reduction="none")
      Array([0.5857864], dtype=float32)

    See also: `lossjax.batch_triplet_loss` (in-batch mining).
    """
    _checks.check_range("p", p, low=0, low_open=True)
    _checks.check_range("eps", eps, low=0)
    (a, pos, neg), kept = _vectors_setup(
        "triplet_margin_loss", (anchor, positive, negative),
        ("anchor", "positive", "negative"), where)
    e = hyperparameter(eps, a.dtype)
    d_ap = _p_norm(a - pos + e, p)
    d_an = _p_norm(a - neg + e, p)
    if swap:
        d_an = jnp.minimum(d_an, _p_norm(pos - neg + e, p))
    entry = jax.nn.relu(d_ap - d_an + hyperparameter(margin, a.dtype))
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def _sign_targets(loss, targets, shape, kept):
    _checks.check_float("targets", targets)
    _checks.check_shape("targets", targets, shape, against="the loss shape")
    _checks.assert_values(loss, "targets must be -1 or +1.",
                          (targets == 1) | (targets == -1), kept)
    return sanitize(targets, kept, 1)


def cosine_embedding_loss(
    x1: jax.Array,
    x2: jax.Array,
    targets: jax.Array,
    *,
    margin=0.0,
    eps: float = 1e-8,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Cosine embedding loss: pull +1 pairs together, push -1 pairs below `margin`.

    As `torch.nn.functional.cosine_embedding_loss`, cos = x1.x2 /
    sqrt((|x1|^2 + eps)(|x2|^2 + eps)); torch hard-codes eps = 1e-12, here it is an
    option (default 1e-8; pass 1e-12 for torch's exact numbers). `x1`, `x2` are
    torch's names.

    .. math::
        \ell = 1 - \cos(x_1, x_2) \;(t = 1), \qquad
        \max(0, \cos(x_1, x_2) - m) \;(t = -1)

    Args:
      x1, x2: float `[..., dim]`, one shape.
      targets: float in {-1, +1}, `x1.shape[:-1]`.
      margin: m in [-1, 1]; may be a traced scalar.
      eps: >= 0, added to each squared norm.
      where, weights: broadcastable to `x1.shape[:-1]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis for "sum" / "mean" over the global batch.

    Returns:
      "none": `x1.shape[:-1]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> x = jnp.array([[1.0, 0.0], [1.0, 0.0]])
      >>> y = jnp.array([[0.0, 1.0], [1.0, 1.0]])
      >>> lossjax.cosine_embedding_loss(x, y, jnp.array([1.0, -1.0]),
      ...                               reduction="none")
      Array([1.        , 0.70710677], dtype=float32)
    """
    _checks.check_range("margin", margin, low=-1, high=1)
    _checks.check_range("eps", eps, low=0)
    (a, b), kept = _vectors_setup("cosine_embedding_loss", (x1, x2), ("x1", "x2"),
                                  where)
    t = _sign_targets("cosine_embedding_loss", targets, a.shape[:-1], kept)
    t = t.astype(a.dtype)
    e = hyperparameter(eps, a.dtype)
    # eps keeps the rsqrt finite for a zero vector (and its gradient with it).
    cos = jnp.sum(a * b, -1) * jax.lax.rsqrt(
        (jnp.sum(a * a, -1) + e) * (jnp.sum(b * b, -1) + e))
    m = hyperparameter(margin, a.dtype)
    entry = (jnp.where(t == 1, 1 - cos, 0)
             + jnp.where(t == -1, jax.nn.relu(cos - m), 0))
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def _elementwise(loss, arrays, names, where):
    for name, a in zip(names, arrays, strict=True):
        _checks.check_float(name, a)
    for name, a in zip(names[1:], arrays[1:], strict=True):
        _checks.check_same_shape(names[0], arrays[0], name, a)
    dtype = compute_dtype(*arrays)
    kept = kept_mask(jnp.shape(arrays[0]), where=where)
    for name, a in zip(names[:-1], arrays[:-1], strict=True):
        _checks.assert_finite(loss, name, a, kept)
    _checks.assert_values(loss, "targets must be -1 or +1.",
                          (arrays[-1] == 1) | (arrays[-1] == -1), kept)
    out = [sanitize(a, kept, 0).astype(dtype) for a in arrays[:-1]]
    out.append(sanitize(arrays[-1], kept, 1).astype(dtype))
    return out, kept


def margin_ranking_loss(
    scores_1: jax.Array,
    scores_2: jax.Array,
    targets: jax.Array,
    *,
    margin=0.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Margin ranking loss: target +1 wants scores_1 above scores_2 by `margin`.

    As `torch.nn.functional.margin_ranking_loss`; elementwise.

    .. math::
        \ell = \max\big(0, -t (s_1 - s_2) + m\big)

    Args:
      scores_1, scores_2: float, one shape `[...]`.
      targets: float in {-1, +1}, the same shape.
      margin: m; may be a traced scalar.
      where, weights: broadcastable to `scores_1.shape`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis for "sum" / "mean" over the global batch.

    Returns:
      "none": `scores_1.shape`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.margin_ranking_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...                             jnp.array([1.0, 1.0]), margin=0.5,
      ...                             reduction="none")
      Array([0. , 1.5], dtype=float32)
    """
    (s1, s2, t), kept = _elementwise("margin_ranking_loss",
                                     (scores_1, scores_2, targets),
                                     ("scores_1", "scores_2", "targets"), where)
    entry = jax.nn.relu(-t * (s1 - s2) + hyperparameter(margin, s1.dtype))
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def hinge_embedding_loss(
    scores: jax.Array,
    targets: jax.Array,
    *,
    margin=1.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Hinge embedding loss: x for t = +1, max(0, margin - x) for t = -1.

    As `torch.nn.functional.hinge_embedding_loss` (x is usually a distance);
    elementwise.

    .. math::
        \ell = x \;(t = 1), \qquad \max(0, m - x) \;(t = -1)

    Args:
      scores: float `[...]`.
      targets: float in {-1, +1}, the same shape.
      margin: m; may be a traced scalar.
      where, weights: broadcastable to `scores.shape`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis for "sum" / "mean" over the global batch.

    Returns:
      "none": `scores.shape`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.hinge_embedding_loss(jnp.array([0.3, 0.3]), jnp.array([1.0, -1.0]),
      ...                              reduction="none")
      Array([0.3, 0.7], dtype=float32)
    """
    (x, t), kept = _elementwise("hinge_embedding_loss", (scores, targets),
                                ("scores", "targets"), where)
    m = hyperparameter(margin, x.dtype)
    # torch's two wheres: a target that is neither +1 nor -1 gets both terms.
    entry = (jnp.where(t != 1, jax.nn.relu(m - x), 0) + jnp.where(t != -1, x, 0))
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def _rows_setup(loss, scores, name, where):
    _checks.check_float(name, scores)
    _checks.check_rank(name, scores, 1, at_least=True)
    kept = kept_mask(jnp.shape(scores)[:-1], where=where)
    row = None if kept is None else kept[..., None]
    _checks.assert_finite(loss, name, scores, row)
    return sanitize(scores, kept, 0, axis=-1).astype(compute_dtype(scores)), kept


def multilabel_margin_loss(
    scores: jax.Array,
    labels: jax.Array,
    *,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Multi-label hinge loss: every target class above every other class by 1.

    As `torch.nn.functional.multilabel_margin_loss`: `labels` lists each row's
    target classes, the list ending at the first -1; the sum over (target j,
    non-target i) pairs is divided by the number of classes. A row with no target
    is 0 and counts in "mean", as in torch. An out-of-range label before the first
    -1 makes its row NaN (checked mode names it).

    .. math::
        \ell = \frac{1}{C}\sum_{j \in y}\sum_{i \notin y}\max(0, 1 - (x_{y_j} - x_i))

    Args:
      scores: float `[..., num_classes]`.
      labels: int, the same shape; class ids, then -1 (then anything).
      where, weights: broadcastable to `scores.shape[:-1]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis for "sum" / "mean" over the global batch.

    Returns:
      "none": `scores.shape[:-1]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> x = jnp.array([[0.1, 0.2, 0.4, 0.8]])
      >>> lossjax.multilabel_margin_loss(x, jnp.array([[3, 0, -1, 1]]),
      ...                                reduction="none")
      Array([0.85], dtype=float32)
    """
    x, kept = _rows_setup("multilabel_margin_loss", scores, "scores", where)
    _checks.check_int("labels", labels)
    _checks.check_same_shape("scores", scores, "labels", labels)
    num_classes = x.shape[-1]
    listed = jnp.cumprod(labels != -1, axis=-1).astype(bool)
    in_range = (labels >= 0) & (labels < num_classes)
    bad = jnp.any(listed & ~in_range, axis=-1)
    _checks.assert_values(
        "multilabel_margin_loss",
        f"labels must lie in [0, {num_classes}) before each row's first -1.",
        ~bad, kept)
    listed = listed & in_range
    safe = jnp.where(listed, labels, 0)
    is_target = jnp.any(
        listed[..., :, None] & (safe[..., :, None] == jnp.arange(num_classes)), -2)
    x_target = jnp.take_along_axis(x, safe, axis=-1)
    hinge = jax.nn.relu(1 - x_target[..., :, None] + x[..., None, :])
    pairs = listed[..., :, None] & ~is_target[..., None, :]
    entry = jnp.sum(jnp.where(pairs, hinge, 0), axis=(-2, -1)) / num_classes
    entry = jnp.where(bad, jnp.nan, entry)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def multilabel_soft_margin_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    class_weights: jax.Array | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Multi-label one-vs-all logistic loss, averaged over the classes per row.

    As `torch.nn.functional.multilabel_soft_margin_loss`: binary cross-entropy per
    class, class weights inside the entry, the mean over classes, loss shape
    `[batch]`; the class weights do not enter the "mean" denominator (as torch).

    .. math::
        \ell = -\frac{1}{C}\sum_c w_c\big(y_c\log\sigma(x_c)
          + (1 - y_c)\log\sigma(-x_c)\big)

    Args:
      logits: float `[..., num_classes]`.
      targets: float in [0, 1], the same shape.
      class_weights: float `[num_classes]` or None.
      where, weights: broadcastable to `logits.shape[:-1]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis for "sum" / "mean" over the global batch.

    Returns:
      "none": `logits.shape[:-1]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.multilabel_soft_margin_loss(jnp.zeros((1, 2)),
      ...                                     jnp.array([[1.0, 0.0]]),
      ...                                     reduction="none")
      Array([0.6931472], dtype=float32)
    """
    x, kept = _rows_setup("multilabel_soft_margin_loss", logits, "logits", where)
    _checks.check_float("targets", targets)
    _checks.check_same_shape("logits", logits, "targets", targets)
    row = None if kept is None else kept[..., None]
    _checks.assert_unit_interval("multilabel_soft_margin_loss", "targets", targets,
                                 row)
    t = sanitize(targets, kept, 0, axis=-1).astype(x.dtype)
    # log_sigmoid in both terms: finite at any |logit|.
    term = -(t * jax.nn.log_sigmoid(x) + (1 - t) * jax.nn.log_sigmoid(-x))
    if class_weights is not None:
        _checks.check_float("class_weights", class_weights)
        _checks.check_shape("class_weights", class_weights, x.shape[-1:],
                            against="the logits' class axis")
        term = term * class_weights.astype(x.dtype)
    entry = jnp.mean(term, axis=-1)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)
