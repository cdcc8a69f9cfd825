"""Small flax models for the experiments; `create(config.model, ...)` picks one.

Every model takes `dtype` (the compute dtype: float32 or bfloat16) and keeps its
parameters in float32 (`param_dtype`), so `config.dtype="bfloat16"` is mixed precision:
bf16 matmuls and convolutions, f32 weights and optimizer state, and a loss that upcasts
its inputs to f32 (the lossjax precision contract).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class CNN(nn.Module):
    """Two 3x3 convolutions, average pooling and a two-layer head (8x8 digits)."""

    num_outputs: int
    features: tuple[int, ...] = (16, 32)
    hidden: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        for i, f in enumerate(self.features):
            x = nn.Conv(f, (3, 3), dtype=self.dtype, param_dtype=jnp.float32)(x)
            x = nn.relu(x)
            if i == 0:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32)(x))
        return nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=jnp.float32)(x)


class BagOfNgrams(nn.Module):
    """Hashed n-gram embeddings, masked mean pooling, MLP (fastText-style classifier).

    Input: int32 token ids `[batch, length]` with 0 as padding.
    """

    num_outputs: int
    vocab_size: int = 8192
    embed_dim: int = 64
    hidden: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        emb = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                       param_dtype=jnp.float32)(tokens)
        mask = (tokens > 0).astype(self.dtype)[..., None]
        # max(count, 1): an all-padding row pools to 0 instead of 0/0.
        count = jnp.maximum(jnp.sum(mask, axis=1), 1)
        x = jnp.sum(emb * mask, axis=1) / count
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32)(x))
        return nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=jnp.float32)(x)


class MLP(nn.Module):
    """A plain MLP for tabular regression; `num_outputs=2` for a mean+variance head."""

    num_outputs: int
    hidden: tuple[int, ...] = (64, 64)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        for h in self.hidden:
            x = nn.gelu(nn.Dense(h, dtype=self.dtype, param_dtype=jnp.float32)(x))
        return nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=jnp.float32)(x)


class Constant(nn.Module):
    """Outputs a learned vector (zeros at init) whatever the input (known answers).

    With zero logits over K classes, softmax cross-entropy is exactly log(K).
    """

    num_outputs: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        bias = self.param("bias", nn.initializers.zeros, (self.num_outputs,),
                          jnp.float32)
        return jnp.broadcast_to(bias.astype(self.dtype),
                                (x.shape[0], self.num_outputs))


MODELS = {"cnn": CNN, "bag_of_ngrams": BagOfNgrams, "mlp": MLP, "constant": Constant}


class SpeechConv(nn.Module):
    """1-D convolutions over log-mel frames and a per-frame character head, for CTC.

    Input: float `[batch, frames, features]`. Output: logits `[batch, frames',
    num_outputs]` with `frames' = ceil(frames / time_stride)`: the first convolution
    strides over time (fewer CTC frames, still more than the characters), the rest
    are residual, dilated to widen the context to about a word. Convolutions only:
    fast on CPU. Padding frames (all features exactly zero) are zeroed after every
    layer: valid frames then see zeros past the end whatever the padded length, and
    no gradient reaches the LayerNorm of a zero vector (its Jacobian is
    1/sqrt(epsilon), a million-fold gradient at initialization).
    """

    num_outputs: int
    features: int = 128
    num_layers: int = 4
    kernel_size: int = 5
    stride: int = 2
    dilations: tuple[int, ...] = (1, 2, 4)  # cycled over the residual layers
    dtype: Any = jnp.float32

    @property
    def time_stride(self) -> int:
        return self.stride

    def output_lengths(self, lengths):
        """Valid output frames of inputs with `lengths` valid frames (ceil division)."""
        return (lengths + self.stride - 1) // self.stride

    @nn.compact
    def __call__(self, x):
        def conv(h, **kw):
            return nn.Conv(self.features, (self.kernel_size,), padding="SAME",
                           dtype=self.dtype, param_dtype=jnp.float32, **kw)(h)

        def norm(h):
            return nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(h)

        # Output frame t sees input frame t * stride: valid iff t < output_lengths.
        valid = jnp.any(x != 0, axis=-1, keepdims=True)[:, ::self.stride]
        valid = valid.astype(self.dtype)
        x = nn.gelu(norm(conv(x.astype(self.dtype), strides=(self.stride,)))) * valid
        for i in range(self.num_layers - 1):
            d = self.dilations[i % len(self.dilations)]
            x = x + nn.gelu(norm(conv(x, kernel_dilation=(d,)))) * valid
        return nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=jnp.float32)(x)


MODELS["speech_conv"] = SpeechConv


def augment(key, images, *, shift: int = 1, noise: float = 0.1):
    """A random view of each image `[batch, h, w, c]`: a shift of up to `shift`
    pixels along each axis (wrapping around) and Gaussian noise of std `noise`; a
    pure function of `key`."""
    shift_key, noise_key = jax.random.split(key)
    offsets = jax.random.randint(shift_key, (images.shape[0], 2), -shift, shift + 1)
    rolled = jax.vmap(lambda im, o: jnp.roll(im, (o[0], o[1]), axis=(0, 1)))(
        images, offsets)
    return rolled + noise * jax.random.normal(noise_key, images.shape, images.dtype)


class ViewEncoder(nn.Module):
    """The digits CNN as an encoder of L2-normalized `num_outputs`-dim embeddings,
    for contrastive learning on two augmented views of each image.

    Training (a "dropout" rng given, as the train step does): the embeddings of two
    views of each image (`augment`, keyed by the step's rng: a pure function of
    (seed, step)), `[2, batch, dim]`, both through the same weights. Evaluation (no
    rng): the embeddings of the images as they are, `[batch, dim]`.
    """

    num_outputs: int
    features: tuple[int, ...] = (16, 32)
    hidden: int = 64
    shift: int = 1
    noise: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        encoder = CNN(self.num_outputs, self.features, self.hidden, self.dtype)

        def embed(images):
            e = encoder(images).astype(jnp.float32)
            return e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, -1, keepdims=True),
                                                 1e-12))

        x = x.astype(jnp.float32)
        if not self.has_rng("dropout"):
            return embed(x)
        keys = jax.random.split(self.make_rng("dropout"))
        return jnp.stack([embed(augment(k, x, shift=self.shift, noise=self.noise))
                          for k in keys])


MODELS["view_encoder"] = ViewEncoder


def create(name: str, *, num_outputs: int, dtype, **kwargs) -> nn.Module:
    """The model class `name` built with `kwargs` (tuples for list-valued fields)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return MODELS[name](num_outputs=num_outputs, dtype=jnp.dtype(dtype), **kwargs)


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


# --- language model -------------------------------------------------------------------


def _logical(init, names):
    """`init` with logical axis names for the mesh rules (`experiments.sharding`);
    the values it draws are unchanged."""
    return nn.with_logical_partitioning(init, tuple(names))


def _rope(x, base: float = 10000.0):
    """Rotary position embedding of `x` [batch, seq, heads, head_dim] (positions 0..).

    Rotates the pairs (x[..., i], x[..., i + head_dim // 2]) (the GPT-NeoX / Llama
    layout), in float32 whatever the compute dtype: bf16 angles lose the position.
    """
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freqs
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                           axis=-1).astype(x.dtype)


class _DecoderBlock(nn.Module):
    """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x)); causal attention."""

    num_heads: int
    mlp_dim: int
    rope: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        heads = (self.num_heads, d // self.num_heads)

        def dense(features, name, names, axis=-1):
            # `names`: the kernel's logical axes; the bias has the output's.
            out = names[-1 if np.ndim(features) == 0 else -len(features):]
            return nn.DenseGeneral(
                features, axis=axis, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=_logical(nn.linear.default_kernel_init, names),
                bias_init=_logical(nn.initializers.zeros_init(), out), name=name)

        h = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_attn")(x)
        q, k, v = (dense(heads, n, ("embed", "heads", "head_dim"))(h)
                   for n in ("query", "key", "value"))
        if self.rope:
            q, k = _rope(q), _rope(k)
        # jax's reference attention: softmax in float32 also for bf16 inputs.
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + dense(d, "attn_out", ("heads", "head_dim", "embed"), axis=(-2, -1))(a)
        h = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_mlp")(x)
        h = nn.gelu(dense(self.mlp_dim, "mlp_in", ("embed", "mlp"))(h))
        return x + dense(d, "mlp_out", ("mlp", "embed"))(h)


class Transformer(nn.Module):
    """Decoder-only language model (GPT-2 layout with pre-LN blocks).

    Token embedding, rotary (`positions="rope"`) or learned absolute
    (`positions="learned"`, up to `max_len` tokens) positions, `num_layers` pre-LN
    blocks with causal self-attention and a GELU MLP, a final LayerNorm and an output
    projection without bias, `kernel` [d_model, num_outputs] in flax `Dense` layout, or
    the embedding table transposed with `tie_embeddings=True`.

    Input: int32 token ids `[batch, seq]`. Output: logits `[batch, seq, num_outputs]`,
    or with `return_hidden=True` the pair `(hidden [batch, seq, d_model], kernel
    [d_model, num_outputs])` with `hidden @ kernel == logits`, for
    `lossjax.linear_cross_entropy(hidden, kernel, labels)`, which never builds the
    logits. Both modes have the same parameters, so a checkpoint serves either loss.
    Both outputs are in the compute `dtype` (the kernel is cast from its float32
    parameter, as `nn.Dense` does). Parameters carry logical axis names (`vocab`,
    `embed`, `heads`, `head_dim`, `mlp`) for the mesh rules of
    `experiments.sharding`.
    """

    num_outputs: int  # the vocabulary size
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    mlp_dim: int = 0  # 0: 4 * d_model
    positions: str = "rope"
    max_len: int = 2048
    tie_embeddings: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, return_hidden: bool = False):
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions={self.positions!r} is not 'rope' or "
                             "'learned'.")
        if self.d_model % self.num_heads or (
                self.positions == "rope" and (self.d_model // self.num_heads) % 2):
            raise ValueError(f"d_model={self.d_model} must split into "
                             f"num_heads={self.num_heads} heads (of even size for "
                             "rope).")
        seq = tokens.shape[-1]
        # GPT-2's N(0, 0.02) init for embeddings and head: initial logits near 0, so
        # the initial loss is about log(num_outputs).
        init = nn.initializers.normal(stddev=0.02)
        embed = nn.Embed(self.num_outputs, self.d_model, dtype=self.dtype,
                         param_dtype=jnp.float32,
                         embedding_init=_logical(init, ("vocab", "embed")),
                         name="embed")
        x = embed(tokens)
        if self.positions == "learned":
            if seq > self.max_len:
                raise ValueError(f"sequence length {seq} exceeds max_len="
                                 f"{self.max_len} of the learned positions.")
            pos = self.param("pos_embed", _logical(init, (None, "embed")),
                             (self.max_len, self.d_model), jnp.float32)
            x = x + pos[:seq].astype(self.dtype)
        for i in range(self.num_layers):
            x = _DecoderBlock(self.num_heads, self.mlp_dim or 4 * self.d_model,
                              rope=self.positions == "rope", dtype=self.dtype,
                              name=f"block_{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_final")(x)
        if self.tie_embeddings:
            kernel = embed.embedding.T
        else:
            kernel = self.param("head", _logical(init, ("embed", "vocab")),
                                (self.d_model, self.num_outputs), jnp.float32)
        kernel = kernel.astype(self.dtype)
        if return_hidden:
            return x, kernel
        return jnp.einsum("...d,dv->...v", x, kernel)


MODELS["transformer"] = Transformer


def head_argmax(hidden, kernel, *, block_size: int = 1024):
    """`argmax(hidden @ kernel, axis=-1)` without the `[..., vocab]` logits.

    A loop over blocks of `block_size` kernel columns keeps a running maximum and its
    id, so the largest buffer is `[..., block_size]`: a language model's predictions
    (token accuracy) at the memory cost of the fused loss. Ties go to the lowest id,
    as with `jnp.argmax`; the logits are computed in the inputs' dtype, as the
    materialized `einsum` does.

    Args:
      hidden: final hidden states `[..., d]`.
      kernel: output projection `[d, vocab]` (flax `Dense` layout).
      block_size: kernel columns per block (capped at the vocab size).

    Returns:
      int32 token ids `[...]`.
    """
    vocab = kernel.shape[-1]
    block = min(block_size, vocab)
    dtype = jnp.result_type(hidden, kernel)

    def body(i, carry):
        best, best_id = carry
        # The last block is clamped to end at `vocab`: it rescans some columns of the
        # previous block, which cannot beat a maximum they already set (strict >).
        start = jnp.minimum(i * block, vocab - block)
        logits = jnp.einsum("...d,dv->...v", hidden,
                            jax.lax.dynamic_slice_in_dim(kernel, start, block, axis=1))
        value = jnp.max(logits, axis=-1)
        better = value > best
        ids = jnp.argmax(logits, axis=-1).astype(jnp.int32) + start
        return jnp.where(better, value, best), jnp.where(better, ids, best_id)

    shape = hidden.shape[:-1]
    init = (jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, jnp.int32))
    return jax.lax.fori_loop(0, -(-vocab // block), body, init)[1]
