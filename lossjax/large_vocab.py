"""Large-vocabulary losses: the classifier head fused with its cross-entropy.

`linear_cross_entropy(hidden, kernel, labels)` equals
`cross_entropy(hidden @ kernel, labels)` without ever holding the `[tokens, vocab]`
logits (or their gradient) in memory: the vocabulary is walked in blocks of columns of
`kernel`, with an online logsumexp in the forward pass and a backward pass that
recomputes each block's logits.

Design: the fused kernel (a `jax.custom_vjp`) returns three per-token statistics of the
(soft-capped) logits `x` -- the logsumexp, the label's logit and `sum_k u_k x_k` (`u`
the class weights, or ones) -- and every option (class weights, label smoothing,
z-loss, masking, weights, reductions) is ordinary JAX on those `[tokens]` vectors, so
autodiff handles them and the kernel only ever sees a per-token cotangent. Vocab blocks
were measured against token blocks that compute the gradient in the forward pass: on
CPU the token-block version is 1.2-3x slower, because its kernel gradient contracts
over a short token block and writes the whole `[d, vocab]` kernel gradient per block,
and it cannot serve a per-token cotangent (`reduction="none"`, `return_lse`) at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lossjax import _checks
from lossjax._reduce import (
    check_reduction,
    compute_dtype,
    kept_mask,
    reduce_loss,
    sanitize,
)

__all__ = ["linear_cross_entropy"]
LOSS_NAMES = ("linear_cross_entropy",)

_NAME = "linear_cross_entropy"
# Columns of `kernel` per block: a [tokens, block] f32 tile of logits lives at a time.
# 1024 was fastest on CPU (measured with benchmarks/fused_ce.py); larger blocks fall out
# of cache, smaller ones underuse the matmul.
_DEFAULT_BLOCK = 1024


def _dot(a, b, contract_a: int, contract_b: int, acc_dtype):
    """A 2-D matmul contracting the given axes, accumulated in `acc_dtype`."""
    return lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())),
        preferred_element_type=acc_dtype,
    )


def _block_logits(h, kernel_b, bias_b, softcap, acc_dtype):
    """Soft-capped logits of one vocab block, and tanh(z / cap) (None without a cap)."""
    z = _dot(h, kernel_b, 1, 0, acc_dtype)
    if bias_b is not None:
        z = z + bias_b.astype(acc_dtype)
    if softcap is None:
        return z, None
    th = jnp.tanh(z / softcap)
    return softcap * th, th


def _varying_axes(x) -> frozenset:
    """The shard_map mesh axes `x` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # older jax spelling


def _vary_like(tree, ref):
    """Gives loop carries the shard_map axes `ref` varies over (loops fix them)."""
    axes = _varying_axes(ref)
    if not axes:
        return tree

    def cast(a):
        missing = tuple(sorted(axes - _varying_axes(a)))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def _vocab_blocks(vocab: int, block: int):
    """(number of full blocks, width of the remainder block) for a vocab of `vocab`."""
    return vocab // block, vocab % block


def _slice(x, start, width, axis):
    if x is None:
        return None
    if isinstance(start, int):
        return lax.slice_in_dim(x, start, start + width, axis=axis)
    return lax.dynamic_slice_in_dim(x, start, width, axis=axis)


def _stats_forward(h, kernel, bias, u, labels, block, softcap, need_sum):
    """Per-token (logsumexp, label logit, sum_k u_k x_k) of the logits, block by block.

    `labels` are local column ids; a label outside [0, vocab) contributes a 0 label
    logit (vocab-parallel shards that do not own the label).
    """
    acc = compute_dtype(h, kernel, bias)
    tokens = h.shape[0]
    full, rest = _vocab_blocks(kernel.shape[1], block)

    def step(carry, start, width):
        m, s, xy, total = carry
        x, _ = _block_logits(h, _slice(kernel, start, width, 1),
                             _slice(bias, start, width, 0), softcap, acc)
        # Online logsumexp: rescale the running sum to the new running max.
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
        local = labels - start
        inside = (local >= 0) & (local < width)
        picked = jnp.take_along_axis(x, jnp.clip(local, 0, width - 1)[:, None], 1)[:, 0]
        xy = xy + jnp.where(inside, picked, 0)
        if need_sum:
            if u is None:
                total = total + jnp.sum(x, axis=1)
            else:
                u_b = _slice(u, start, width, 0).astype(acc)
                total = total + _dot(x, u_b, 1, 0, acc)
        return m_new, s, xy, total

    zeros = jnp.zeros((tokens,), acc)
    carry = _vary_like((jnp.full((tokens,), -jnp.inf, acc), zeros, zeros, zeros), h)
    if full:
        carry = lax.fori_loop(0, full, lambda i, c: step(c, i * block, block), carry)
    if rest:
        carry = step(carry, full * block, rest)
    m, s, xy, total = carry
    return m + jnp.log(s), xy, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused_stats(h, kernel, bias, u, labels, block, softcap, need_sum):
    # The primal runs for value-only calls: one matmul's worth of work, no residuals.
    return _stats_forward(h, kernel, bias, u, labels, block, softcap, need_sum)


def _fused_stats_fwd(h, kernel, bias, u, labels, block, softcap, need_sum):
    lse, xy, total = _stats_forward(h, kernel, bias, u, labels, block, softcap,
                                    need_sum)
    return (lse, xy, total), (h, kernel, bias, u, labels, lse)


def _fused_stats_bwd(block, softcap, need_sum, residuals, cotangents):
    h, kernel, bias, u, labels, lse = residuals
    g_lse, g_xy, g_sum = cotangents
    acc = lse.dtype
    tokens, vocab = h.shape[0], kernel.shape[1]
    full, rest = _vocab_blocks(vocab, block)

    def step(carry, start, width):
        dh, dkernel, dbias, du = carry
        kernel_b = _slice(kernel, start, width, 1)
        x, th = _block_logits(h, kernel_b, _slice(bias, start, width, 0), softcap, acc)
        # d/dx of (lse, x_label, sum u x) against their cotangents: the softmax, the
        # label's one-hot (never built beyond this block) and u.
        dx = g_lse[:, None] * jnp.exp(x - lse[:, None])
        local = labels - start
        dx = dx + jnp.where(jnp.arange(width)[None, :] == local[:, None],
                            g_xy[:, None], 0)
        if need_sum:
            ub = 1 if u is None else _slice(u, start, width, 0).astype(acc)[None, :]
            dx = dx + g_sum[:, None] * ub
            if u is not None:
                du = _update(du, _dot(g_sum, x, 0, 0, acc), start)
        dz = dx if th is None else dx * (1 - th * th)  # d(s tanh(z/s))/dz
        # Gradient matmuls in the inputs' dtype (as the unfused bf16 backward does),
        # accumulated in f32.
        dz_in = dz.astype(h.dtype)
        dh = dh + _dot(dz_in, kernel_b, 1, 1, acc)
        dkernel_b = _dot(h, dz_in, 0, 0, acc).astype(kernel.dtype)
        dkernel = _update(dkernel, dkernel_b, start)
        if bias is not None:
            dbias = _update(dbias, jnp.sum(dz, axis=0).astype(bias.dtype), start)
        return dh, dkernel, dbias, du

    carry = (
        jnp.zeros((tokens, h.shape[1]), acc),
        jnp.zeros_like(kernel),
        None if bias is None else jnp.zeros_like(bias),
        None if u is None else jnp.zeros(u.shape, acc),
    )
    carry = _vary_like(carry, h)
    if full:
        carry = lax.fori_loop(0, full, lambda i, c: step(c, i * block, block), carry)
    if rest:
        carry = step(carry, full * block, rest)
    dh, dkernel, dbias, du = carry
    du = None if u is None else du.astype(u.dtype)
    return dh.astype(h.dtype), dkernel, dbias, du, None


def _update(buffer, block_value, start):
    """Writes one block's gradient into the [..., vocab] buffer (in place under XLA)."""
    return lax.dynamic_update_slice_in_dim(buffer, block_value, start, axis=-1)


_fused_stats.defvjp(_fused_stats_fwd, _fused_stats_bwd)


def _match_varying(arrays):
    """Makes every array vary over the same shard_map axes (None entries stay None).

    Inside `shard_map` the kernel varies over the vocab axis and the hidden states over
    the token axis. The fused kernel's backward returns each input's cotangent with the
    union of both; casting the inputs up front makes their transposes (psums over the
    axes an input was replicated on) JAX's job rather than ours.
    """
    axes = frozenset().union(*(_varying_axes(a) for a in arrays if a is not None))
    out = []
    for a in arrays:
        if a is not None:
            missing = tuple(sorted(axes - _varying_axes(a)))
            if missing:
                a = lax.pcast(a, missing, to="varying")
        out.append(a)
    return out


def linear_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    *,
    bias: jax.Array | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    class_weights: jax.Array | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    block_size: int | None = None,
    return_lse: bool = False,
    axis_name: str | None = None,
):
    r"""Softmax cross-entropy of a linear head, without materializing the logits.

    For language models and any classifier whose vocabulary is large: the value and
    the gradients (w.r.t. `hidden`, `kernel`, `bias`) equal those of
    `cross_entropy(hidden @ kernel + bias, labels, ...)` with the same options, but
    the `[tokens, vocab]` logits and their gradient are never held in memory. The
    vocabulary is processed in blocks of `block_size` columns of `kernel` (an online
    logsumexp forward, a recomputing backward), so memory beyond the inputs and their
    gradients is `O(tokens * block_size)`. A value-only call does one matmul's worth of
    work; loss and gradient do four (the unfused version does three and stores the
    logits). bf16 inputs are multiplied in bf16 with f32 accumulation.

    With `axis_name`, call it inside `jax.shard_map` with `kernel` (and `bias`,
    `class_weights`) sharded over that mesh axis on the vocab dimension: each shard
    owns the vocab range `[i * local_vocab, (i + 1) * local_vocab)` (`i` its axis
    index), `labels` hold global ids, and the shards combine their logsumexps and label
    logits with collectives; the kernel is never gathered. Tokens may be sharded over
    another axis at the same time; the reduction is then over the local tokens (reduce
    over the token axis yourself, e.g. `lax.pmean`).

    .. math::
        \ell = -\sum_k w_k\, \tilde t_k \log \mathrm{softmax}(c(hW + b))_k
               + \lambda_z \,\mathrm{logsumexp}(c(hW + b))^2,
        \quad \tilde t = (1-\varepsilon)\, \mathrm{onehot}(y) + \varepsilon / V,
        \quad c(x) = s \tanh(x / s)

    Conventions as `cross_entropy` (torch's): label smoothing mixes in the uniform
    distribution, class-weighted; with class weights, "mean" divides by the kept
    entries' `weights * class_weights[label]`.

    Args:
      hidden: float `[..., d]`, the final hidden states.
      kernel: float `[d, vocab]`, the head's kernel (flax `Dense` layout; tied
        embeddings pass `embedding.T`). Local vocab shard with `axis_name`.
      labels: integer `[...]` (= `hidden.shape[:-1]`), global class ids.
      bias: float `[vocab]` or None.
      label_smoothing: epsilon in [0, 1].
      ignore_index: labels equal to it are excluded (as `where=False`).
      class_weights: float `[vocab]`: an entry's weight is `class_weights[label]`.
      z_loss: coefficient of `logsumexp(logits)**2` added to each entry.
      logit_softcap: if set to s, logits become `s * tanh(logits / s)` first.
      where: bool, broadcastable to `labels.shape`; False entries count for nothing.
      weights: float, broadcastable to `labels.shape`; per-entry weights.
      reduction: "none", "sum" or "mean".
      block_size: vocab columns per block (default 1024, capped at the vocab size).
      return_lse: also return the per-token logsumexp of the soft-capped logits.
      axis_name: the mesh axis the vocab is sharded over (inside `shard_map` or
        `pmap`), or None.

    Returns:
      "none": `labels.shape`; "sum", "mean": a scalar; dtype
      `promote_types(hidden.dtype, kernel.dtype, float32)`. With `return_lse`, a pair
      `(loss, lse)` with `lse` of shape `labels.shape` (0 for excluded entries).

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> kernel = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
      >>> lossjax.linear_cross_entropy(hidden, kernel, jnp.array([0, 1]),
      ...                              reduction="none")
      Array([0.1698, 0.5514], dtype=float32)
      >>> lossjax.cross_entropy(hidden @ kernel, jnp.array([0, 1]), reduction="none")
      Array([0.1698, 0.5514], dtype=float32)

    References:
      Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models (Cut
      Cross-Entropy), 2025. Milakov & Gimelshein, Online normalizer calculation for
      softmax, 2018.

    See also: `cross_entropy`.
    """
    _checks.check_float("hidden", hidden)
    _checks.check_float("kernel", kernel)
    _checks.check_int("labels", labels)
    _checks.check_rank("hidden", hidden, 1, at_least=True)
    _checks.check_rank("kernel", kernel, 2)
    check_reduction(reduction)
    d, local_vocab = kernel.shape
    if hidden.shape[-1] != d:
        raise ValueError(
            f"hidden has shape {hidden.shape} but kernel has shape {kernel.shape}: "
            f"hidden's last axis must equal kernel's first ({d})."
        )
    _checks.check_shape("labels", labels, hidden.shape[:-1],
                        against=f"hidden of shape {hidden.shape}")
    for name, x in (("bias", bias), ("class_weights", class_weights)):
        if x is not None:
            _checks.check_float(name, x)
            _checks.check_shape(name, x, (local_vocab,),
                                against=f"kernel of shape {kernel.shape}")
    if block_size is None:
        block = _DEFAULT_BLOCK
    elif isinstance(block_size, int) and block_size > 0:
        block = block_size
    else:
        raise ValueError(
            f"block_size must be a positive int or None, got {block_size!r}.")
    block = min(block, local_vocab)
    if isinstance(label_smoothing, (int, float)) and not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}.")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(
            f"logit_softcap must be positive or None, got {logit_softcap}.")

    if axis_name is None:
        num_shards, offset = 1, 0
    else:
        num_shards = lax.axis_size(axis_name)
        offset = lax.axis_index(axis_name) * local_vocab
    vocab = num_shards * local_vocab

    loss_shape = labels.shape
    kept = kept_mask(loss_shape, where=where, labels=labels, ignore_index=ignore_index)
    _checks.assert_labels_in_range(_NAME, labels, vocab, kept)
    _checks.assert_finite(_NAME, "hidden", hidden,
                          None if kept is None else kept[..., None])
    _checks.assert_finite(_NAME, "kernel", kernel)
    if bias is not None:
        _checks.assert_finite(_NAME, "bias", bias)
    in_range = (labels >= 0) & (labels < vocab)
    # Out-of-range labels pick no logit and are turned into NaN afterwards: never a
    # silently clamped (or wrapped) index.
    safe_labels = jnp.where(in_range, labels, 0)
    if kept is not None:
        safe_labels = jnp.where(kept, safe_labels, 0)
    # Excluded tokens get zero hidden states, so NaN/inf there cannot reach the sums
    # over tokens in the kernel's gradient.
    hidden = sanitize(hidden, kept, 0, axis=-1)
    dtype = compute_dtype(hidden, kernel, bias)

    h2 = hidden.reshape(-1, d)
    local_labels = (safe_labels - offset).reshape(-1)
    need_sum = bool(label_smoothing)
    h2, kernel_, bias_, cw_ = _match_varying([h2, kernel, bias, class_weights])
    u = cw_ if need_sum else None
    lse, label_logit, total = _fused_stats(
        h2, kernel_, bias_, u, local_labels, block, logit_softcap, need_sum)
    label_weight = wbar = None
    if class_weights is not None:
        local = local_labels
        owned = (local >= 0) & (local < local_vocab)
        label_weight = jnp.where(
            owned, class_weights.astype(dtype)[jnp.clip(local, 0, local_vocab - 1)], 0)
        wbar = jnp.sum(class_weights.astype(dtype))
    if axis_name is not None:
        # Combine the shards' logsumexps; the max is only a shift (the result does not
        # depend on it), so it needs no gradient.
        m = lax.pmax(lax.stop_gradient(lse), axis_name)
        lse = m + jnp.log(lax.psum(jnp.exp(lse - m), axis_name))
        label_logit = lax.psum(label_logit, axis_name)
        if need_sum:
            total = lax.psum(total, axis_name)
        if class_weights is not None:
            label_weight = lax.psum(label_weight, axis_name)
            wbar = lax.psum(wbar, axis_name)
    lse = lse.reshape(loss_shape)
    label_logit = label_logit.reshape(loss_shape)

    # The per-entry loss from the per-token statistics, term by term as cross_entropy.
    nll = lse - label_logit
    if class_weights is not None:
        label_weight = label_weight.reshape(loss_shape)
        wbar = wbar / vocab
        nll = label_weight * nll
    if label_smoothing:
        mean_weighted_logit = total.reshape(loss_shape) / vocab
        uniform = (lse if class_weights is None else wbar * lse) - mean_weighted_logit
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    entry = nll + z_loss * lse**2 if z_loss else nll
    entry = jnp.where(in_range, entry, jnp.nan)
    normalizer = None
    if label_weight is not None:
        normalizer = label_weight if weights is None else weights * label_weight
        if weights is None:
            weights = jnp.ones((), dtype)
    loss = reduce_loss(entry, kept=kept, weights=weights, reduction=reduction,
                       normalizer=normalizer)
    if not return_lse:
        return loss
    return loss, (lse if kept is None else jnp.where(kept, lse, 0))
