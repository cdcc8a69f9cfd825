"""Contrastive and metric-learning losses, with exact cross-device negatives.

Every loss here scores the local rows of a batch (the anchors) against candidates drawn
from the whole batch. With `axis_name` the batch is sharded over that mesh / pmap axis
and the candidates are the *global* batch: they are gathered with `lax.all_gather`,
whose transpose (a reduce-scatter) carries each candidate's gradient back to the device
that owns it, and the positive of local row i is global column `axis_index * b + i`.
Value and gradients (both towers, a traced temperature) then equal the single-device
loss on the concatenated batch, under `shard_map` and `pmap` alike; "none" returns each
device's entries of the global loss. `where=False` removes a pair both as an anchor and
as a candidate (padding). `sigmoid_contrastive_loss` instead passes the texts around a
ring (`ppermute` inside a `lax.scan`) under a `custom_vjp` that runs the ring again in
the backward, so its per-device memory does not grow with the number of devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lossjax import _checks
from lossjax._reduce import (
    AxisName,
    compute_dtype,
    hyperparameter,
    kept_mask,
    reduce_loss,
    sanitize,
    varying_axes,
)

__all__ = [
    "batch_triplet_loss",
    "circle_loss",
    "clip_loss",
    "info_nce",
    "ntxent",
    "sigmoid_contrastive_loss",
    "supervised_contrastive_loss",
]

LOSS_NAMES = tuple(__all__)


# --- shared pieces ------------------------------------------------------------------


def _gather(x, axis_name: AxisName):
    """The global batch of `x` (concatenated in device order), gradient to owners."""
    if axis_name is None or x is None:
        return x
    return lax.all_gather(x, axis_name, axis=0, tiled=True)


def _offset(batch: int, axis_name: AxisName):
    """The global index of this device's first row."""
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name) * batch


def _vary_like(tree, like):
    """Makes every array in `tree` vary over the shard_map axes that `like` varies
    over (a no-op outside shard_map). Loop carries created from constants and
    replicated hyperparameters must vary like the data they meet inside the ring's
    scan and custom_vjp; the transpose of each cast (a psum) is JAX's job."""
    axes = frozenset().union(*(varying_axes(a) for a in jax.tree.leaves(like)))
    if not axes:
        return tree

    def cast(a):
        missing = tuple(sorted(axes - varying_axes(a)))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def _masked_logsumexp(x, mask, axis=-1):
    """logsumexp of `x` over the True entries of `mask` (None: all).

    A row with no True entry gives 0 with a zero gradient (never -inf or NaN): the
    masked entries enter as exp(-inf) = 0 and the shift is finite.
    """
    if mask is None:
        return jax.nn.logsumexp(x, axis=axis)
    xm = jnp.where(mask, x, jnp.asarray(-jnp.inf, x.dtype))
    shift = lax.stop_gradient(jnp.max(xm, axis=axis, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0)
    total = jnp.sum(jnp.exp(xm - shift), axis=axis)
    has = jnp.any(mask, axis=axis)
    lse = jnp.log(jnp.where(has, total, 1)) + jnp.squeeze(shift, axis)
    return jnp.where(has, lse, 0)


def _normalize(x, eps=1e-12):
    """x / max(||x||, eps) along the last axis, as torch's F.normalize; a zero row
    stays zero with a zero gradient (rsqrt never sees 0)."""
    return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def _check_temperature(temperature):
    _checks.check_range("temperature", temperature, low=0, low_open=True)


def _two_tower_setup(loss, x, y, where, names):
    """Checks, kept mask, value checks, sanitized compute-dtype towers."""
    nx, ny = names
    for name, a in ((nx, x), (ny, y)):
        _checks.check_float(name, a)
        _checks.check_rank(name, a, 2)
    _checks.check_same_shape(nx, x, ny, y)
    dtype = compute_dtype(x, y)
    kept = kept_mask((x.shape[0],), where=where)
    row = None if kept is None else kept[:, None]
    _checks.assert_finite(loss, nx, x, row)
    _checks.assert_finite(loss, ny, y, row)
    x = sanitize(x, kept, 0, axis=1).astype(dtype)
    y = sanitize(y, kept, 0, axis=1).astype(dtype)
    return x, y, kept


def _labelled_setup(loss, embeddings, labels, where):
    _checks.check_float("embeddings", embeddings)
    _checks.check_rank("embeddings", embeddings, 2)
    _checks.check_int("labels", labels)
    _checks.check_shape("labels", labels, embeddings.shape[:1],
                        against="embeddings' batch")
    dtype = compute_dtype(embeddings)
    kept = kept_mask((embeddings.shape[0],), where=where)
    row = None if kept is None else kept[:, None]
    _checks.assert_finite(loss, "embeddings", embeddings, row)
    e = sanitize(embeddings, kept, 0, axis=1).astype(dtype)
    return e, labels, kept


def _pair_masks(labels, kept, axis_name):
    """(positive, negative) candidate masks [b, N] of the local anchors against the
    global batch: same / different label, the anchor itself and dropped candidates
    excluded."""
    b = labels.shape[0]
    all_labels = _gather(labels, axis_name)
    n = all_labels.shape[0]
    col = jnp.arange(n)[None, :]
    me = (_offset(b, axis_name) + jnp.arange(b))[:, None]
    cand = col != me
    if kept is not None:
        cand = cand & _gather(kept, axis_name)[None, :]
    same = labels[:, None] == all_labels[None, :]
    return same & cand, ~same & cand


def _one_direction(q, k, k_all, k_kept, inv_t):
    """InfoNCE of local rows `q` against the global `k_all` whose positive is `k`."""
    logits = (q @ k_all.T) * inv_t
    mask = None if k_kept is None else jnp.broadcast_to(k_kept[None, :], logits.shape)
    positive = jnp.sum(q * k, axis=-1) * inv_t  # = logits[i, offset + i]
    return _masked_logsumexp(logits, mask) - positive


# --- CLIP / InfoNCE -----------------------------------------------------------------


def clip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    *,
    temperature=0.07,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Symmetric InfoNCE (CLIP): each image picks its text and each text its image.

    For paired two-tower training (image/text, two views). Embeddings are used as
    given (normalize in the model, as open_clip and big_vision do); logits =
    a @ b.T / temperature. Entry i is the mean of its image-to-text and
    text-to-image cross-entropies, so "mean" is open_clip's ClipLoss.

    .. math::
        \ell_i = \tfrac12\Big(\log\sum_j e^{a_i\cdot b_j/\tau} - a_i\cdot b_i/\tau\Big)
          + \tfrac12\Big(\log\sum_j e^{b_i\cdot a_j/\tau} - a_i\cdot b_i/\tau\Big)

    Args:
      image_embeddings: float `[batch, dim]`.
      text_embeddings: float `[batch, dim]`, row i the positive of image i.
      temperature: tau > 0; may be a traced (learnable) scalar.
      where: bool `[batch]`; a False pair is neither a row nor a column (padding).
      weights: float, broadcastable to `[batch]`.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      axis_name: the batch axis (or tuple). Local rows are scored against the
        gathered global batch (the gather carries gradient back to the owners);
        value and gradients equal the single-device loss on the global batch;
        "none" gives this device's entries of the global loss.

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar; "sum_and_weight": a pair.
      dtype `promote_types(image_embeddings.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> x = jnp.eye(2)
      >>> lossjax.clip_loss(x, x, temperature=1.0, reduction="none")
      Array([0.3132616, 0.3132616], dtype=float32)

    References:
      Radford et al. 2021, "Learning Transferable Visual Models From Natural
      Language Supervision".

    See also: `info_nce`, `sigmoid_contrastive_loss`, `ntxent`.
    """
    _check_temperature(temperature)
    a, b, kept = _two_tower_setup("clip_loss", image_embeddings, text_embeddings,
                                  where, ("image_embeddings", "text_embeddings"))
    inv_t = 1 / hyperparameter(temperature, a.dtype)
    if axis_name is None:
        # One [b, b] block serves both directions (its rows and its columns): half the
        # matmuls of scoring each direction on its own.
        logits = (a @ b.T) * inv_t
        positive = jnp.sum(a * b, axis=-1) * inv_t
        cols = rows = None
        if kept is not None:
            cols = jnp.broadcast_to(kept[None, :], logits.shape)
            rows = jnp.broadcast_to(kept[:, None], logits.shape)
        i2t = _masked_logsumexp(logits, cols, axis=1) - positive
        t2i = _masked_logsumexp(logits, rows, axis=0) - positive
    else:
        # Local rows against the gathered columns, in each direction: the columns of
        # the global block that hold this device's texts live on every device.
        k_all = _gather(kept, axis_name)
        i2t = _one_direction(a, b, _gather(b, axis_name), k_all, inv_t)
        t2i = _one_direction(b, a, _gather(a, axis_name), k_all, inv_t)
    return reduce_loss((i2t + t2i) / 2, kept=kept, weights=weights,
                       reduction=reduction, axis_name=axis_name)


def info_nce(
    queries: jax.Array,
    keys: jax.Array,
    *,
    temperature=0.07,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""One-directional InfoNCE: query i against every key, key i its positive.

    The asymmetric half of `clip_loss` (MoCo / CPC style with in-batch negatives).
    `queries` and `keys` are the two towers' names in that literature.

    .. math::
        \ell_i = \log\sum_j e^{q_i\cdot k_j/\tau} - q_i\cdot k_i/\tau

    Args:
      queries: float `[batch, dim]`.
      keys: float `[batch, dim]`, row i the positive of query i.
      temperature: tau > 0; may be a traced (learnable) scalar.
      where: bool `[batch]`; a False pair is neither a query nor a negative key.
      weights: float, broadcastable to `[batch]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis; keys are gathered over it (as `clip_loss`).

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.info_nce(jnp.eye(2), jnp.eye(2), temperature=1.0)
      Array(0.3132616, dtype=float32)

    References:
      van den Oord et al. 2018, "Representation Learning with Contrastive
      Predictive Coding".

    See also: `clip_loss`, `ntxent`.
    """
    _check_temperature(temperature)
    q, k, kept = _two_tower_setup("info_nce", queries, keys, where,
                                  ("queries", "keys"))
    inv_t = 1 / hyperparameter(temperature, q.dtype)
    entry = _one_direction(q, k, _gather(k, axis_name), _gather(kept, axis_name),
                           inv_t)
    return reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


# --- SigLIP -------------------------------------------------------------------------


def _ring_perm(n):
    return [(i, (i + 1) % n) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring_negative_sum(a, t, m, scale, bias, axis_name):
    """sum_j m_j softplus(scale * a_i . t_j + bias) over the texts of every device,
    each [b, b] block scored as the texts pass around the ring."""
    return _ring_fwd(a, t, m, scale, bias, axis_name)[0]


def _ring_fwd(a, t, m, scale, bias, axis_name):
    n = lax.axis_size(axis_name)
    perm = _ring_perm(n)

    def step(carry, _):
        t_k, m_k, acc = carry
        logits = (a @ t_k.T) * scale + bias
        acc = acc + jnp.sum(jnp.where(m_k[None, :] > 0, jax.nn.softplus(logits), 0),
                            axis=1)
        t_k, m_k = lax.ppermute((t_k, m_k), axis_name, perm)
        return (t_k, m_k, acc), None

    acc0 = _vary_like(jnp.zeros(a.shape[:1], a.dtype), a)
    # n steps of score-then-pass bring every text block home again.
    (_, _, acc), _ = lax.scan(step, (t, m, acc0), None, length=n)
    return acc, (a, t, m, scale, bias)


def _ring_bwd(axis_name, res, g):
    a, t, m, scale, bias = res
    n = lax.axis_size(axis_name)
    perm = _ring_perm(n)

    def step(carry, _):
        t_k, m_k, dt_k, da, dscale, dbias = carry
        dots = a @ t_k.T
        # d softplus(l)/dl = sigmoid(l); masked texts get exactly 0.
        coeff = jnp.where(m_k[None, :] > 0,
                          g[:, None] * jax.nn.sigmoid(dots * scale + bias), 0)
        da = da + (coeff @ t_k) * scale
        dt_k = dt_k + (coeff.T @ a) * scale
        dscale = dscale + jnp.sum(coeff * dots)
        dbias = dbias + jnp.sum(coeff)
        # The text gradient accumulator travels with its texts and arrives home.
        t_k, m_k, dt_k = lax.ppermute((t_k, m_k, dt_k), axis_name, perm)
        return (t_k, m_k, dt_k, da, dscale, dbias), None

    zeros = _vary_like(
        (jnp.zeros_like(t), jnp.zeros_like(a), jnp.zeros((), a.dtype),
         jnp.zeros((), a.dtype)), a)
    (_, _, dt, da, dscale, dbias), _ = lax.scan(
        step, (t, m, *zeros), None, length=n)
    return (da, dt, jnp.zeros_like(m), dscale.astype(jnp.result_type(scale)),
            dbias.astype(jnp.result_type(bias)))


_ring_negative_sum.defvjp(_ring_fwd, _ring_bwd)

IMPLEMENTATIONS = ("ring", "gather")


def sigmoid_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    *,
    temperature=0.1,
    bias=-10.0,
    implementation: str = "ring",
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Pairwise sigmoid loss (SigLIP): every image-text pair is a binary decision.

    For two-tower training at large batch: no softmax over the batch, so the global
    batch can be scored block by block. logits = a @ b.T / temperature + bias, label
    +1 on the diagonal and -1 elsewhere; entry i sums over all texts of the global
    batch, so "mean" is big_vision's SigLIP loss (its t = 1/temperature, its b =
    bias; big_vision learns log t).

    .. math::
        \ell_i = -\sum_j \log\sigma\big(y_{ij}(a_i\cdot b_j/\tau + \beta)\big)
          = \sum_j \operatorname{softplus}(l_{ij}) - l_{ii}

    (the right-hand form, a softplus per text and the positive's logit subtracted
    once, is what runs: it is stable at any |logit| and needs no block labels).

    Args:
      image_embeddings: float `[batch, dim]`.
      text_embeddings: float `[batch, dim]`, row i the positive of image i.
      temperature: tau > 0; may be a traced (learnable) scalar.
      bias: beta; may be a traced (learnable) scalar.
      implementation: with `axis_name`, "ring" (default) passes the texts around
        the devices with `ppermute` inside a `lax.scan`, one [b, b] block per step,
        under a custom_vjp whose backward runs the ring again and passes the text
        gradients home with their texts: per-device memory O(b^2 + b*dim) whatever
        the device count. "gather" all-gathers the texts and scores one [b, n*b]
        block (memory linear in the device count). Both give the same values and
        gradients. Without `axis_name` both are the one-block form.
      where: bool `[batch]`; a False pair is neither a row nor a column.
      weights: float, broadcastable to `[batch]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis (or tuple); value and gradients (towers,
        temperature, bias) equal the single-device loss on the global batch.

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> x = jnp.eye(2)
      >>> lossjax.sigmoid_contrastive_loss(x, x, temperature=1.0, bias=0.0,
      ...                                  reduction="none")
      Array([1.0064089, 1.0064089], dtype=float32)

    References:
      Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training".

    See also: `clip_loss`.
    """
    _check_temperature(temperature)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                         f"{implementation!r}.")
    a, b, kept = _two_tower_setup("sigmoid_contrastive_loss", image_embeddings,
                                  text_embeddings, where,
                                  ("image_embeddings", "text_embeddings"))
    scale = 1 / hyperparameter(temperature, a.dtype)
    beta = hyperparameter(bias, a.dtype)
    positive = jnp.sum(a * b, axis=-1) * scale + beta
    if axis_name is not None and implementation == "ring":
        m = (jnp.ones(a.shape[:1], a.dtype) if kept is None
             else kept.astype(a.dtype))
        scale_v, beta_v, m = _vary_like(
            (jnp.asarray(scale, a.dtype), jnp.asarray(beta, a.dtype), m), a)
        negatives = _ring_negative_sum(a, b, m, scale_v, beta_v, axis_name)
    else:
        logits = (a @ _gather(b, axis_name).T) * scale + beta
        k_all = _gather(kept, axis_name)
        sp = jax.nn.softplus(logits)
        if k_all is not None:
            sp = jnp.where(k_all[None, :], sp, 0)
        negatives = jnp.sum(sp, axis=1)
    return reduce_loss(negatives - positive, kept=kept, weights=weights,
                       reduction=reduction, axis_name=axis_name)


# --- NT-Xent / SupCon ---------------------------------------------------------------


def _cosine_logits(e, axis_name, inv_t):
    u = _normalize(e)
    return (u @ _gather(u, axis_name).T) * inv_t


def ntxent(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature=0.07,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""NT-Xent (SimCLR), with pytorch-metric-learning's semantics.

    For self-supervised training on views: give the views of one example the same
    label. Cosine similarity s (the embeddings are normalized here); the positives
    of an anchor are the other entries with its label, its negatives the entries
    with another label. Each positive pair's term is
    -log(e^{s_ap/T} / (e^{s_ap/T} + sum_n e^{s_an/T})); entry = the mean over the
    anchor's positive pairs. An anchor without positives gets no entry (0, not
    counted in "mean") but stays a candidate for the others. "mean" averages over
    anchors (pytorch-metric-learning over positive pairs: equal when each anchor has
    one positive, as SimCLR's two views; optax's `ntxent` likewise).

    .. math::
        \ell_a = \frac{1}{|P(a)|}\sum_{p\in P(a)}
          \operatorname{softplus}\Big(\log\sum_{n\in N(a)} e^{s_{an}/T} - s_{ap}/T\Big)

    Args:
      embeddings: float `[batch, dim]`.
      labels: int `[batch]`; equal labels are positives.
      temperature: T > 0; may be a traced scalar.
      where: bool `[batch]`; a False entry is neither an anchor nor a candidate.
      weights: float, broadcastable to `[batch]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis; anchors are local, candidates the global batch.

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> e = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
      >>> lossjax.ntxent(e, jnp.array([0, 0, 1]), temperature=1.0, reduction="none")
      Array([0.3145988 , 0.342446..., 0.        ], dtype=float32)

    References:
      Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
      Representations"; pytorch-metric-learning `NTXentLoss`.

    See also: `supervised_contrastive_loss`, `info_nce`.
    """
    _check_temperature(temperature)
    e, labels, kept = _labelled_setup("ntxent", embeddings, labels, where)
    s = _cosine_logits(e, axis_name, 1 / hyperparameter(temperature, e.dtype))
    pos, neg = _pair_masks(labels, kept, axis_name)
    lse_neg = _masked_logsumexp(s, neg)
    has_neg = jnp.any(neg, axis=1, keepdims=True)
    # softplus(lse_neg - s_ap) = -log(e^s_ap / (e^s_ap + sum e^s_an)), stable; no
    # negative at all gives -log 1 = 0.
    term = jnp.where(pos & has_neg, jax.nn.softplus(lse_neg[:, None] - s), 0)
    count = jnp.sum(pos, axis=1)
    entry = jnp.sum(term, axis=1) / jnp.maximum(count, 1).astype(e.dtype)
    anchors = count > 0 if kept is None else kept & (count > 0)
    return reduce_loss(entry, kept=anchors, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def supervised_contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature=0.1,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Supervised contrastive loss (SupCon, L_out of Khosla et al. 2020).

    For supervised representation learning: every other entry with the anchor's
    label is a positive, and the denominator runs over every other entry. Cosine
    similarity; no base-temperature factor (the reference code's
    temperature / base_temperature is 1 here). Anchors without positives get no
    entry but stay candidates.

    .. math::
        \ell_a = \log\sum_{k\ne a} e^{s_{ak}/T} - \frac{1}{|P(a)|}
          \sum_{p\in P(a)} s_{ap}/T

    Args:
      embeddings: float `[batch, dim]`.
      labels: int `[batch]`.
      temperature: T > 0; may be a traced scalar.
      where: bool `[batch]`; a False entry is neither an anchor nor a candidate.
      weights: float, broadcastable to `[batch]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis; anchors are local, candidates the global batch.

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> e = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
      >>> lossjax.supervised_contrastive_loss(e, jnp.array([0, 0, 1]),
      ...                                     temperature=1.0, reduction="none")
      Array([0.3145988 , 0.342446..., 0.        ], dtype=float32)

    References:
      Khosla et al. 2020, "Supervised Contrastive Learning".

    See also: `ntxent`.
    """
    _check_temperature(temperature)
    e, labels, kept = _labelled_setup("supervised_contrastive_loss", embeddings,
                                      labels, where)
    s = _cosine_logits(e, axis_name, 1 / hyperparameter(temperature, e.dtype))
    pos, neg = _pair_masks(labels, kept, axis_name)
    count = jnp.sum(pos, axis=1)
    mean_pos = jnp.sum(jnp.where(pos, s, 0), axis=1) / jnp.maximum(count, 1).astype(
        e.dtype)
    entry = _masked_logsumexp(s, pos | neg) - mean_pos
    anchors = count > 0 if kept is None else kept & (count > 0)
    return reduce_loss(entry, kept=anchors, weights=weights, reduction=reduction,
                       axis_name=axis_name)


# --- mining losses ------------------------------------------------------------------


def _p_distance(x, y, p):
    """||x - y||_p over the last axis, with a zero gradient (not NaN) at x == y."""
    diff = jnp.abs(x - y)
    total = jnp.sum(diff**2 if p == 2 else diff**p, axis=-1)
    nonzero = total > 0
    safe = jnp.where(nonzero, total, 1)
    return jnp.where(nonzero, jnp.sqrt(safe) if p == 2 else safe ** (1 / p), 0)


MINING = ("hard", "semihard", "all")


def batch_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin=1.0,
    mining: str = "hard",
    p: float = 2.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Triplet loss with in-batch mining over a labelled batch.

    For metric learning without building triplets by hand. d is the p-norm distance
    between embeddings (as given). Per anchor a, with P(a) its positives (same label,
    not itself) and N(a) its negatives:

    - "hard" (batch-hard, Hermans et al. 2017): relu(max_P d_ap - min_N d_an + m);
    - "semihard" (FaceNet, as tf-addons' `triplet_semihard_loss`): for each positive
      pair the nearest negative farther than d_ap (else the farthest negative), the
      entry being the mean over the anchor's positive pairs (tf-addons averages over
      all positive pairs of the batch instead);
    - "all" (batch-all): the mean of relu(d_ap - d_an + m) over the anchor's (p, n).

    An anchor without a positive or a negative gets no entry but stays a candidate.

    .. math::
        \ell_a^{hard} = \max\big(0, \max_{p} d_{ap} - \min_{n} d_{an} + m\big)

    Args:
      embeddings: float `[batch, dim]`.
      labels: int `[batch]`.
      margin: m; may be a traced scalar.
      mining: "hard", "semihard" or "all".
      p: the norm's order, > 0 (a Python number).
      where: bool `[batch]`; a False entry is neither an anchor nor a candidate.
      weights: float, broadcastable to `[batch]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis; anchors are local, candidates the global batch.

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> e = jnp.array([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
      >>> lossjax.batch_triplet_loss(e, jnp.array([0, 0, 1]), margin=2.0,
      ...                            reduction="none")
      Array([1.      , 0.763932, 0.      ], dtype=float32)

    References:
      Hermans et al. 2017, "In Defense of the Triplet Loss for Person
      Re-Identification"; Schroff et al. 2015, "FaceNet".

    See also: `triplet_margin_loss`, `circle_loss`.
    """
    if mining not in MINING:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}.")
    _checks.check_range("p", p, low=0, low_open=True)
    e, labels, kept = _labelled_setup("batch_triplet_loss", embeddings, labels, where)
    m = hyperparameter(margin, e.dtype)
    d = _p_distance(e[:, None, :], _gather(e, axis_name)[None, :, :], p)
    pos, neg = _pair_masks(labels, kept, axis_name)
    has_pos, has_neg = jnp.any(pos, axis=1), jnp.any(neg, axis=1)
    valid = has_pos & has_neg
    inf = jnp.asarray(jnp.inf, d.dtype)
    if mining == "hard":
        d_ap = jnp.max(jnp.where(pos, d, -inf), axis=1)
        d_an = jnp.min(jnp.where(neg, d, inf), axis=1)
        gap = jnp.where(valid, d_ap - d_an, 0)
        entry = jax.nn.relu(gap + m)
    else:
        d_ap, d_an = d[:, :, None], d[:, None, :]
        if mining == "semihard":
            farther = neg[:, None, :] & (d_an > d_ap)
            outside = jnp.min(jnp.where(farther, d_an, inf), axis=2)
            inside = jnp.max(jnp.where(neg, d, -inf), axis=1)[:, None]
            chosen = jnp.where(jnp.any(farther, axis=2), outside, inside)
            chosen = jnp.where(pos & has_neg[:, None], chosen, 0)
            pair = jnp.where(pos, jax.nn.relu(d - chosen + m), 0)
            count = jnp.sum(pos, axis=1)
        else:
            trip = pos[:, :, None] & neg[:, None, :]
            gap = jnp.where(trip, d_ap - d_an, 0)
            pair = jnp.sum(jnp.where(trip, jax.nn.relu(gap + m), 0), axis=2)
            count = jnp.sum(trip, axis=(1, 2))
        entry = jnp.sum(pair, axis=1) / jnp.maximum(count, 1).astype(e.dtype)
    anchors = valid if kept is None else kept & valid
    return reduce_loss(entry, kept=anchors, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def circle_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin=0.4,
    gamma=80.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Circle loss (Sun et al. 2020) over a labelled batch, with Keras's semantics.

    For metric learning with self-paced pair weights. As Keras's `circle`: cosine
    distance D = max(1 - e_a . e_k, 0) of the embeddings as given (pass L2-normalized
    embeddings), positives the other entries with the anchor's label. An anchor
    without a positive or a negative gets no entry (Keras masks its zero loss out).

    .. math::
        \ell_a = \operatorname{softplus}\Big(
          \log\sum_{p} e^{-\gamma [m + D_{ap}]_+ (m - D_{ap})}
          + \log\sum_{n} e^{\gamma [1 + m - D_{an}]_+ (1 - m - D_{an})}\Big)

    Args:
      embeddings: float `[batch, dim]` (L2-normalized by the model).
      labels: int `[batch]`.
      margin: m, the relaxation; may be a traced scalar.
      gamma: the scale, > 0; may be a traced scalar.
      where: bool `[batch]`; a False entry is neither an anchor nor a candidate.
      weights: float, broadcastable to `[batch]`.
      reduction: "none", "sum", "mean" or "sum_and_weight".
      axis_name: the batch axis; anchors are local, candidates the global batch.

    Returns:
      "none": `[batch]`; "sum", "mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> e = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
      >>> lossjax.circle_loss(e, jnp.array([0, 0, 1]), reduction="none")
      Array([7.6...e-12, 7.6...e-12, 0.0...e+00], dtype=float32)

    References:
      Sun et al. 2020, "Circle Loss: A Unified Perspective of Pair Similarity
      Optimization"; Keras `keras.losses.Circle`.

    See also: `batch_triplet_loss`, `supervised_contrastive_loss`.
    """
    _checks.check_range("gamma", gamma, low=0, low_open=True)
    e, labels, kept = _labelled_setup("circle_loss", embeddings, labels, where)
    m = hyperparameter(margin, e.dtype)
    g = hyperparameter(gamma, e.dtype)
    dist = jnp.maximum(1 - e @ _gather(e, axis_name).T, 0)
    pos, neg = _pair_masks(labels, kept, axis_name)
    pos_logit = -g * jax.nn.relu(m + dist) * (m - dist)
    neg_logit = g * jax.nn.relu(1 + m - dist) * (1 - m - dist)
    valid = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    # Log space throughout: gamma = 80 puts the exponents in the hundreds.
    entry = jax.nn.softplus(_masked_logsumexp(pos_logit, pos)
                            + _masked_logsumexp(neg_logit, neg))
    anchors = valid if kept is None else kept & valid
    return reduce_loss(entry, kept=anchors, weights=weights, reduction=reduction,
                       axis_name=axis_name)
