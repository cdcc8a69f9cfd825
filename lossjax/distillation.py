"""Knowledge distillation: the student matches a teacher's temperature-softened
distribution, on logits or fused with both models' linear heads.

`distillation_loss` (Hinton et al., with the T^2 factor) and `generalized_jsd_loss`
(GKD's generalized Jensen-Shannon divergence) take `[..., vocab]` logits of both
models, class axis `axis`; their loss shape is the input shape without it.
`linear_distillation_loss`, `linear_generalized_jsd_loss` and
`linear_topk_distillation_loss` take final hidden states and heads instead and walk
blocks of tokens: a `[token_block, vocab]` tile of each model's logits lives at a
time (recomputed block by block in the backward, `jax.checkpoint`), never either
model's whole `[tokens, vocab]` logits.
"""

from __future__ import annotations

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
)
from lossjax.large_vocab import _for_backend

__all__ = [
    "distillation_loss",
    "generalized_jsd_loss",
    "linear_distillation_loss",
    "linear_generalized_jsd_loss",
    "linear_topk_distillation_loss",
]
LOSS_NAMES = tuple(__all__)

# Entries of one [token_block, vocab] f32 tile of one model's logits in the fused
# forms (32 MiB on CPU, 256 MiB on accelerators); a block also holds at most 1/8
# of the tokens. A handful of such tiles (both models' logits and log-softmaxes)
# are live at once.
_TILE_ENTRIES_CPU, _TILE_ENTRIES_ACCELERATOR = 2**23, 2**26
_MIN_TOKEN_BLOCKS = 8


def _softened_log_probs(logits, temperature, softcap):
    """log_softmax(c(logits) / T) over the last axis, in the compute dtype."""
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _kl(log_p, log_q):
    """KL(p || q) over the last axis from log-probabilities (log_softmax outputs are
    finite, so `p * (log p - log q)` is 0, not NaN, where p underflows)."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _kd_entry(s, t, temperature, s_cap, t_cap):
    log_s = _softened_log_probs(s, temperature, s_cap)
    log_t = _softened_log_probs(t, temperature, t_cap)
    return temperature**2 * _kl(log_t, log_s)


def _jsd_entry(s, t, beta, temperature, s_cap, t_cap):
    log_s = _softened_log_probs(s, temperature, s_cap)
    log_t = _softened_log_probs(t, temperature, t_cap)
    if isinstance(beta, (int, float)):
        # Python endpoints: TRL's branches exactly (the mixture form is 0 there).
        if beta == 0:
            return _kl(log_t, log_s)
        if beta == 1:
            return _kl(log_s, log_t)
        return _mixture_jsd(log_s, log_t, beta)
    # A traced beta: every branch, selected without a Python `if`; the mixture
    # sees an interior beta at the endpoints so that its unselected gradient is
    # finite.
    endpoint = (beta == 0) | (beta == 1)
    inner = _mixture_jsd(log_s, log_t, jnp.where(endpoint, 0.5, beta))
    return jnp.where(beta == 0, _kl(log_t, log_s),
                     jnp.where(beta == 1, _kl(log_s, log_t), inner))


def _mixture_jsd(log_s, log_t, beta):
    # log M = log((1 - beta) S + beta T), in log space.
    log_m = jnp.logaddexp(log_s + jnp.log1p(-beta), log_t + jnp.log(beta))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def _check_temperature(temperature):
    _checks.check_range("temperature", temperature, low=0, low_open=True)


def _check_caps(*caps):
    for name, cap in caps:
        if cap is not None:
            _checks.check_range(name, cap, low=0, low_open=True)


def _logits_setup(loss, student_logits, teacher_logits, axis, where):
    s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _checks.check_float("student_logits", s)
    _checks.check_float("teacher_logits", t)
    _checks.check_same_shape("student_logits", s, "teacher_logits", t)
    _checks.check_rank("student_logits", s, 1, at_least=True)
    axis = _checks.normalize_axis(axis, s.ndim)
    s, t = jnp.moveaxis(s, axis, -1), jnp.moveaxis(t, axis, -1)
    kept = kept_mask(s.shape[:-1], where=where)
    kept_c = None if kept is None else kept[..., None]
    _checks.assert_finite(loss, "student_logits", s, kept_c)
    _checks.assert_finite(loss, "teacher_logits", t, kept_c)
    dtype = compute_dtype(s, t)
    s = sanitize(s, kept, 0, axis=-1).astype(dtype)
    t = sanitize(t, kept, 0, axis=-1).astype(dtype)
    return s, t, kept, dtype


def _cap(cap, dtype):
    return None if cap is None else hyperparameter(cap, dtype)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    student_logit_softcap: float | jax.Array | None = None,
    teacher_logit_softcap: float | jax.Array | None = None,
    axis: int = -1,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Knowledge distillation (Hinton et al.): T^2 * KL(teacher_T || student_T).

    The student's softened distribution matches the teacher's, per entry (per token
    for language models; exclude prompt and padding tokens with `where`):

    .. math::
        \ell = T^2 \,\mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\,
               \mathrm{softmax}(s / T)\big)

    **The T^2 factor is included, as Hinton et al. prescribe**: it keeps the
    gradient's scale independent of T (the soft targets' gradients scale as 1/T^2).
    Liger-Kernel's and TRL's distillation losses omit it: to match them divide by
    `temperature**2`. Logit soft-capping (Gemma 2, `s tanh(x / s)`) applies on
    either side before the temperature.

    Args:
      student_logits, teacher_logits: float `[..., vocab]`, same shape (class axis
        `axis`). Gradients flow to both; stop the teacher's yourself if frozen.
      temperature: T > 0; may be traced.
      student_logit_softcap, teacher_logit_softcap: s > 0 or None; may be traced.
      axis: the class axis.
      where, weights, reduction, axis_name: the contract (loss shape: the input
        shape without `axis`).

    Returns:
      "none": the loss shape; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.distillation_loss(jnp.array([[1.0, 0.0]]), jnp.array([[2.0, 0.0]]),
      ...                           temperature=2.0)
      Array(0.1054, dtype=float32)

    References:
      Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, 2015.

    See also: `generalized_jsd_loss`, `linear_distillation_loss`, `kl_divergence`.
    """
    _check_temperature(temperature)
    _check_caps(("student_logit_softcap", student_logit_softcap),
                ("teacher_logit_softcap", teacher_logit_softcap))
    s, t, kept, dtype = _logits_setup("distillation_loss", student_logits,
                                      teacher_logits, axis, where)
    loss = _kd_entry(s, t, hyperparameter(temperature, dtype),
                     _cap(student_logit_softcap, dtype),
                     _cap(teacher_logit_softcap, dtype))
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def generalized_jsd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    beta: float | jax.Array = 0.5,
    temperature: float | jax.Array = 1.0,
    student_logit_softcap: float | jax.Array | None = None,
    teacher_logit_softcap: float | jax.Array | None = None,
    axis: int = -1,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al.), TRL's beta.

    With `S = softmax(s / T)`, `T_ = softmax(t / T)` and the mixture
    `M = (1 - beta) S + beta T_`:

    .. math::
        \ell = \beta\, \mathrm{KL}(T_ \| M) + (1 - \beta)\, \mathrm{KL}(S \| M),
        \quad \beta = 0: \mathrm{KL}(T_ \| S), \quad \beta = 1: \mathrm{KL}(S \| T_)

    The endpoints are TRL's (`GKDTrainer.generalized_jsd_loss`) and Liger's: the
    forward KL at beta = 0, the reverse KL at beta = 1. **The loss is discontinuous
    there**: the mixture form tends to 0 as beta -> 0 or 1 (M tends to the other
    distribution), while the endpoints jump to a full KL. The temperature divides
    both logits; no T^2 factor (as TRL).

    Args:
      student_logits, teacher_logits: float `[..., vocab]`, same shape.
      beta: in [0, 1]; may be traced (the endpoints are then selected with `where`).
      temperature: T > 0; may be traced.
      student_logit_softcap, teacher_logit_softcap: s > 0 or None.
      axis: the class axis.
      where, weights, reduction, axis_name: the contract (loss shape: the input
        shape without `axis`).

    Returns:
      "none": the loss shape; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.generalized_jsd_loss(jnp.array([[1.0, 0.0]]),
      ...                              jnp.array([[2.0, 0.0]]))
      Array(0.0183, dtype=float32)

    References:
      Agarwal et al., On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes (GKD), 2024.

    See also: `distillation_loss`, `js_divergence`, `linear_generalized_jsd_loss`.
    """
    _checks.check_range("beta", beta, low=0, high=1)
    _check_temperature(temperature)
    _check_caps(("student_logit_softcap", student_logit_softcap),
                ("teacher_logit_softcap", teacher_logit_softcap))
    s, t, kept, dtype = _logits_setup("generalized_jsd_loss", student_logits,
                                      teacher_logits, axis, where)
    loss = _jsd_entry(s, t, hyperparameter(beta, dtype),
                      hyperparameter(temperature, dtype),
                      _cap(student_logit_softcap, dtype),
                      _cap(teacher_logit_softcap, dtype))
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


# --- fused with the linear heads ----------------------------------------------------


def _token_block(tokens, vocab, block_tokens):
    if block_tokens is not None:
        if not (isinstance(block_tokens, int) and block_tokens > 0):
            raise ValueError(
                f"block_tokens must be a positive int or None, got {block_tokens!r}.")
        return min(block_tokens, tokens)
    budget = _for_backend(_TILE_ENTRIES_CPU, _TILE_ENTRIES_ACCELERATOR)
    return max(1, min(budget // vocab, -(-tokens // _MIN_TOKEN_BLOCKS)))


def _blocked_per_token(entry, per_token, shared, token_block):
    """`entry(*block_of_per_token, *shared)` -> `[block]`, over token blocks.

    `per_token` arrays are `[tokens, ...]`; each block's logits are recomputed in the
    backward (`jax.checkpoint`), so one block's tiles live at a time. Blocks are
    strided (block i holds tokens i, i + blocks, ...), so tokens sharded over
    devices under jit stay sharded within every block, as in `linear_cross_entropy`.
    """
    tokens = per_token[0].shape[0]
    blocks = -(-tokens // token_block)
    pad = blocks * token_block - tokens

    def split(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return jnp.swapaxes(x.reshape((token_block, blocks) + x.shape[1:]), 0, 1)

    body = jax.checkpoint(lambda xs: entry(*xs, *shared))
    out = lax.map(body, tuple(split(x) for x in per_token))
    return jnp.swapaxes(out, 0, 1).reshape(-1)[:tokens]


def _head_logits(h, kernel, bias, dtype):
    x = lax.dot_general(h.astype(dtype), kernel.astype(dtype),
                        (((1,), (0,)), ((), ())), preferred_element_type=dtype)
    return x if bias is None else x + bias.astype(dtype)


def _check_head(prefix, hidden, kernel, bias):
    _checks.check_float(f"{prefix}_hidden", hidden)
    _checks.check_float(f"{prefix}_kernel", kernel)
    _checks.check_rank(f"{prefix}_hidden", hidden, 1, at_least=True)
    _checks.check_rank(f"{prefix}_kernel", kernel, 2)
    if hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"{prefix}_hidden has shape {hidden.shape} but {prefix}_kernel has shape "
            f"{kernel.shape}: the hidden's last axis must equal the kernel's first.")
    if bias is not None:
        _checks.check_float(f"{prefix}_bias", bias)
        _checks.check_shape(f"{prefix}_bias", bias, (kernel.shape[1],),
                            against=f"{prefix}_kernel of shape {kernel.shape}")


def _two_heads(loss, student_hidden, student_kernel, teacher_hidden, teacher_kernel,
               student_bias, teacher_bias, where):
    sh, sk, th, tk = (jnp.asarray(x) for x in (student_hidden, student_kernel,
                                               teacher_hidden, teacher_kernel))
    sb, tb = (None if b is None else jnp.asarray(b) for b in (student_bias,
                                                             teacher_bias))
    _check_head("student", sh, sk, sb)
    _check_head("teacher", th, tk, tb)
    if sh.shape[:-1] != th.shape[:-1]:
        raise ValueError(
            f"student_hidden has shape {sh.shape} and teacher_hidden {th.shape}: "
            "their leading (token) axes must match.")
    if sk.shape[1] != tk.shape[1]:
        raise ValueError(
            f"student_kernel has shape {sk.shape} and teacher_kernel {tk.shape}: "
            "the two heads must share the vocabulary.")
    kept = kept_mask(sh.shape[:-1], where=where)
    kept_c = None if kept is None else kept[..., None]
    _checks.assert_finite(loss, "student_hidden", sh, kept_c)
    _checks.assert_finite(loss, "teacher_hidden", th, kept_c)
    dtype = compute_dtype(sh, sk, th, tk, sb, tb)
    sh = sanitize(sh, kept, 0, axis=-1)
    th = sanitize(th, kept, 0, axis=-1)
    return sh, sk, sb, th, tk, tb, kept, dtype


def _fused_pair(loss, entry, student_hidden, student_kernel, teacher_hidden,
                teacher_kernel, student_bias, teacher_bias, block_tokens, where,
                weights, reduction, axis_name):
    sh, sk, sb, th, tk, tb, kept, dtype = _two_heads(
        loss, student_hidden, student_kernel, teacher_hidden, teacher_kernel,
        student_bias, teacher_bias, where)
    shape = sh.shape[:-1]
    sh2, th2 = sh.reshape(-1, sh.shape[-1]), th.reshape(-1, th.shape[-1])
    vocab = sk.shape[1]

    def block_entry(hs, ht, sk, sb, tk, tb):
        return entry(_head_logits(hs, sk, sb, dtype), _head_logits(ht, tk, tb, dtype))

    per_token = _blocked_per_token(
        block_entry, (sh2, th2), (sk, sb, tk, tb),
        _token_block(sh2.shape[0], vocab, block_tokens))
    return reduce_loss(per_token.reshape(shape), kept=kept, weights=weights,
                       reduction=reduction, axis_name=axis_name)


_FUSED_ARGS_DOC = """
      student_hidden: float `[..., d_s]`; student_kernel: float `[d_s, vocab]`.
      teacher_hidden: float `[..., d_t]` (same leading axes); teacher_kernel: float
        `[d_t, vocab]`. Gradients flow to all four; `lax.stop_gradient` a frozen
        teacher's (JAX then skips its gradient matmuls).
      student_bias, teacher_bias: float `[vocab]` or None.
      block_tokens: tokens per block (default: a `[block, vocab]` f32 tile of at
        most 32 MiB on CPU, 256 MiB on accelerators, and at most 1/8 of the tokens).
      where, weights, reduction, axis_name: the contract (loss shape:
        `hidden.shape[:-1]`)."""


def linear_distillation_loss(
    student_hidden: jax.Array,
    student_kernel: jax.Array,
    teacher_hidden: jax.Array,
    teacher_kernel: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    student_bias: jax.Array | None = None,
    teacher_bias: jax.Array | None = None,
    student_logit_softcap: float | jax.Array | None = None,
    teacher_logit_softcap: float | jax.Array | None = None,
    block_tokens: int | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    """`distillation_loss` (with T^2) of two linear heads, fused in token blocks.

    Equals `distillation_loss(student_hidden @ student_kernel + student_bias,
    teacher_hidden @ teacher_kernel + teacher_bias, ...)` per token, without either
    model's `[tokens, vocab]` logits in the forward or the backward: tokens are
    walked in blocks, each block's logits of both heads are computed, reduced to
    the per-token loss and recomputed in the backward (`jax.checkpoint`).

    Args:{args}
      temperature, student_logit_softcap, teacher_logit_softcap: as
        `distillation_loss`.

    Returns:
      "none": `hidden.shape[:-1]`; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    See also: `distillation_loss`, `linear_generalized_jsd_loss`,
    `linear_topk_distillation_loss`, `linear_cross_entropy`.
    """
    _check_temperature(temperature)
    _check_caps(("student_logit_softcap", student_logit_softcap),
                ("teacher_logit_softcap", teacher_logit_softcap))
    dtype = compute_dtype(student_hidden, student_kernel, teacher_hidden,
                          teacher_kernel)
    temp = hyperparameter(temperature, dtype)
    s_cap = _cap(student_logit_softcap, dtype)
    t_cap = _cap(teacher_logit_softcap, dtype)
    return _fused_pair(
        "linear_distillation_loss",
        lambda s, t: _kd_entry(s, t, temp, s_cap, t_cap),
        student_hidden, student_kernel, teacher_hidden, teacher_kernel,
        student_bias, teacher_bias, block_tokens, where, weights, reduction,
        axis_name)


def linear_generalized_jsd_loss(
    student_hidden: jax.Array,
    student_kernel: jax.Array,
    teacher_hidden: jax.Array,
    teacher_kernel: jax.Array,
    *,
    beta: float | jax.Array = 0.5,
    temperature: float | jax.Array = 1.0,
    student_bias: jax.Array | None = None,
    teacher_bias: jax.Array | None = None,
    student_logit_softcap: float | jax.Array | None = None,
    teacher_logit_softcap: float | jax.Array | None = None,
    block_tokens: int | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    """`generalized_jsd_loss` of two linear heads, fused in token blocks.

    Equals `generalized_jsd_loss` of the two heads' logits per token (same beta
    semantics and endpoints, no T^2), without either model's `[tokens, vocab]`
    logits in the forward or the backward (see `linear_distillation_loss`).

    Args:{args}
      beta, temperature, student_logit_softcap, teacher_logit_softcap: as
        `generalized_jsd_loss`.

    Returns:
      "none": `hidden.shape[:-1]`; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    See also: `generalized_jsd_loss`, `linear_distillation_loss`.
    """
    _checks.check_range("beta", beta, low=0, high=1)
    _check_temperature(temperature)
    _check_caps(("student_logit_softcap", student_logit_softcap),
                ("teacher_logit_softcap", teacher_logit_softcap))
    dtype = compute_dtype(student_hidden, student_kernel, teacher_hidden,
                          teacher_kernel)
    b = hyperparameter(beta, dtype)
    temp = hyperparameter(temperature, dtype)
    s_cap = _cap(student_logit_softcap, dtype)
    t_cap = _cap(teacher_logit_softcap, dtype)
    return _fused_pair(
        "linear_generalized_jsd_loss",
        lambda s, t: _jsd_entry(s, t, b, temp, s_cap, t_cap),
        student_hidden, student_kernel, teacher_hidden, teacher_kernel,
        student_bias, teacher_bias, block_tokens, where, weights, reduction,
        axis_name)


def linear_topk_distillation_loss(
    student_hidden: jax.Array,
    student_kernel: jax.Array,
    teacher_topk_logprobs: jax.Array,
    teacher_topk_ids: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    student_bias: jax.Array | None = None,
    student_logit_softcap: float | jax.Array | None = None,
    block_tokens: int | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Distillation from the teacher's precomputed top-k log-probabilities, fused.

    For teachers run offline (or too large to run beside the student): per token,
    the teacher's `k` most likely ids and their log-probabilities `log q_j` at the
    distillation temperature, and the student's linear head:

    .. math::
        \ell = T^2 \sum_{j=1}^{k} q_j \big(\log q_j - \log \mathrm{softmax}(
               c(h W + b) / T)_{\mathrm{id}_j}\big)

    the KL restricted to the teacher's top-k support (the student's softmax is over
    the whole vocabulary). With the full vocabulary as "top-k" it equals
    `distillation_loss`; with `q` renormalized over the k ids (the caller's choice)
    it is the KL of the truncated teacher. The student's logits are walked in token
    blocks as `linear_distillation_loss`.

    Args:
      student_hidden: float `[..., d]`; student_kernel: float `[d, vocab]`.
      teacher_topk_logprobs: float `[..., k]`, the teacher's log-probabilities
        (named for what they hold: log-probabilities of a k-subset, not logits).
      teacher_topk_ids: integer `[..., k]`, their vocabulary ids in [0, vocab).
      temperature: T > 0 (multiplies as T^2; the student's logits are divided by
        it); student_bias, student_logit_softcap: as `linear_distillation_loss`.
      block_tokens, where, weights, reduction, axis_name: as
        `linear_distillation_loss`.

    Returns:
      "none": `hidden.shape[:-1]`; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    See also: `linear_distillation_loss`, `distillation_loss`.
    """
    _check_temperature(temperature)
    _check_caps(("student_logit_softcap", student_logit_softcap),)
    sh, sk = jnp.asarray(student_hidden), jnp.asarray(student_kernel)
    sb = None if student_bias is None else jnp.asarray(student_bias)
    lq, ids = jnp.asarray(teacher_topk_logprobs), jnp.asarray(teacher_topk_ids)
    _check_head("student", sh, sk, sb)
    _checks.check_float("teacher_topk_logprobs", lq)
    _checks.check_int("teacher_topk_ids", ids)
    _checks.check_same_shape("teacher_topk_logprobs", lq, "teacher_topk_ids", ids)
    if lq.shape[:-1] != sh.shape[:-1]:
        raise ValueError(
            f"teacher_topk_logprobs has shape {lq.shape} and student_hidden "
            f"{sh.shape}: their leading (token) axes must match.")
    vocab = sk.shape[1]
    kept = kept_mask(sh.shape[:-1], where=where)
    kept_c = None if kept is None else kept[..., None]
    name = "linear_topk_distillation_loss"
    _checks.assert_finite(name, "student_hidden", sh, kept_c)
    _checks.assert_finite(name, "teacher_topk_logprobs", lq, kept_c)
    _checks.assert_labels_in_range(name, ids, vocab, kept_c)
    dtype = compute_dtype(sh, sk, sb, lq)
    in_range = jnp.all((ids >= 0) & (ids < vocab), axis=-1)
    sh = sanitize(sh, kept, 0, axis=-1)
    lq = sanitize(lq, kept, 0, axis=-1).astype(dtype)
    ids = jnp.where(kept_c if kept is not None else True, ids, 0)
    ids = jnp.where((ids >= 0) & (ids < vocab), ids, 0)
    temp = hyperparameter(temperature, dtype)
    cap = _cap(student_logit_softcap, dtype)
    shape = sh.shape[:-1]
    k = lq.shape[-1]

    def entry(h, lq_b, ids_b, sk, sb):
        log_s = _softened_log_probs(_head_logits(h, sk, sb, dtype), temp, cap)
        picked = jnp.take_along_axis(log_s, ids_b, axis=-1)
        return temp**2 * jnp.sum(jnp.exp(lq_b) * (lq_b - picked), axis=-1)

    per_token = _blocked_per_token(
        entry, (sh.reshape(-1, sh.shape[-1]), lq.reshape(-1, k), ids.reshape(-1, k)),
        (sk, sb), _token_block(sh.size // sh.shape[-1], vocab, block_tokens))
    per_token = jnp.where(in_range, per_token.reshape(shape), jnp.nan)
    return reduce_loss(per_token, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


for _fn in (linear_distillation_loss, linear_generalized_jsd_loss):
    _fn.__doc__ = _fn.__doc__.replace("{args}", _FUSED_ARGS_DOC)
