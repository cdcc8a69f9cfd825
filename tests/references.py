"""Float64 NumPy references, written from the formulas and independent of jax.nn.

Each family keeps its references in its own section below. Every function takes and
returns NumPy arrays and computes the per-entry loss (reduction "none", unweighted)
unless its docstring says otherwise; `reduce` applies the contract's reductions.
"""

from __future__ import annotations

import numpy as np


def reduce(loss, *, kept=None, weights=None, reduction="mean", normalizer=None):
    """The contract's reductions, written out plainly in float64."""
    loss = np.asarray(loss, np.float64)
    kept = np.ones(loss.shape, bool) if kept is None else np.broadcast_to(kept, loss.shape)
    w = np.ones(loss.shape) if weights is None else np.broadcast_to(weights, loss.shape)
    n = w if normalizer is None else np.broadcast_to(normalizer, loss.shape)
    out = np.where(kept, w * np.where(kept, loss, 0.0), 0.0)
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    denom = np.where(kept, n, 0.0).sum()
    return out.sum() / denom if denom != 0 else 0.0


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


# --- classification -------------------------------------------------------------------


def _cls_label_weight(labels, class_weights):
    if class_weights is None:
        return np.ones(np.shape(labels))
    return np.asarray(class_weights, np.float64)[labels]


def cross_entropy(logits, labels, *, label_smoothing=0.0, class_weights=None):
    """Integer labels, classes last: (1-e) w_y (-log p_y) + e/K sum_k w_k (-log p_k)."""
    nlp = -log_softmax(logits)
    k = nlp.shape[-1]
    w = np.ones(k) if class_weights is None else np.asarray(class_weights, np.float64)
    picked = np.take_along_axis(nlp, np.asarray(labels)[..., None], -1)[..., 0]
    return ((1 - label_smoothing) * w[labels] * picked
            + label_smoothing / k * (nlp * w).sum(-1))


def cross_entropy_soft(logits, targets, *, label_smoothing=0.0, class_weights=None):
    """Float targets, classes last: -sum_k w_k t~_k log p_k."""
    t = np.asarray(targets, np.float64)
    k = t.shape[-1]
    t = (1 - label_smoothing) * t + label_smoothing / k
    w = np.ones(k) if class_weights is None else np.asarray(class_weights, np.float64)
    return -(w * t * log_softmax(logits)).sum(-1)


def _cls_log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))


def binary_cross_entropy(logits, targets, *, pos_weight=None, label_smoothing=0.0):
    t = np.asarray(targets, np.float64) * (1 - label_smoothing) + label_smoothing / 2
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
    x = np.asarray(logits, np.float64)
    return -(pw * t * _cls_log_sigmoid(x) + (1 - t) * _cls_log_sigmoid(-x))


def sigmoid_focal_loss(logits, targets, *, alpha=None, gamma=2.0):
    """Lin et al.: alpha_t (1 - p_t)^gamma BCE, p_t = p t + (1 - p)(1 - t)."""
    x = np.asarray(logits, np.float64)
    t = np.asarray(targets, np.float64)
    p = 1 / (1 + np.exp(-x))
    p_t = p * t + (1 - p) * (1 - t)
    loss = binary_cross_entropy(x, t) * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def focal_loss(logits, labels, *, gamma=2.0, class_weights=None):
    """Softmax focal loss, classes last: -w_y (1 - p_y)^gamma log p_y."""
    lp = np.take_along_axis(log_softmax(logits), np.asarray(labels)[..., None], -1)[
        ..., 0]
    return -_cls_label_weight(labels, class_weights) * (1 - np.exp(lp)) ** gamma * lp


def poly1_cross_entropy(logits, labels, *, epsilon=1.0, class_weights=None):
    """w_y [-log p_y + epsilon (1 - p_y)], classes last."""
    lp = np.take_along_axis(log_softmax(logits), np.asarray(labels)[..., None], -1)[
        ..., 0]
    w = _cls_label_weight(labels, class_weights)
    return w * (-lp + epsilon * (1 - np.exp(lp)))


def nll_loss(log_predictions, labels, *, class_weights=None):
    """-w_y log_predictions[y], classes last."""
    lp = np.asarray(log_predictions, np.float64)
    picked = np.take_along_axis(lp, np.asarray(labels)[..., None], -1)[..., 0]
    return -_cls_label_weight(labels, class_weights) * picked


def hinge_loss(scores, targets, *, margin=1.0, squared=False):
    h = np.maximum(0.0, margin - np.asarray(targets, np.float64) * scores)
    return h**2 if squared else h


def soft_margin_loss(scores, targets):
    z = -np.asarray(targets, np.float64) * np.asarray(scores, np.float64)
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def multiclass_hinge_loss(scores, labels, *, margin=1.0, p=1, class_weights=None):
    """w_y / K sum_{j != y} max(0, margin - s_y + s_j)^p, classes last, by loops."""
    s = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    k = s.shape[-1]
    flat_s, flat_y = s.reshape(-1, k), labels.reshape(-1)
    w = _cls_label_weight(flat_y, class_weights)
    out = np.zeros(len(flat_y))
    for i, y in enumerate(flat_y):
        for j in range(k):
            if j != y:
                out[i] += max(0.0, margin - flat_s[i, y] + flat_s[i, j]) ** p
        out[i] *= w[i] / k
    return out.reshape(labels.shape)


# --- regression -----------------------------------------------------------------------


# --- divergence -----------------------------------------------------------------------
