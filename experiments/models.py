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


def create(name: str, *, num_outputs: int, dtype, **kwargs) -> nn.Module:
    """The model class `name` built with `kwargs` (tuples for list-valued fields)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return MODELS[name](num_outputs=num_outputs, dtype=jnp.dtype(dtype), **kwargs)


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
