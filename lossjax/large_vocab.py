"""Large-vocabulary losses: the classifier head fused with its cross-entropy.

`linear_cross_entropy(hidden, kernel, labels)` equals
`cross_entropy(hidden @ kernel, labels)` without ever holding the `[tokens, vocab]`
logits (or their gradient) in memory.

Design. Every option (class weights, label smoothing, z-loss, masking, weights,
reductions) is ordinary JAX on three per-token statistics of the (soft-capped) logits
`x`: the logsumexp, the label's logit and `sum_k u_k x_k` (`u` the class weights, or
ones). Two `jax.custom_vjp` kernels compute them:

- `_fused_loss`, for loss and gradient of a "sum"/"mean" loss (a training step):
  such a loss is `sum_n a_n lse_n + b_n x_label + c_n sum_k u_k x_k + zc_n lse_n^2`
  with per-token coefficients known before the kernel runs (the derivatives of the
  options' code at zero): this device's weighted sum, which `reduce_loss` then
  divides by the kept weight and sums over the batch axis (`axis_name`), as for
  every loss. The kernel walks token blocks, each over the whole vocab,
  and computes the gradients in the forward pass: three matmuls (logits, d hidden,
  d kernel), as the unfused version, and a `[token_block, vocab]` tile instead of the
  full logits. The backward only scales the stored gradients.
- `_fused_stats`, for per-token losses (`reduction="none"`), `return_lse` and vocab
  shards, whose per-token cotangents arrive only in the backward pass: vocab blocks
  with an online logsumexp forward and a backward that recomputes each block's logits
  (four matmuls), `O(tokens * block_size)` memory. Its forward is also the value-only
  path of both: one matmul.

Measured on CPU (`benchmarks/fused_ce.py`), f32 N=4096 d=1024 V=32768 loss+grad: token
blocks 5.3 s, vocab blocks 7.2 s, unfused 7.3 s. On an H200 at Gemma-2-2B's head
(bf16, 8192 tokens, d=2304, V=256000): 56 ms vs 81 ms, unfused 50 ms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lossjax import _checks
from lossjax._reduce import (
    AxisName,
    check_reduction,
    compute_dtype,
    global_sum,
    kept_mask,
    reduce_loss,
    sanitize,
    varying_axes,
)

__all__ = ["linear_cross_entropy", "linear_sequence_logprobs", "linear_token_logprobs"]
LOSS_NAMES = ("linear_cross_entropy",)

_NAME = "linear_cross_entropy"
# Columns of `kernel` per block: a [tokens, block] f32 tile of logits lives at a time.
# 1024 was fastest on CPU (measured with benchmarks/fused_ce.py); larger blocks fall out
# of cache, smaller ones underuse the matmul. On an H200 8192 was 10% faster than 1024
# at Gemma-2-2B's head (fewer, larger matmuls), at 0.7 GiB of temp memory.
_BLOCK_CPU, _BLOCK_ACCELERATOR = 1024, 8192
# Loss and gradient of a "sum"/"mean" loss walk token blocks instead (see
# `_fused_loss`): a [token_block, vocab] f32 tile of logits lives at a time, with
# token_block * vocab at most this many entries (128 MiB on CPU, 1 GiB on accelerators)
# and at most 1/8 of the tokens, so that no buffer comes near the full logits.
_TILE_ENTRIES_CPU, _TILE_ENTRIES_ACCELERATOR = 2**25, 2**28
_MIN_TOKEN_BLOCKS = 8


def _for_backend(cpu, accelerator):
    """The CPU or the accelerator value of a block size, for the default backend.

    Block sizes fix shapes, so they are chosen when tracing; choices that keep the
    shapes (`_dot`'s operand dtype) use `lax.platform_dependent` instead.
    """
    return cpu if jax.default_backend() == "cpu" else accelerator


def _dot(a, b, contract_a: int, contract_b: int, acc_dtype):
    """A 2-D matmul contracting the given axes, accumulated in `acc_dtype`.

    On CPU, bf16/f16 operands are converted to `acc_dtype` first: XLA:CPU multiplies
    f32 at about 1.5x its bf16 rate (AVX2 has no bf16 arithmetic), and the result is
    the same, since products of bf16 (or f16) numbers are exact in f32. Accelerators
    keep their native low-precision matmul.
    """

    def native(a, b):
        return lax.dot_general(
            a, b, (((contract_a,), (contract_b,)), ((), ())),
            preferred_element_type=acc_dtype,
        )

    if a.dtype == acc_dtype and b.dtype == acc_dtype:
        return native(a, b)
    return lax.platform_dependent(
        a, b, cpu=lambda a, b: native(a.astype(acc_dtype), b.astype(acc_dtype)),
        default=native)


def _block_logits(h, kernel_b, bias_b, softcap, acc_dtype):
    """One block's soft-capped logits x, pre-cap logits z and tanh(z / cap).

    Without a cap, x is z and the tanh is None.
    """
    z = _dot(h, kernel_b, 1, 0, acc_dtype)
    if bias_b is not None:
        z = z + bias_b.astype(acc_dtype)
    if softcap is None:
        return z, z, None
    th = jnp.tanh(z / softcap)
    return softcap * th, z, th


def _tile_grads(tile, softcap, g_e, e, local_labels, g_label, g_total, u_b):
    """The gradient step of a `[tokens, width]` tile of logits, shared by both kernels.

    `g_e * e` (per token, times the tile) is the lse's share of d loss / d x: the
    softmax times the cotangent of the lse. The label's one-hot (never built beyond
    this tile) carries `g_label`, and `u` carries `g_total` (None without the sum).

    Returns d loss / d z (pre-cap) in the inputs' dtype for the gradient matmuls, its
    column sums (d bias), the tile's share of d u and of d softcap (None where absent).
    """
    x, z, th = tile
    width = x.shape[1]
    dx = g_e[:, None] * e
    dx = dx + jnp.where(jnp.arange(width)[None, :] == local_labels[:, None],
                        g_label[:, None], 0)
    du = None
    if g_total is not None:
        dx = dx + g_total[:, None] * (1 if u_b is None else u_b[None, :])
        if u_b is not None:
            du = _dot(g_total, x, 0, 0, x.dtype)
    dz, dcap = dx, None
    if th is not None:
        dz = dx * (1 - th * th)  # d(s tanh(z/s))/dz
        # d(s tanh(z/s))/ds = tanh(z/s) - (z/s)(1 - tanh^2): a traced cap's gradient.
        dcap = jnp.sum(dx * th) - jnp.sum(dz * z) / softcap
    return dz, jnp.sum(dz, axis=0), du, dcap


def _vary_like(tree, like):
    """Makes every array in `tree` vary over all the shard_map axes that the arrays in
    `like` vary over (a no-op outside shard_map, where none vary).

    Inside `shard_map` a value created from constants (loop carries, the zeros at
    which the coefficients are taken) is device-invariant, and so are replicated
    inputs (a kernel beside sharded tokens, a vocab shard beside sharded tokens). A
    custom_vjp whose residuals or cotangents mix the two fails to trace or, worse,
    sums silently; cast up front, the transpose of each cast (a psum over the axes an
    input was replicated on) is JAX's job.
    """
    axes = frozenset().union(
        *(varying_axes(a) for a in jax.tree.leaves(like)))
    if not axes:
        return tree

    def cast(a):
        missing = tuple(sorted(axes - varying_axes(a)))
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


def _stats_forward(h, kernel, bias, u, labels, softcap, block, need_sum):
    """Per-token (logsumexp, label logit, sum_k u_k x_k) of the logits, block by block.

    `labels` are local column ids; a label outside [0, vocab) contributes a 0 label
    logit (vocab-parallel shards that do not own the label).
    """
    acc = compute_dtype(h, kernel, bias)
    tokens = h.shape[0]
    full, rest = _vocab_blocks(kernel.shape[1], block)

    def step(carry, start, width):
        m, s, xy, total = carry
        x, _, _ = _block_logits(h, _slice(kernel, start, width, 1),
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused_stats(h, kernel, bias, u, labels, softcap, block, need_sum):
    # The primal runs for value-only calls: one matmul's worth of work, no residuals.
    return _stats_forward(h, kernel, bias, u, labels, softcap, block, need_sum)


def _fused_stats_fwd(h, kernel, bias, u, labels, softcap, block, need_sum):
    lse, xy, total = _stats_forward(h, kernel, bias, u, labels, softcap, block,
                                    need_sum)
    return (lse, xy, total), (h, kernel, bias, u, labels, softcap, lse)


def _fused_stats_bwd(block, need_sum, residuals, cotangents):
    h, kernel, bias, u, labels, softcap, lse = residuals
    g_lse, g_xy, g_sum = cotangents
    acc = lse.dtype
    tokens, vocab = h.shape[0], kernel.shape[1]
    full, rest = _vocab_blocks(vocab, block)

    def step(carry, start, width):
        dh, dkernel, dbias, du, dcap = carry
        kernel_b = _slice(kernel, start, width, 1)
        tile = _block_logits(h, kernel_b, _slice(bias, start, width, 0), softcap, acc)
        u_b = None if u is None else _slice(u, start, width, 0).astype(acc)
        dz, dbias_b, du_b, dcap_b = _tile_grads(
            tile, softcap, g_lse, jnp.exp(tile[0] - lse[:, None]), labels - start,
            g_xy, g_sum if need_sum else None, u_b)
        # Gradient matmuls in the inputs' dtype (as the unfused bf16 backward does),
        # accumulated in f32.
        dz_in = dz.astype(h.dtype)
        dh = dh + _dot(dz_in, kernel_b, 1, 1, acc)
        dkernel = _update(dkernel, _dot(h, dz_in, 0, 0, acc).astype(kernel.dtype),
                          start)
        if bias is not None:
            dbias = _update(dbias, dbias_b.astype(bias.dtype), start)
        if du_b is not None:
            du = _update(du, du_b, start)
        if dcap_b is not None:
            dcap = dcap + dcap_b
        return dh, dkernel, dbias, du, dcap

    carry = (
        jnp.zeros((tokens, h.shape[1]), acc),
        jnp.zeros_like(kernel),
        None if bias is None else jnp.zeros_like(bias),
        None if u is None else jnp.zeros(u.shape, acc),
        None if softcap is None else jnp.zeros((), acc),
    )
    carry = _vary_like(carry, h)
    if full:
        carry = lax.fori_loop(0, full, lambda i, c: step(c, i * block, block), carry)
    if rest:
        carry = step(carry, full * block, rest)
    dh, dkernel, dbias, du, dcap = carry
    du = None if u is None else du.astype(u.dtype)
    dcap = None if softcap is None else dcap.astype(softcap.dtype)
    return dh.astype(h.dtype), dkernel, dbias, du, None, dcap


def _update(buffer, block_value, start):
    """Writes one block's gradient into the [..., vocab] buffer (in place under XLA)."""
    return lax.dynamic_update_slice_in_dim(buffer, block_value, start, axis=-1)


_fused_stats.defvjp(_fused_stats_fwd, _fused_stats_bwd)


def _token_block(tokens: int, vocab: int) -> int:
    """Tokens per block of the loss-and-gradient kernel (see `_TILE_ENTRIES_CPU`)."""
    budget = _for_backend(_TILE_ENTRIES_CPU, _TILE_ENTRIES_ACCELERATOR)
    return max(1, min(budget // vocab, -(-tokens // _MIN_TOKEN_BLOCKS)))


def _coefficient_loss(lse, xy, total, a, b, c, zc):
    """The scalar loss sum(a lse + b xy + c total + zc lse^2) over tokens."""
    return jnp.sum(a * lse + b * xy + c * total + zc * lse * lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _fused_loss(h, kernel, bias, u, labels, a, b, c, zc, softcap, token_block, block,
                need_sum):
    """sum over tokens of `a lse + b x_label + c sum_k u_k x_k + zc lse^2`.

    Every "sum"/"mean" option set of `linear_cross_entropy` is this form, with
    per-token coefficients computed outside (from weights, masks, class weights, label
    smoothing, z-loss and the reduction). Knowing them in the forward pass lets it
    compute the gradients there, one token block at a time: three matmuls (logits,
    d hidden, d kernel) instead of the vocab-block backward's four, which must
    recompute the logits because its per-token cotangents arrive only afterwards. The
    backward only scales the stored gradients by the incoming scalar cotangent.

    A value-only call runs this primal: the vocab-block forward, one matmul.
    """
    lse, xy, total = _stats_forward(h, kernel, bias, u, labels, softcap, block,
                                    need_sum)
    return _coefficient_loss(lse, xy, total, a, b, c, zc)


def _fused_loss_fwd(h, kernel, bias, u, labels, a, b, c, zc, softcap, token_block,
                    block, need_sum):
    acc = compute_dtype(h, kernel, bias)
    tokens, d = h.shape
    vocab = kernel.shape[1]
    blocks = -(-tokens // token_block)
    pad = blocks * token_block - tokens

    def split(x):  # [tokens, ...] -> [blocks, token_block, ...], zero-padded
        # Block i holds tokens i, i + blocks, i + 2 blocks, ...: strided, so that
        # tokens sharded over devices (data parallelism under jit) stay sharded
        # within every block instead of each block living on one device.
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return jnp.swapaxes(x.reshape((token_block, blocks) + x.shape[1:]), 0, 1)

    def merge(x):  # the inverse of split, without the padding
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape((-1,) + x.shape[2:])[:tokens]

    full, rest = _vocab_blocks(vocab, block)

    def kernel_grad_blocked(dkernel, h_b, dz_b):
        # d kernel += h_b^T dz_b in vocab blocks: XLA:CPU runs this contraction over
        # tokens at half speed when its output is the whole [d, vocab] at once.
        def add(dkernel, start, width):
            part = _dot(h_b, _slice(dz_b, start, width, 1), 0, 0, acc)
            return _update(dkernel, _slice(dkernel, start, width, 1) + part, start)

        if full:
            dkernel = lax.fori_loop(
                0, full, lambda i, g: add(g, i * block, block), dkernel)
        if rest:
            dkernel = add(dkernel, full * block, rest)
        return dkernel

    def kernel_grad(dkernel, h_b, dz_b):
        # Accelerators: one matmul (a loop of small ones would be launch-bound).
        return lax.platform_dependent(
            dkernel, h_b, dz_b, cpu=kernel_grad_blocked,
            default=lambda g, h_b, dz_b: g + _dot(h_b, dz_b, 0, 0, acc))

    u_acc = None if u is None else u.astype(acc)

    def step(carry, xs):
        dkernel, dbias, du, dcap = carry
        h_b, labels_b, a_b, b_b, c_b, zc_b = xs
        tile = _block_logits(h_b, kernel, bias, softcap, acc)  # [token_block, vocab]
        x = tile[0]
        m = jnp.max(x, axis=1)
        e = jnp.exp(x - m[:, None])
        s = jnp.sum(e, axis=1)
        lse = m + jnp.log(s)
        xy = jnp.take_along_axis(x, labels_b[:, None], 1)[:, 0]
        if need_sum:
            total = jnp.sum(x, axis=1) if u is None else _dot(x, u_acc, 1, 0, acc)
        else:
            total = jnp.zeros_like(lse)
        # e / s is the softmax; d loss / d lse = a + 2 zc lse.
        dz, dbias_b, du_b, dcap_b = _tile_grads(
            tile, softcap, (a_b + 2 * zc_b * lse) / s, e, labels_b, b_b,
            c_b if need_sum else None, u_acc)
        # Gradient matmuls in the inputs' dtype (as the unfused bf16 backward does),
        # accumulated in f32.
        dz_in = dz.astype(h.dtype)
        dh_b = _dot(dz_in, kernel, 1, 1, acc)
        dkernel = kernel_grad(dkernel, h_b, dz_in)
        if bias is not None:
            dbias = dbias + dbias_b
        if du_b is not None:
            du = du + du_b
        if dcap_b is not None:
            dcap = dcap + dcap_b
        return (dkernel, dbias, du, dcap), (dh_b, lse, xy, total)

    carry = (jnp.zeros((d, vocab), acc),
             None if bias is None else jnp.zeros(bias.shape, acc),
             None if u is None else jnp.zeros(u.shape, acc),
             None if softcap is None else jnp.zeros((), acc))
    carry = _vary_like(carry, h)
    xs = tuple(split(x) for x in (h, labels, a, b, c, zc))
    (dkernel, dbias, du, dcap), (dh, lse, xy, total) = lax.scan(step, carry, xs)
    dh, lse, xy, total = (merge(x) for x in (dh, lse, xy, total))
    loss = _coefficient_loss(lse, xy, total, a, b, c, zc)
    # Empty arrays of the inputs' dtypes: the backward casts the gradients to them.
    dtypes = tuple(None if x is None else jnp.zeros((0,), x.dtype)
                   for x in (h, kernel, bias, u, softcap))
    return loss, ((dh, dkernel, dbias, du, dcap), (lse, xy, total, lse * lse), dtypes)


def _fused_loss_bwd(token_block, block, need_sum, residuals, g):
    grads, stats, dtypes = residuals
    dh, dkernel, dbias, du, dcap = (
        None if x is None else (g * x).astype(like.dtype)
        for x, like in zip(grads, dtypes, strict=True))
    return (dh, dkernel, dbias, du, None) + tuple(g * x for x in stats) + (dcap,)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def linear_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    *,
    bias: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    ignore_index: int = -100,
    class_weights: jax.Array | None = None,
    z_loss: float | jax.Array = 0.0,
    logit_softcap: float | jax.Array | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    block_size: int | None = None,
    return_lse: bool = False,
    axis_name: AxisName = None,
    vocab_axis_name: AxisName = None,
):
    r"""Softmax cross-entropy of a linear head, without materializing the logits.

    For language models and any classifier whose vocabulary is large: the value and
    the gradients (w.r.t. `hidden`, `kernel`, `bias`, `class_weights` and the
    hyperparameters) equal those of `cross_entropy(hidden @ kernel + bias, labels,
    ...)` with integer labels, the class axis last and the same options, but the
    `[tokens, vocab]` logits and their gradient are never held in memory. A value-only
    call walks the vocabulary in blocks of `block_size` columns of `kernel` with an
    online logsumexp: one matmul's worth of work, `O(tokens * block_size)` memory.
    Loss and gradient of a "sum" or "mean" loss walk blocks of tokens (each a
    `[token_block, vocab]` f32 tile of at most 128 MiB on CPU, 1 GiB on accelerators,
    and at most 1/8 of the tokens) and compute the gradients in the forward pass:
    three matmuls, as the unfused version, plus an f32 `[d, vocab]` accumulator for
    the kernel's gradient. With `reduction="none"`, `return_lse` or `vocab_axis_name`
    the backward recomputes the logits block by block instead (four matmuls,
    `O(tokens * block_size)` memory). bf16 inputs are multiplied with f32
    accumulation (on CPU, converted to f32 first: faster there, same result).

    Devices. Under `jit` with the tokens sharded over devices, each token block is
    spread over all devices (blocks are strided, nothing is gathered), and the
    kernel's gradient is all-reduced once per token block. Inside `jax.shard_map`
    with the tokens sharded, the kernel replicated and no `axis_name`, the loss is
    over the local tokens: take the gradient of the `psum`med (or `pmean`med) loss,
    and shard_map itself sums the replicated kernel's gradient over the devices (do
    not reduce it again: that gives N times the gradient). With `axis_name` (the
    batch axis, as for every lossjax loss) "sum" and "mean" are over the global batch
    on every device, with exact gradients under `shard_map` and `pmap` (see
    `reduce_loss`). With `vocab_axis_name`, `kernel` (and `bias`, `class_weights`) are
    sharded over that mesh / pmap axis on the vocab dimension: each shard owns the
    vocab range `[i * local_vocab, (i + 1) * local_vocab)` (`i` its axis index),
    `labels` hold global ids, and the shards combine their logsumexps and label
    logits with collectives; the kernel is never gathered. Both axes may be given at
    once on a 2-D mesh. Under `pmap` each device's gradient w.r.t. its own inputs is
    its share of the global gradient: a replicated input's global gradient (the
    kernel over the batch axis, `hidden` over the vocab axis) is `lax.psum` of the
    shares.

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
        embeddings pass `embedding.T`). Local vocab shard with `vocab_axis_name`.
      labels: integer `[...]` (= `hidden.shape[:-1]`), global class ids.
      bias: float `[vocab]` or None (sharded like `kernel`).
      label_smoothing: epsilon in [0, 1]; may be a traced scalar.
      ignore_index: labels equal to it are excluded (as `where=False`).
      class_weights: float `[vocab]` (sharded like `kernel`): an entry's weight is
        `class_weights[label]`.
      z_loss: coefficient (>= 0) of `logsumexp(logits)**2` added to each entry; may
        be a traced scalar.
      logit_softcap: if set to s > 0, logits become `s * tanh(logits / s)` first; may
        be a traced scalar.
      where: bool, broadcastable to `labels.shape`; False entries count for nothing.
      weights: float, broadcastable to `labels.shape`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (see `reduce_loss`).
      block_size: vocab columns per block (default 1024 on CPU, 8192 on
        accelerators; capped at the vocab size).
      return_lse: also return the per-token logsumexp of the soft-capped logits.
      axis_name: the mesh / pmap axis (or tuple) over which the batch is sharded;
        "sum"/"mean" are then over the global batch, exact values and gradients
        under shard_map and pmap; "none" stays local (the README's contract).
      vocab_axis_name: the mesh / pmap axis (or tuple) over which `kernel` is sharded
        on the vocab dimension, or None.

    Returns:
      "none": `labels.shape`; "sum", "mean": a scalar; "sum_and_weight": a pair of
      scalars; dtype `promote_types(hidden.dtype, kernel.dtype, float32)`. With
      `return_lse`, a pair `(loss, lse)` with `lse` of shape `labels.shape` (0 for
      excluded entries).

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
    # NumPy arrays become JAX arrays once: indexing one with traced labels would not.
    hidden, kernel, labels = (jnp.asarray(x) for x in (hidden, kernel, labels))
    bias, class_weights = (None if x is None else jnp.asarray(x)
                           for x in (bias, class_weights))
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
        block = _for_backend(_BLOCK_CPU, _BLOCK_ACCELERATOR)
    elif isinstance(block_size, int) and block_size > 0:
        block = block_size
    else:
        raise ValueError(
            f"block_size must be a positive int or None, got {block_size!r}.")
    block = min(block, local_vocab)
    _checks.check_range("label_smoothing", label_smoothing, low=0, high=1)
    _checks.check_range("z_loss", z_loss, low=0)
    if logit_softcap is not None:
        _checks.check_range("logit_softcap", logit_softcap, low=0, low_open=True)

    if vocab_axis_name is None:
        num_shards, offset = 1, 0
    else:
        num_shards = lax.axis_size(vocab_axis_name)
        offset = lax.axis_index(vocab_axis_name) * local_vocab
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
    # A traced label_smoothing is never "zero": its term (and gradient) is computed.
    need_sum = not _checks.is_zero(label_smoothing)
    softcap = None if logit_softcap is None else jnp.asarray(logit_softcap, dtype)
    kernel_inputs = (h2, kernel, bias, class_weights, softcap)
    h2, kernel_, bias_, cw_, softcap = _vary_like(kernel_inputs, kernel_inputs)
    u = cw_ if need_sum else None

    def loss_of_stats(lse, label_logit, total, reduction=reduction,
                      axis_name=axis_name):
        """The reduced loss, and the lse in the loss shape, from per-token stats."""
        label_weight = wbar = None
        if class_weights is not None:
            owned = (local_labels >= 0) & (local_labels < local_vocab)
            label_weight = jnp.where(owned, class_weights.astype(dtype)[
                jnp.clip(local_labels, 0, local_vocab - 1)], 0)
            wbar = jnp.sum(class_weights.astype(dtype))
        if vocab_axis_name is not None:
            # Combine the shards' logsumexps; the max is only a shift (the result does
            # not depend on it), so it needs no gradient. `global_sum`: each shard's
            # statistics get their own cotangent back under pmap too (a plain psum
            # would transpose into another psum there: N times the gradient).
            m = lax.pmax(lax.stop_gradient(lse), vocab_axis_name)
            lse = m + jnp.log(global_sum(jnp.exp(lse - m), vocab_axis_name))
            label_logit = global_sum(label_logit, vocab_axis_name)
            if need_sum:
                total = global_sum(total, vocab_axis_name)
            if class_weights is not None:
                label_weight = global_sum(label_weight, vocab_axis_name)
                wbar = global_sum(wbar, vocab_axis_name)
        lse = lse.reshape(loss_shape)
        label_logit = label_logit.reshape(loss_shape)

        # The per-entry loss, term by term as cross_entropy.
        nll = lse - label_logit
        if class_weights is not None:
            label_weight = label_weight.reshape(loss_shape)
            wbar = wbar / vocab
            nll = label_weight * nll
        if need_sum:
            mean_weighted_logit = total.reshape(loss_shape) / vocab
            lse_part = lse if class_weights is None else wbar * lse
            uniform = lse_part - mean_weighted_logit
            nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
        entry = nll if _checks.is_zero(z_loss) else nll + z_loss * lse**2
        entry = jnp.where(in_range, entry, jnp.nan)
        normalizer, entry_weights = None, weights
        if label_weight is not None:
            normalizer = label_weight if weights is None else weights * label_weight
            if weights is None:
                entry_weights = jnp.ones((), dtype)
        loss = reduce_loss(entry, kept=kept, weights=entry_weights, reduction=reduction,
                           normalizer=normalizer, axis_name=axis_name)
        return loss, lse

    tokens = h2.shape[0]
    if (reduction != "none" and not return_lse and vocab_axis_name is None
            and tokens > 1):
        # Loss and gradient in one token-block pass (`_fused_loss`). The loss is linear
        # in the per-token statistics except for z-loss's lse^2, so its coefficients
        # are `loss_of_stats`'s derivatives at zero (and at lse = 1 for the quadratic
        # part), and its value at zero is 0 (NaN when a kept label is out of range).
        # A single token's block would be its whole logits row: the vocab-block path.
        # The zeros vary like the tokens: taken at device-invariant zeros inside
        # shard_map, the coefficients would be summed over the devices.
        zeros, ones = _vary_like(
            (jnp.zeros((tokens,), dtype), jnp.ones((tokens,), dtype)), h2)

        # The coefficients are those of this device's own sum and kept weight, never
        # of the global mean: a global normalizer inside per-token coefficients would
        # need every device's cotangent back, which pmap's psum cannot give exactly.
        def local_sum_and_weight(lse, label_logit, total):
            return loss_of_stats(lse, label_logit, total, reduction="sum_and_weight",
                                 axis_name=None)[0]

        def numerator(lse, label_logit, total):
            return local_sum_and_weight(lse, label_logit, total)[0]

        a, b, c = jax.grad(numerator, argnums=(0, 1, 2))(zeros, zeros, zeros)
        zc = (jax.grad(numerator)(ones, zeros, zeros) - a) / 2
        local_sum, local_weight = local_sum_and_weight(zeros, zeros, zeros)
        local_sum = local_sum + _fused_loss(
            h2, kernel_, bias_, u, local_labels, a, b, c, zc, softcap,
            _token_block(tokens, local_vocab), block, need_sum)
        # The batch reduction of the two local sums: the one helper, over the axis.
        return reduce_loss(local_sum, normalizer=local_weight, reduction=reduction,
                           axis_name=axis_name)

    # Per-token losses, the lse output or vocab shards: per-token statistics with
    # per-token cotangents (`_fused_stats`).
    lse, label_logit, total = _fused_stats(
        h2, kernel_, bias_, u, local_labels, softcap, block, need_sum)
    loss, lse = loss_of_stats(lse, label_logit, total)
    if not return_lse:
        return loss
    return loss, (lse if kept is None else jnp.where(kept, lse, 0))


# --- per-token and per-sequence log-probabilities of the head -----------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _label_stats(h, kernel, bias, labels, softcap, token_block, block):
    """Per-token (logsumexp, label logit) of the soft-capped logits of `h @ kernel`.

    Forward: the vocab-block pass of `_stats_forward` (one matmul, no residual
    beyond the inputs). Backward: the per-token cotangents of the two statistics are
    exactly the coefficients `a` (of the lse) and `b` (of the label logit) of
    `_fused_loss`'s token-block kernel, which computes the gradients of
    `sum(a lse + b x_label)`: the same kernel, run once in the backward (logits,
    d hidden, d kernel), never a `[tokens, vocab]` buffer. Labels are local column
    ids; one outside [0, local vocab) (a vocab shard that does not own it) picks
    no logit and gets no gradient.
    """
    lse, xy, _ = _stats_forward(h, kernel, bias, None, labels, softcap, block, False)
    return lse, xy


def _label_stats_fwd(h, kernel, bias, labels, softcap, token_block, block):
    out = _label_stats(h, kernel, bias, labels, softcap, token_block, block)
    return out, (h, kernel, bias, labels, softcap)


def _label_stats_bwd(token_block, block, residuals, cotangents):
    h, kernel, bias, labels, softcap = residuals
    g_lse, g_xy = _vary_like(cotangents, h)
    owned = (labels >= 0) & (labels < kernel.shape[1])
    # A label this shard does not own gets a zero coefficient at a harmless column.
    g_xy = jnp.where(owned, g_xy, 0)
    zeros = jnp.zeros_like(g_lse)
    _, (grads, _, dtypes) = _fused_loss_fwd(
        h, kernel, bias, None, jnp.where(owned, labels, 0), g_lse, g_xy, zeros,
        zeros, softcap, token_block, block, False)
    dh, dkernel, dbias, _, dcap = (
        None if x is None else x.astype(like.dtype)
        for x, like in zip(grads, dtypes, strict=True))
    return dh, dkernel, dbias, None, dcap


_label_stats.defvjp(_label_stats_fwd, _label_stats_bwd)


def _label_logprobs(name, hidden, kernel, labels, *, bias, ignore_index,
                    logit_softcap, where, block_size, vocab_axis_name):
    """Checks the inputs; returns (log p(label) in `labels.shape`, 0 where excluded
    and NaN for a kept out-of-range label; the kept mask)."""
    hidden, kernel, labels = (jnp.asarray(x) for x in (hidden, kernel, labels))
    bias = None if bias is None else jnp.asarray(bias)
    _checks.check_float("hidden", hidden)
    _checks.check_float("kernel", kernel)
    _checks.check_int("labels", labels)
    _checks.check_rank("hidden", hidden, 1, at_least=True)
    _checks.check_rank("kernel", kernel, 2)
    d, local_vocab = kernel.shape
    if hidden.shape[-1] != d:
        raise ValueError(
            f"hidden has shape {hidden.shape} but kernel has shape {kernel.shape}: "
            f"hidden's last axis must equal kernel's first ({d})."
        )
    _checks.check_shape("labels", labels, hidden.shape[:-1],
                        against=f"hidden of shape {hidden.shape}")
    if bias is not None:
        _checks.check_float("bias", bias)
        _checks.check_shape("bias", bias, (local_vocab,),
                            against=f"kernel of shape {kernel.shape}")
    block = _block_size(block_size, local_vocab)
    if logit_softcap is not None:
        _checks.check_range("logit_softcap", logit_softcap, low=0, low_open=True)
    if vocab_axis_name is None:
        num_shards, offset = 1, 0
    else:
        num_shards = lax.axis_size(vocab_axis_name)
        offset = lax.axis_index(vocab_axis_name) * local_vocab
    vocab = num_shards * local_vocab

    kept = kept_mask(labels.shape, where=where, labels=labels,
                     ignore_index=ignore_index)
    _checks.assert_labels_in_range(name, labels, vocab, kept)
    _checks.assert_finite(name, "hidden", hidden,
                          None if kept is None else kept[..., None])
    _checks.assert_finite(name, "kernel", kernel)
    in_range = (labels >= 0) & (labels < vocab)
    safe_labels = jnp.where(in_range, labels, 0)
    if kept is not None:
        safe_labels = jnp.where(kept, safe_labels, 0)
    # Excluded tokens get zero hidden states and zero cotangents: NaN/inf there
    # cannot reach the kernel's gradient.
    hidden = sanitize(hidden, kept, 0, axis=-1)
    dtype = compute_dtype(hidden, kernel, bias)
    h2 = hidden.reshape(-1, d)
    local_labels = (safe_labels - offset).reshape(-1)
    softcap = None if logit_softcap is None else jnp.asarray(logit_softcap, dtype)
    inputs = (h2, kernel, bias, softcap)
    h2, kernel, bias, softcap = _vary_like(inputs, inputs)
    tokens = h2.shape[0]
    lse, xy = _label_stats(h2, kernel, bias, local_labels, softcap,
                           _token_block(max(tokens, 2), local_vocab), block)
    if vocab_axis_name is not None:
        # As in `linear_cross_entropy`: the max is only a shift; `global_sum` gives
        # each shard its own cotangent back under pmap too.
        m = lax.pmax(lax.stop_gradient(lse), vocab_axis_name)
        lse = m + jnp.log(global_sum(jnp.exp(lse - m), vocab_axis_name))
        xy = global_sum(xy, vocab_axis_name)
    logp = (xy - lse).reshape(labels.shape)
    logp = jnp.where(in_range, logp, jnp.nan)
    if kept is not None:
        logp = jnp.where(kept, logp, 0)
    return logp, kept


def _block_size(block_size, local_vocab):
    if block_size is None:
        block = _for_backend(_BLOCK_CPU, _BLOCK_ACCELERATOR)
    elif isinstance(block_size, int) and block_size > 0:
        block = block_size
    else:
        raise ValueError(
            f"block_size must be a positive int or None, got {block_size!r}.")
    return min(block, local_vocab)


def linear_token_logprobs(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    *,
    bias: jax.Array | None = None,
    ignore_index: int = -100,
    logit_softcap: float | jax.Array | None = None,
    where: jax.Array | None = None,
    block_size: int | None = None,
    vocab_axis_name: AxisName = None,
) -> jax.Array:
    r"""Per-token log-probability of the label under a linear head, fused.

    `log_softmax(c(hidden @ kernel + bias))[..., label]` without the `[tokens, vocab]`
    logits: the forward walks vocab blocks with an online logsumexp (one matmul);
    the backward runs `linear_cross_entropy`'s token-block kernel with the per-token
    cotangents as its coefficients (three matmuls, `[token_block, vocab]` tiles).
    The building block of the preference losses (`linear_sequence_logprobs`).

    Args:
      hidden: float `[..., d]`; kernel: float `[d, vocab]` (the local vocab shard
        with `vocab_axis_name`); labels: integer `[...]` (= `hidden.shape[:-1]`),
        global ids, already aligned with `hidden` (the caller shifts them).
      bias: float `[vocab]` or None; ignore_index: labels equal to it are excluded;
      logit_softcap: s > 0 applies `s tanh(x / s)` to the logits (traceable);
      where: bool broadcastable to `labels.shape`; block_size: vocab columns per
      block; vocab_axis_name: the axis `kernel` is sharded over on the vocab.

    Returns:
      float `labels.shape`: log p(label), exactly 0 (with zero gradients) where
      excluded, NaN where a kept label is out of range.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> h = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> w = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
      >>> lossjax.linear_token_logprobs(h, w, jnp.array([0, -100]))
      Array([-0.1698, 0.    ], dtype=float32)

    See also: `linear_sequence_logprobs`, `linear_cross_entropy`.
    """
    logp, _ = _label_logprobs(
        "linear_token_logprobs", hidden, kernel, labels, bias=bias,
        ignore_index=ignore_index, logit_softcap=logit_softcap, where=where,
        block_size=block_size, vocab_axis_name=vocab_axis_name)
    return logp


def linear_sequence_logprobs(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    *,
    bias: jax.Array | None = None,
    ignore_index: int = -100,
    logit_softcap: float | jax.Array | None = None,
    where: jax.Array | None = None,
    block_size: int | None = None,
    vocab_axis_name: AxisName = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Per-sequence sum of label log-probabilities and kept-token count, fused.

    What a preference trainer needs from the policy: for `hidden [batch, seq, d]` and
    `labels [batch, seq]` (aligned: the caller shifts them), the pair
    `(sum_t log p(label_t), number of kept tokens)`, each `[batch]`, without the
    `[batch, seq, vocab]` logits in the forward or the backward (see
    `linear_token_logprobs`). Tokens with `labels == ignore_index` or `where=False`
    (the prompt, padding) count for nothing. The average log-probability (IPO,
    SimPO, ORPO) is `logps / counts`.

    .. math::
        \log \pi(y \mid x) = \sum_t \log \mathrm{softmax}(c(h_t W + b))_{y_t}

    Args: as `linear_token_logprobs`, with `hidden` `[..., seq, d]`.

    Returns:
      `(logps, counts)`: float `labels.shape[:-1]` and int32 `labels.shape[:-1]`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> h = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
      >>> w = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
      >>> lossjax.linear_sequence_logprobs(h, w, jnp.array([[0, 1]]))
      (Array([-0.7212], dtype=float32), Array([2], dtype=int32))

    See also: `dpo_loss`, `linear_dpo_loss`.
    """
    hidden = jnp.asarray(hidden)
    _checks.check_rank("hidden", hidden, 2, at_least=True)
    logp, kept = _label_logprobs(
        "linear_sequence_logprobs", hidden, kernel, labels, bias=bias,
        ignore_index=ignore_index, logit_softcap=logit_softcap, where=where,
        block_size=block_size, vocab_axis_name=vocab_axis_name)
    if kept is None:
        counts = jnp.full(logp.shape[:-1], logp.shape[-1], jnp.int32)
    else:
        counts = jnp.sum(kept, axis=-1, dtype=jnp.int32)
    return jnp.sum(logp, axis=-1), counts
