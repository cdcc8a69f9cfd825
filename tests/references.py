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
    kept = (np.ones(loss.shape, bool) if kept is None
            else np.broadcast_to(kept, loss.shape))
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


def _f64(*arrays):
    return tuple(np.asarray(a, np.float64) for a in arrays)


def squared_error(p, t):
    p, t = _f64(p, t)
    return (p - t) ** 2


def absolute_error(p, t):
    p, t = _f64(p, t)
    return np.abs(p - t)


def huber_loss(p, t, delta=1.0):
    p, t = _f64(p, t)
    a = np.abs(p - t)
    return np.where(a < delta, 0.5 * a * a, delta * a - 0.5 * delta * delta)


def smooth_l1_loss(p, t, beta=1.0):
    p, t = _f64(p, t)
    a = np.abs(p - t)
    if beta == 0:
        return a
    return np.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def log_cosh(p, t):
    """log(cosh(p - t)) taken literally: use only moderate |p - t| (< 700)."""
    p, t = _f64(p, t)
    return np.log(np.cosh(p - t))


def poisson_nll(p, t, log_input=True, full=False, eps=1e-8):
    p, t = _f64(p, t)
    if log_input:
        loss = np.exp(p) - t * p
    else:
        loss = p - t * np.log(p + eps)
    if full:
        # Stirling's approximation of log(t!), counted only for t > 1 (torch's rule).
        ts = np.where(t > 1, t, 2.0)
        stirling = ts * np.log(ts) - ts + 0.5 * np.log(2 * np.pi * ts)
        loss = loss + np.where(t > 1, stirling, 0.0)
    return loss


def gaussian_nll(p, t, var, full=False, eps=1e-6):
    """`var` must already broadcast to p's shape by NumPy rules."""
    p, t, var = _f64(p, t, var)
    v = np.maximum(var, eps)
    loss = 0.5 * (np.log(v) + (p - t) ** 2 / v)
    if full:
        loss = loss + 0.5 * np.log(2 * np.pi)
    return np.broadcast_to(loss, np.broadcast_shapes(p.shape, v.shape))


def quantile_loss(p, t, quantile=0.5):
    p, t = _f64(p, t)
    r = t - p
    return np.where(r >= 0, quantile * r, (quantile - 1.0) * r)


def mean_absolute_percentage_error(p, t, eps=1e-7):
    p, t = _f64(p, t)
    return 100.0 * np.abs(t - p) / np.maximum(np.abs(t), eps)


def squared_log_error(p, t):
    p, t = _f64(p, t)
    return (np.log(1.0 + np.maximum(p, 0.0)) - np.log(1.0 + np.maximum(t, 0.0))) ** 2


def cosine_similarity_loss(p, t, axis=-1, eps=1e-8):
    p, t = _f64(p, t)
    norm_p = np.maximum(np.sqrt((p * p).sum(axis)), eps)
    norm_t = np.maximum(np.sqrt((t * t).sum(axis)), eps)
    return 1.0 - (p * t).sum(axis) / (norm_p * norm_t)


# --- divergence -----------------------------------------------------------------------


def _plogp_over_q(p, q):
    """p * log(p / q) with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / q), 0.0)


def kl_divergence(log_q, t, axis=-1, log_targets=False):
    log_q, t = np.asarray(log_q, np.float64), np.asarray(t, np.float64)
    p = np.exp(t) if log_targets else t
    return _plogp_over_q(p, np.exp(log_q)).sum(axis)


def kl_divergence_with_logits(logits_p, logits_q, axis=-1):
    p = np.exp(log_softmax(logits_p, axis))
    q = np.exp(log_softmax(logits_q, axis))
    return _plogp_over_q(p, q).sum(axis)


def js_divergence(logits_p, logits_q, axis=-1):
    p = np.exp(log_softmax(logits_p, axis))
    q = np.exp(log_softmax(logits_q, axis))
    m = 0.5 * (p + q)
    return 0.5 * (_plogp_over_q(p, m) + _plogp_over_q(q, m)).sum(axis)


# --- sequence -------------------------------------------------------------------------


def ctc_collapse(path, blank):
    """The label sequence of a frame-level path: merge repeats, then drop blanks."""
    out, prev = [], None
    for c in path:
        if c != prev and c != blank:
            out.append(int(c))
        prev = c
    return tuple(out)


def ctc_labeling_probs(logits, blank):
    """{labeling: p(labeling | x)} for one sequence `[T, K]`, enumerating all K**T
    paths (tiny T and K only)."""
    import itertools

    logp = log_softmax(logits)
    num_t, num_classes = logp.shape
    probs = {}
    for path in itertools.product(range(num_classes), repeat=num_t):
        lp = sum(logp[t, c] for t, c in enumerate(path))
        key = ctc_collapse(path, blank)
        probs[key] = probs.get(key, 0.0) + np.exp(lp)
    return probs


def ctc_brute_force(logits, labels, blank=0):
    """CTC negative log-likelihood of one sequence `[T, K]` by enumerating all
    alignments (inf when none exists)."""
    p = ctc_labeling_probs(logits, blank).get(tuple(int(c) for c in labels), 0.0)
    with np.errstate(divide="ignore"):
        return -np.log(p)


def ctc_nll_and_grad(logits, labels, blank=0):
    """CTC loss of one sequence `[T, K]` and its gradient w.r.t. the logits, in float64
    by the log-space forward-backward recursions over the blank-extended labels."""
    logp = log_softmax(logits)
    num_t = logp.shape[0]
    ext = [blank]
    for c in labels:
        ext += [int(c), blank]
    num_s = len(ext)
    log_a = np.full((num_t, num_s), -np.inf)
    log_b = np.full((num_t, num_s), -np.inf)  # includes the emission at t

    def allowed_from(s):  # states that may precede s
        prev = [s, s - 1]
        if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
            prev.append(s - 2)
        return [p for p in prev if p >= 0]

    log_a[0, 0] = logp[0, ext[0]]
    if num_s > 1:
        log_a[0, 1] = logp[0, ext[1]]
    for t in range(1, num_t):
        for s in range(num_s):
            log_a[t, s] = np.logaddexp.reduce(
                [log_a[t - 1, p] for p in allowed_from(s)]) + logp[t, ext[s]]
    finals = [num_s - 1] + ([num_s - 2] if num_s > 1 else [])
    for s in finals:
        log_b[num_t - 1, s] = logp[num_t - 1, ext[s]]
    for t in range(num_t - 2, -1, -1):
        for s in range(num_s):
            nxt = [n for n in (s, s + 1, s + 2) if n < num_s and s in allowed_from(n)]
            if nxt:
                log_b[t, s] = np.logaddexp.reduce(
                    [log_b[t + 1, n] for n in nxt]) + logp[t, ext[s]]
    log_z = np.logaddexp.reduce([log_a[num_t - 1, s] for s in finals])
    # alpha * beta counts the emission at t twice: divide it out once.
    occ_state = np.exp(log_a + log_b - logp[:, ext] - log_z)
    occ = np.zeros_like(logp)
    for s, c in enumerate(ext):
        occ[:, c] += occ_state[:, s]
    return -log_z, np.exp(logp) - occ


# --- large_vocab ----------------------------------------------------------------------


def linear_cross_entropy(hidden, kernel, labels, bias=None):
    """Per-token -log softmax(hidden @ kernel + bias)[label], float64, plain loops."""
    hidden = np.asarray(hidden, np.float64).reshape(-1, np.shape(hidden)[-1])
    kernel = np.asarray(kernel, np.float64)
    shape = np.shape(labels)
    labels = np.asarray(labels).reshape(-1)
    out = np.empty(len(labels))
    for n, (h, y) in enumerate(zip(hidden, labels, strict=True)):
        z = h @ kernel + (0.0 if bias is None else np.asarray(bias, np.float64))
        m = z.max()
        out[n] = m + np.log(np.sum(np.exp(z - m))) - z[y]
    return out.reshape(shape)


def linear_cross_entropy_options(hidden, kernel, labels, *, bias=None,
                                 class_weights=None, label_smoothing=0.0, z_loss=0.0,
                                 logit_softcap=None):
    """Per-token loss of `linear_cross_entropy` with its options, and the per-token
    weight that "mean" divides by (`class_weights[label]`, 1 without), float64.

    x = s tanh((h W + b) / s) (no cap: h W + b); loss = (1 - e) w_y (lse - x_y)
    + e / V sum_k w_k (lse - x_k) + z_loss lse^2 (torch's class-weighted smoothing).
    A label outside [0, V) (ignored entries included) gives NaN: mask it in `reduce`.
    """
    hidden = np.asarray(hidden, np.float64).reshape(-1, np.shape(hidden)[-1])
    kernel = np.asarray(kernel, np.float64)
    vocab = kernel.shape[1]
    w = (np.ones(vocab) if class_weights is None
         else np.asarray(class_weights, np.float64))
    shape = np.shape(labels)
    labels = np.asarray(labels).reshape(-1)
    loss, norm = np.full(len(labels), np.nan), np.zeros(len(labels))
    for n, (h, y) in enumerate(zip(hidden, labels, strict=True)):
        x = h @ kernel + (0.0 if bias is None else np.asarray(bias, np.float64))
        if logit_softcap is not None:
            x = logit_softcap * np.tanh(x / logit_softcap)
        m = x.max()
        lse = m + np.log(np.sum(np.exp(x - m)))
        if not 0 <= y < vocab:
            continue
        smooth = np.sum(w * (lse - x)) / vocab
        loss[n] = ((1 - label_smoothing) * w[y] * (lse - x[y])
                   + label_smoothing * smooth + z_loss * lse**2)
        norm[n] = w[y]
    return loss.reshape(shape), norm.reshape(shape)
