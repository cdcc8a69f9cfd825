"""Tests for lossjax.large_vocab.linear_cross_entropy.

The reference is `cross_entropy` on the materialized logits `hidden @ kernel + bias`
with the same options: values to 1e-6 relative and gradients w.r.t. hidden, kernel and
bias to 1e-5 relative L2 (float32). Shapes are chosen so that the vocab (300) is not a
multiple of the block (128): the last block is a partial one.
"""

from __future__ import annotations

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref
from absl.testing import parameterized
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
from loss_cases import MatrixCase

import lossjax
from lossjax.large_vocab import linear_cross_entropy

D, V, BLOCK = 32, 300, 128
SHAPE = (8, 8)  # token axes of hidden / labels (64 tokens)
REDUCTIONS = ("none", "sum", "mean")


def _inputs(rng, shape=SHAPE, d=D, vocab=V, dtype=np.float32):
    hidden = rng.normal(0.0, 1.0, shape + (d,))
    kernel = rng.normal(0.0, 0.5, (d, vocab))
    bias = rng.normal(0.0, 1.0, (vocab,))
    labels = rng.integers(0, vocab, shape)
    labels.flat[3] = -100  # always one ignored token
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(hidden), cast(kernel), cast(bias), jnp.asarray(labels)


def _options(rng, name, shape=SHAPE, vocab=V):
    cw = jnp.asarray(rng.uniform(0.25, 2.0, vocab), jnp.float32)
    where = jnp.asarray(rng.random(shape) > 0.2)
    weights = jnp.asarray(rng.uniform(0.0, 2.0, shape), jnp.float32)
    return {
        "plain": {},
        "label_smoothing": dict(label_smoothing=0.1),
        "class_weights": dict(class_weights=cw),
        "class_weights+smoothing": dict(class_weights=cw, label_smoothing=0.2),
        "z_loss": dict(z_loss=1e-2),
        "logit_softcap": dict(logit_softcap=4.0),
        "where+weights": dict(where=where, weights=weights),
        "ignore_index=5": dict(ignore_index=5),
        "everything": dict(class_weights=cw, label_smoothing=0.1, z_loss=1e-2,
                           logit_softcap=4.0, where=where, weights=weights),
    }[name]


OPTION_SETS = ("plain", "label_smoothing", "class_weights", "class_weights+smoothing",
               "z_loss", "logit_softcap", "where+weights", "ignore_index=5",
               "everything")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _scalarize(fn, reduction, cotangent):
    """A scalar of the loss for value_and_grad ("none": random per-token cotangent)."""
    if reduction == "none":
        return lambda *a: jnp.sum(fn(*a) * cotangent)
    return fn


def _assert_close(got, want, *, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.nanmax(np.abs(want)) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("options,bias", [("plain", False)] + [
    (name, True) for name in OPTION_SETS])
def test_matches_cross_entropy_on_materialized_logits(options, bias):
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    opts = _options(rng, options)
    if options == "ignore_index=5":
        y = jnp.where(y == -100, 5, y).at[0, :3].set(5)
    cotangent = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    if not bias:
        b = jnp.zeros_like(b)
    for reduction in REDUCTIONS:
        def fused(h, w, b, reduction=reduction):
            return linear_cross_entropy(h, w, y, bias=b if bias else None,
                                        block_size=BLOCK, reduction=reduction, **opts)

        def naive(h, w, b, reduction=reduction):
            return lossjax.cross_entropy(h @ w + b, y, reduction=reduction, **opts)

        v1, g1 = jax.value_and_grad(_scalarize(fused, reduction, cotangent),
                                    argnums=(0, 1, 2))(h, w, b)
        v2, g2 = jax.value_and_grad(_scalarize(naive, reduction, cotangent),
                                    argnums=(0, 1, 2))(h, w, b)
        _assert_close(fused(h, w, b), naive(h, w, b), rtol=1e-6)
        _assert_close(v1, v2, rtol=1e-6)
        for name, a, c in zip(("hidden", "kernel", "bias"), g1, g2, strict=True):
            if name == "bias" and not bias:
                assert not np.any(a), "no bias given: zero gradient"
                continue
            assert _rel(a, c) < 1e-5, (options, reduction, name, _rel(a, c))


def test_class_weights_gradient_matches():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    cw = jnp.asarray(rng.uniform(0.25, 2.0, V), jnp.float32)

    def fused(cw):
        return linear_cross_entropy(h, w, y, bias=b, class_weights=cw,
                                    label_smoothing=0.3, block_size=BLOCK)

    def naive(cw):
        return lossjax.cross_entropy(h @ w + b, y, class_weights=cw,
                                     label_smoothing=0.3)

    assert _rel(jax.grad(fused)(cw), jax.grad(naive)(cw)) < 1e-5


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_token_blocks_with_padding_and_weight_gradients(reduction):
    # 61 tokens: the loss-and-gradient kernel's token blocks (8 tokens) leave a
    # partial block; gradients w.r.t. the per-token weights too, which reach the
    # loss through the kernel's per-token coefficients.
    rng = np.random.default_rng(1)
    h, w, b, y = _inputs(rng, shape=(61,))
    cw = jnp.asarray(rng.uniform(0.25, 2.0, V), jnp.float32)
    weights = jnp.asarray(rng.uniform(0.0, 2.0, (61,)), jnp.float32)
    opts = dict(class_weights=cw, label_smoothing=0.1, z_loss=1e-2, logit_softcap=4.0,
                reduction=reduction)

    def fused(h, w, b, weights):
        return linear_cross_entropy(h, w, y, bias=b, weights=weights, block_size=BLOCK,
                                    **opts)

    def naive(h, w, b, weights):
        return lossjax.cross_entropy(h @ w + b, y, weights=weights, **opts)

    v1, g1 = jax.value_and_grad(fused, argnums=(0, 1, 2, 3))(h, w, b, weights)
    v2, g2 = jax.value_and_grad(naive, argnums=(0, 1, 2, 3))(h, w, b, weights)
    _assert_close(v1, v2, rtol=1e-6)
    for name, a, c in zip(("hidden", "kernel", "bias", "weights"), g1, g2, strict=True):
        assert _rel(a, c) < 1e-5, (name, _rel(a, c))


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_return_lse(softcap):
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    where = jnp.asarray(rng.random(SHAPE) > 0.2)
    kw = dict(bias=b, logit_softcap=softcap, where=where, block_size=BLOCK)
    loss, lse = linear_cross_entropy(h, w, y, return_lse=True, **kw)
    assert lse.shape == SHAPE and lse.dtype == jnp.float32
    # Without return_lse the mean runs the token-block kernel's coefficient form: the
    # same value, summed in another order.
    np.testing.assert_allclose(loss, linear_cross_entropy(h, w, y, **kw), rtol=1e-6)
    logits = h @ w + b
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    kept = where & (y != -100)
    want = jnp.where(kept, jax.nn.logsumexp(logits, axis=-1), 0)
    _assert_close(lse, want, rtol=1e-6)
    # Gradients flow through the returned lse too (z-loss written by hand, say).
    r = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)

    def fused(h, w):
        loss, lse = linear_cross_entropy(h, w, y, return_lse=True, **kw)
        return loss + jnp.sum(r * lse**2)

    def naive(h, w):
        logits = h @ w + b
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        lse = jnp.where(kept, jax.nn.logsumexp(logits, axis=-1), 0)
        return lossjax.cross_entropy(logits, y, where=where) + jnp.sum(r * lse**2)

    grads = jax.grad(fused, (0, 1))(h, w), jax.grad(naive, (0, 1))(h, w)
    for a, c in zip(*grads, strict=True):
        assert _rel(a, c) < 1e-5


def test_matches_float64_numpy_reference():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    y = jnp.abs(y)  # no ignored token: the reference is the plain per-token loss
    want = ref.linear_cross_entropy(h, w, y, bias=b)
    got = linear_cross_entropy(h, w, y, bias=b, block_size=BLOCK, reduction="none")
    _assert_close(got, want, rtol=1e-5)
    np.testing.assert_allclose(linear_cross_entropy(h, w, y, bias=b), want.mean(),
                               rtol=1e-6)
    with jax.enable_x64(True):
        h64, w64, b64 = (jnp.asarray(a, jnp.float64) for a in (h, w, b))
        got64 = linear_cross_entropy(h64, w64, y, bias=b64, block_size=BLOCK,
                                     reduction="none")
        assert got64.dtype == jnp.float64
        np.testing.assert_allclose(got64, want, rtol=1e-12)


def test_check_grads_float64():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        h, w, b, y = _inputs(rng, shape=(6,), d=4, vocab=10, dtype=np.float64)
        cw = jnp.asarray(rng.uniform(0.5, 2.0, 10))
        weights = jnp.asarray(rng.uniform(0.5, 2.0, 6))

        def f(h, w, b, cw):
            return linear_cross_entropy(h, w, y, bias=b, class_weights=cw,
                                        weights=weights, label_smoothing=0.1,
                                        z_loss=0.01, logit_softcap=3.0, block_size=4)

        check_grads(f, (h, w, b, cw), order=1, modes=("rev",))


def test_bfloat16_inputs():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng, dtype=jnp.bfloat16)

    def f(h, w, b):
        return linear_cross_entropy(h, w, y, bias=b, block_size=BLOCK)

    loss, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(h, w, b)
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    # f32 accumulation: the loss equals the float32 loss of the same (bf16) numbers.
    h32, w32, b32 = (a.astype(jnp.float32) for a in (h, w, b))
    np.testing.assert_allclose(loss, lossjax.cross_entropy(h32 @ w32 + b32, y),
                               rtol=1e-5)
    # The gradient matmuls run in bf16 (as the unfused bf16 backward): 1e-2 relative.
    want = jax.grad(lambda h, w, b: lossjax.cross_entropy(h @ w + b, y),
                    argnums=(0, 1, 2))(h32, w32, b32)
    for g, g32 in zip(grads, want, strict=True):
        assert _rel(g, g32) < 1e-2


def test_jit_and_vmap():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    kw = dict(bias=b, label_smoothing=0.1, block_size=BLOCK, reduction="sum")
    eager = linear_cross_entropy(h, w, y, **kw)
    jitted = jax.jit(lambda h, w: linear_cross_entropy(h, w, y, **kw))(h, w)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    per_row = jax.vmap(lambda h, y: linear_cross_entropy(h, w, y, **kw))(h, y)
    batched = linear_cross_entropy(h, w, y, **{**kw, "reduction": "none"}).sum(-1)
    np.testing.assert_allclose(per_row, batched, rtol=1e-6)
    # vmap of the gradient too (per-example gradients of the kernel).
    def loss_w(w, h, y):
        return linear_cross_entropy(h, w, y, **kw)

    per_row_grad = jax.vmap(jax.grad(loss_w), in_axes=(None, 0, 0))(w, h, y)
    assert _rel(per_row_grad.sum(0), jax.grad(
        lambda w: linear_cross_entropy(h, w, y, **kw))(w)) < 1e-5


class VariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_under_variants(self):
        rng = np.random.default_rng(0)
        h, w, b, y = _inputs(rng, shape=(16,))
        kw = dict(bias=b, z_loss=1e-3, block_size=BLOCK)

        @self.variant
        def f(h, w):
            return linear_cross_entropy(h, w, y, **kw)

        np.testing.assert_allclose(f(h, w), linear_cross_entropy(h, w, y, **kw),
                                   rtol=1e-6)


def test_jit_with_tokens_sharded_stays_data_parallel():
    # Tokens sharded over 8 devices under plain jit (the trainer's data parallelism):
    # the loss-and-gradient kernel's token blocks must stay sharded, not be gathered
    # onto every device (which would repeat the whole computation 8 times).
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng, shape=(256,))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    tokens = jax.sharding.NamedSharding(mesh, P("data"))
    replicated = jax.sharding.NamedSharding(mesh, P())
    hs, ys = jax.device_put(h, tokens), jax.device_put(y, tokens)
    ws, bs = jax.device_put(w, replicated), jax.device_put(b, replicated)

    def f(h, w, b, y):
        return linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1,
                                    block_size=BLOCK)

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    assert "all-gather" not in step.lower(hs, ws, bs, ys).compile().as_text()
    (v1, g1), (v2, g2) = step(hs, ws, bs, ys), jax.value_and_grad(
        f, argnums=(0, 1, 2))(h, w, b, y)
    _assert_close(v1, v2, rtol=1e-6)
    for a, c in zip(g1, g2, strict=True):
        assert _rel(a, c) < 1e-5


def test_pmap_tokens_and_pmap_vocab_parallel():
    n = jax.device_count()
    assert n == 8
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng, shape=(n, 4), vocab=320)
    want = linear_cross_entropy(h, w, y, bias=b, reduction="sum", block_size=BLOCK)
    # Tokens split over devices.
    got = jax.pmap(lambda h, y: lax.psum(linear_cross_entropy(
        h, w, y, bias=b, reduction="sum", block_size=BLOCK), "d"), axis_name="d")(h, y)
    np.testing.assert_allclose(got, np.full(n, want), rtol=1e-5)
    # Vocab split over devices (axis_name), tokens replicated.
    w_shards = jnp.stack(jnp.split(w, n, axis=1))
    b_shards = jnp.stack(jnp.split(b, n))
    got = jax.pmap(lambda w, b: linear_cross_entropy(
        h, w, y, bias=b, reduction="sum", block_size=16, vocab_axis_name="d"),
        axis_name="d")(w_shards, b_shards)
    np.testing.assert_allclose(got, np.full(n, want), rtol=1e-5)


# --- no [tokens, vocab] buffer -------------------------------------------------------


def _subjaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def _all_shapes(jaxpr):
    for v in list(jaxpr.invars) + list(jaxpr.outvars) + list(jaxpr.constvars):
        yield getattr(v.aval, "shape", ())
    for eqn in jaxpr.eqns:
        for v in list(eqn.invars) + list(eqn.outvars):
            yield getattr(v.aval, "shape", ())
        for param in eqn.params.values():
            for sub in _subjaxprs(param):
                yield from _all_shapes(sub)


def _token_vocab_buffers(fn, *args, tokens, vocab):
    """Every value in fn's jaxpr that holds tokens x vocab entries (or more)."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [s for s in _all_shapes(jaxpr)
            if (tokens in s and vocab in s) or int(np.prod(s)) >= tokens * vocab]


def test_no_token_by_vocab_buffer_in_jaxpr():
    rng = np.random.default_rng(0)
    n, d, vocab, block = 96, 16, 320, 64  # block differs from N and V; d * V < N * V
    h, w, b, y = _inputs(rng, shape=(n,), d=d, vocab=vocab)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0,
              class_weights=jnp.ones(vocab))

    def fused(h, w, b):
        return linear_cross_entropy(h, w, y, bias=b, block_size=block, **kw)

    def naive(h, w, b):
        return lossjax.cross_entropy(h @ w + b, y, **kw)

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2))  # noqa: E731
    # The detector finds the unfused logits ...
    assert _token_vocab_buffers(grad(naive), h, w, b, tokens=n, vocab=vocab)
    # ... and nothing in the fused loss, forward or backward, nor value-only.
    assert not _token_vocab_buffers(grad(fused), h, w, b, tokens=n, vocab=vocab)
    assert not _token_vocab_buffers(fused, h, w, b, tokens=n, vocab=vocab)


def test_compiled_temp_memory_far_below_logits():
    n, d, vocab, block = 512, 16, 8192, 256
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp_bytes(f):
        vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        compiled = vg.lower(h, w, y).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = n * vocab * 4
    naive = temp_bytes(lambda h, w, y: lossjax.cross_entropy(h @ w, y))
    fused = temp_bytes(lambda h, w, y: linear_cross_entropy(h, w, y, block_size=block))
    assert naive >= logits_bytes  # the measurement sees the logits when they exist
    assert fused < logits_bytes / 4, (fused, logits_bytes)


def test_value_only_call_does_one_matmul():
    rng = np.random.default_rng(0)
    h, w, _, y = _inputs(rng, shape=(32,), vocab=256)

    def f(h, w):
        return linear_cross_entropy(h, w, y, block_size=64)  # 4 blocks, no remainder

    def dots(fn):
        # Matmuls in the program lowered for this backend (loop bodies count once;
        # of a platform-dependent choice only this platform's branch is lowered).
        return jax.jit(fn).lower(h, w).as_text().count("stablehlo.dot_general")

    assert dots(f) == 1  # the logits of a block, in the loop body
    # Loss and gradient of a "mean" loss, token block by token block: logits,
    # d hidden, d kernel (the unfused version does the same three).
    assert dots(jax.value_and_grad(f, argnums=(0, 1))) == 3

    # Per-token losses get per-token cotangents only in the backward pass, which
    # recomputes the logits: a fourth matmul.
    def per_token(h, w):
        return jnp.sum(linear_cross_entropy(h, w, y, block_size=64, reduction="none"))

    assert dots(jax.value_and_grad(per_token, argnums=(0, 1))) == 4


# --- vocab-parallel over a mesh -----------------------------------------------------


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
def test_shard_map_vocab_parallel_matches_single_device(mesh_shape):
    rng = np.random.default_rng(0)
    vocab = 320  # 40 or 80 columns per shard; block 32 leaves a partial block
    h, w, b, y = _inputs(rng, shape=(16,), d=16, vocab=vocab)
    y = y.at[5].set(vocab)  # an out-of-range label: NaN entry on every mesh
    cw = jnp.asarray(rng.uniform(0.5, 2.0, vocab), jnp.float32)
    where = jnp.asarray(rng.random(16) > 0.1).at[5].set(False)
    opts = dict(label_smoothing=0.1, z_loss=1e-2, logit_softcap=4.0, block_size=32)
    mesh = jax.make_mesh(mesh_shape, ("data", "model"),
                         axis_types=(AxisType.Auto, AxisType.Auto))

    def single(h, w, b, cw):
        return linear_cross_entropy(h, w, y, bias=b, class_weights=cw, where=where,
                                    reduction="sum", **opts)

    def sharded(h, w, b, cw):
        def local(h, w, b, cw, y, where):
            loss, lse = linear_cross_entropy(
                h, w, y, bias=b, class_weights=cw, where=where, reduction="sum",
                return_lse=True, vocab_axis_name="model", **opts)
            return lax.psum(loss, "data"), lse

        return jax.shard_map(
            local, mesh=mesh,
            in_specs=(P("data"), P(None, "model"), P("model"), P("model"), P("data"),
                      P("data")),
            out_specs=(P(), P("data")))(h, w, b, cw, y, where)

    (v1, g1) = jax.value_and_grad(single, argnums=(0, 1, 2, 3))(h, w, b, cw)
    (v2, lse), g2 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3),
                                               has_aux=True))(h, w, b, cw)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    for a, c in zip(g2, g1, strict=True):
        assert _rel(a, c) < 1e-5
    _, want_lse = linear_cross_entropy(h, w, y, bias=b, where=where, return_lse=True,
                                       **opts)
    _assert_close(lse, want_lse, rtol=1e-6)

    # "mean" over a vocab-only mesh (tokens replicated) equals the single-device mean.
    if mesh_shape[0] == 1:
        y_ok = jnp.where(where, y, -100)
        got = jax.jit(jax.shard_map(
            lambda w, b: linear_cross_entropy(h, w, y_ok, bias=b,
                                              vocab_axis_name="model", **opts),
            mesh=mesh, in_specs=(P(None, "model"), P("model")), out_specs=P()))(w, b)
        np.testing.assert_allclose(
            got, linear_cross_entropy(h, w, y_ok, bias=b, **opts), rtol=1e-6)


# --- contract: masking, bad values, bad inputs --------------------------------------


def test_masked_tokens_contribute_nothing_even_with_nan():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    where = jnp.ones(SHAPE, bool).at[0, 0].set(False).at[1, 2].set(False)
    bad_h = h.at[0, 0].set(jnp.nan).at[1, 2].set(jnp.inf)
    bad_y = y.at[0, 0].set(10**6)

    def f(h, w, b, reduction="mean"):
        return linear_cross_entropy(h, w, bad_y, bias=b, where=where, block_size=BLOCK,
                                    label_smoothing=0.1, reduction=reduction)

    loss, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(bad_h, w, b)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    assert not np.any(grads[0][0, 0]) and not np.any(grads[0][1, 2])
    per_token = f(bad_h, w, b, "none")
    assert per_token[0, 0] == 0 and per_token[1, 2] == 0
    # The same as dropping those tokens.
    keep = np.asarray(where & (y != -100)).reshape(-1)
    sliced = linear_cross_entropy(h.reshape(-1, D)[keep], w, y.reshape(-1)[keep],
                                  bias=b, label_smoothing=0.1, block_size=BLOCK)
    np.testing.assert_allclose(loss, sliced, rtol=1e-6)


def test_fully_masked_gives_zero_and_zero_grads():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    f = lambda h, w: linear_cross_entropy(h, w, y, where=jnp.zeros(SHAPE, bool))  # noqa
    loss, grads = jax.value_and_grad(f, argnums=(0, 1))(h, w)
    assert loss == 0 and all(not np.any(g) for g in grads)


def test_out_of_range_label_is_nan_entry():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    for bad in (V, -1):
        got = linear_cross_entropy(h, w, y.at[2, 2].set(bad), reduction="none")
        assert np.isnan(got[2, 2])
        others = np.ones(SHAPE, bool)
        others[2, 2] = False
        clean = linear_cross_entropy(h, w, y, reduction="none")
        np.testing.assert_array_equal(got[others], clean[others])


def test_finite_at_extreme_logits():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    h = h / jnp.abs(h @ w).max(axis=-1, keepdims=True) * 1e4  # |logits| up to 1e4
    for opts in ({}, dict(z_loss=1e-4, label_smoothing=0.1, logit_softcap=30.0)):
        loss, grads = jax.value_and_grad(
            lambda h, w, opts=opts: linear_cross_entropy(h, w, y, block_size=BLOCK,
                                                         **opts),
            argnums=(0, 1))(h, w)
        assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng)
    with pytest.raises(TypeError, match="labels"):
        linear_cross_entropy(h, w, y.astype(jnp.float32))
    with pytest.raises(TypeError, match="hidden"):
        linear_cross_entropy(y, w, y)
    with pytest.raises(ValueError, match="kernel"):
        linear_cross_entropy(h, w[:-1], y)
    with pytest.raises(ValueError, match="kernel must have rank 2"):
        linear_cross_entropy(h, w[None], y)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:, :-1])
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, y, bias=b[:-1])
    with pytest.raises(ValueError, match="class_weights"):
        linear_cross_entropy(h, w, y, class_weights=jnp.ones(V + 1))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="block_size"):
        linear_cross_entropy(h, w, y, block_size=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="logit_softcap"):
        linear_cross_entropy(h, w, y, logit_softcap=0.0)
    with pytest.raises(ValueError, match="where"):
        linear_cross_entropy(h, w, y, where=jnp.ones((3,), bool))
    with pytest.raises(TypeError, match="where"):
        linear_cross_entropy(h, w, y, where=jnp.ones(SHAPE))


def test_checked_mode_catches_bad_values():
    rng = np.random.default_rng(0)
    h, w, b, y = _inputs(rng, shape=(4,))
    fn = lossjax.checked(
        lambda *a, **k: linear_cross_entropy(*a, block_size=BLOCK, **k))
    assert np.isfinite(fn(h, w, y))
    bad_h = h.at[1, 0].set(jnp.nan)
    with pytest.raises(AssertionError, match="linear_cross_entropy: hidden must be"):
        fn(bad_h, w, y)
    with pytest.raises(AssertionError, match="linear_cross_entropy: kernel must be"):
        fn(h, w.at[0, 0].set(jnp.inf), y)
    with pytest.raises(AssertionError, match="labels must lie in"):
        fn(h, w, y.at[2].set(V))
    # An excluded entry may hold anything.
    where = jnp.array([True, False, True, True])
    assert np.isfinite(fn(bad_h, w, y.at[1].set(V), where=where))


def test_registered():
    assert lossjax.get("linear_cross_entropy") is linear_cross_entropy
    assert lossjax.family_of("linear_cross_entropy") == "large_vocab"


# --- across devices: batch axis, vocab axis, both ----------------------------------

DEV_D, DEV_V = 16, 96  # 12 vocab columns per shard of 8, 24 of 4; block 8: partial


def _device_inputs(rng, tokens, *, shards, masked_shard):
    """Inputs with different data, masks and weights per token shard, one shard's
    tokens all masked (and one ignored label), float32 NumPy class weights."""
    h, w, b, y = _inputs(rng, shape=(tokens,), d=DEV_D, vocab=DEV_V)
    where = rng.random(tokens) > 0.25
    per = tokens // shards
    where[masked_shard * per:(masked_shard + 1) * per] = False
    weights = jnp.asarray(rng.uniform(0.0, 2.0, tokens), jnp.float32)
    cw = rng.uniform(0.5, 2.0, DEV_V).astype(np.float32)  # NumPy on purpose
    return h, w, b, y, jnp.asarray(where), weights, cw


def _reference(h, w, b, y, where, weights, cw, reduction, **opts):
    """float64 (value, kept weight) of the global batch."""
    loss, norm = ref.linear_cross_entropy_options(h, w, y, bias=b, class_weights=cw,
                                                  **opts)
    kept = np.asarray(where) & (np.asarray(y) != -100)
    total = ref.reduce(loss, kept=kept, weights=weights, reduction="sum")
    count = np.sum(np.where(kept, np.asarray(weights) * norm, 0))
    if reduction == "none":
        return ref.reduce(loss, kept=kept, weights=weights, reduction="none")
    return {"sum": total, "mean": total / count, "sum_and_weight": (total, count)}[
        reduction]


DEV_OPTS = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0, block_size=8)


def test_shard_map_tokens_sharded_sum_issue_shapes():
    # ISSUE 11's report, as written: hidden [256, 32], kernel [32, 300], tokens over
    # "data", the local "sum" psummed. It came out 8 times the single-device value,
    # and its gradient did not trace.
    rng = np.random.default_rng(12)
    h, w, _, y = _inputs(rng, shape=(256,))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    f = jax.shard_map(
        lambda h, w, y: lax.psum(linear_cross_entropy(h, w, y, reduction="sum"),
                                 "data"),
        mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P())
    kept = np.asarray(y) != -100
    want = ref.linear_cross_entropy(h[kept], w, y[kept]).sum()
    np.testing.assert_allclose(jax.jit(f)(h, w, y), want, rtol=1e-5)
    got = jax.jit(jax.grad(f, argnums=(0, 1)))(h, w, y)
    single = jax.grad(lambda h, w: linear_cross_entropy(h, w, y, reduction="sum"),
                      argnums=(0, 1))(h, w)
    for a, c in zip(got, single, strict=True):
        assert _rel(a, c) < 1e-5


@pytest.mark.parametrize("with_axis_name", [False, True])
def test_shard_map_tokens_sharded_matches_single_device(with_axis_name):
    # ISSUE 11: with the tokens sharded over "data" and no vocab axis, the per-token
    # coefficients were taken at device-invariant zeros (summed over the mesh: the
    # psummed "sum" came out 8 times the single-device one) and the gradient did not
    # trace. Replicated kernel, bias and class weights; the gradient of a replicated
    # kernel is summed by shard_map itself.
    rng = np.random.default_rng(3)
    h, w, b, y, where, weights, cw = _device_inputs(rng, 64, shards=8, masked_shard=2)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    axis = "data" if with_axis_name else None

    def sharded(reduction):
        def local(h, w, b, y, where, weights):
            out = linear_cross_entropy(h, w, y, bias=b, class_weights=cw, where=where,
                                       weights=weights, reduction=reduction,
                                       axis_name=axis, **DEV_OPTS)
            if axis is None and reduction != "none":  # local sums: reduce by hand
                out = lax.psum(out, "data")
            return out

        tokens = P("data")
        out = P("data") if reduction == "none" else P()
        return jax.shard_map(local, mesh=mesh, in_specs=(tokens, P(), P(), tokens,
                                                         tokens, tokens),
                             out_specs=out)

    def single(reduction):
        return lambda h, w, b: linear_cross_entropy(
            h, w, y, bias=b, class_weights=cw, where=where, weights=weights,
            reduction=reduction, **DEV_OPTS)

    reductions = ["none", "sum", "sum_and_weight"] + (["mean"] if axis else [])
    for reduction in reductions:
        got = jax.jit(sharded(reduction))(h, w, b, y, where, weights)
        want = _reference(h, w, b, y, where, weights, cw, reduction, **{
            k: v for k, v in DEV_OPTS.items() if k != "block_size"})
        if reduction == "sum_and_weight":
            for g_, w_ in zip(got, want, strict=True):
                np.testing.assert_allclose(g_, w_, rtol=1e-5)
            got = got[0] / got[1]
            want = want[0] / want[1]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Gradients of the global loss w.r.t. hidden, kernel and bias vs one device.
    reduction = "mean" if axis else "sum"
    g_sharded = jax.jit(jax.grad(
        lambda h, w, b: sharded(reduction)(h, w, b, y, where, weights),
        argnums=(0, 1, 2)))(h, w, b)
    g_single = jax.grad(single(reduction), argnums=(0, 1, 2))(h, w, b)
    names = ("hidden", "kernel", "bias")
    for name, a, c in zip(names, g_sharded, g_single, strict=True):
        assert _rel(a, c) < 1e-5, (name, _rel(a, c))
    masked = np.asarray(~where)
    assert not np.any(np.asarray(g_sharded[0])[masked])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_d_mesh_batch_and_vocab_axes_at_once(reduction):
    # Tokens over "data" (axis_name), the kernel, bias and class weights over "model"
    # (vocab_axis_name) on a 2 x 4 mesh; a traced, replicated logit_softcap too.
    rng = np.random.default_rng(4)
    h, w, b, y, where, weights, cw = _device_inputs(rng, 32, shards=2, masked_shard=1)
    y = y.at[7].set(DEV_V - 1).at[9].set(0)  # labels in the first and last shards
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(AxisType.Auto, AxisType.Auto))
    opts = dict(label_smoothing=0.1, z_loss=1e-3, block_size=8)
    cw = jnp.asarray(cw)

    def local(h, w, b, cw, cap, y, where, weights):
        return linear_cross_entropy(
            h, w, y, bias=b, class_weights=cw, logit_softcap=cap, where=where,
            weights=weights, reduction=reduction, axis_name="data",
            vocab_axis_name="model", **opts)

    def sharded(h, w, b, cw, cap):
        tokens, vocab = P("data"), P("model")
        return jax.shard_map(local, mesh=mesh, in_specs=(
            tokens, P(None, "model"), vocab, vocab, P(), tokens, tokens, tokens),
            out_specs=P())(h, w, b, cw, cap, y, where, weights)

    def single(h, w, b, cw, cap):
        return linear_cross_entropy(h, w, y, bias=b, class_weights=cw,
                                    logit_softcap=cap, where=where, weights=weights,
                                    reduction=reduction, **opts)

    cap = jnp.float32(4.0)
    args = (h, w, b, cw, cap)
    v2, g2 = jax.jit(jax.value_and_grad(sharded, argnums=range(5)))(*args)
    v1, g1 = jax.value_and_grad(single, argnums=range(5))(*args)
    want = _reference(h, w, b, y, where, weights, cw, reduction, logit_softcap=4.0,
                      label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(v2, want, rtol=1e-5)
    np.testing.assert_allclose(v1, want, rtol=1e-5)
    for name, a, c in zip(("hidden", "kernel", "bias", "class_weights", "softcap"),
                          g2, g1, strict=True):
        assert _rel(a, c) < 1e-5, (name, _rel(a, c))
    # "none" stays local: each device's tokens, in the loss shape.
    none = jax.jit(jax.shard_map(
        lambda h, w, b, cw, y, where, weights: linear_cross_entropy(
            h, w, y, bias=b, class_weights=cw, logit_softcap=4.0, where=where,
            weights=weights, reduction="none", axis_name="data",
            vocab_axis_name="model", **opts),
        mesh=mesh, in_specs=(P("data"), P(None, "model"), P("model"), P("model"),
                             P("data"), P("data"), P("data")),
        out_specs=P("data")))(h, w, b, cw, y, where, weights)
    _assert_close(none, _reference(h, w, b, y, where, weights, cw, "none",
                                   logit_softcap=4.0, label_smoothing=0.1,
                                   z_loss=1e-3), rtol=1e-5)


def test_pmap_token_parallel_values_and_gradients():
    # axis_name under pmap: the global mean on every device; each device's hidden
    # gradient is its slice of the global one, and its kernel gradient its share
    # (psum of the shares = the global kernel gradient).
    n = 8
    rng = np.random.default_rng(5)
    h, w, b, y, where, weights, cw = _device_inputs(rng, 64, shards=n, masked_shard=5)
    split = lambda x: x.reshape((n, -1) + x.shape[1:])  # noqa: E731

    def loss(h, w, b, y, where, weights, axis_name=None, reduction="mean"):
        return linear_cross_entropy(h, w, y, bias=b, class_weights=cw, where=where,
                                    weights=weights, reduction=reduction,
                                    axis_name=axis_name, **DEV_OPTS)

    def per_device(h, w, b, y, where, weights):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 5))(
            h, w, b, y, where, weights, axis_name="d")
        pair = loss(h, w, b, y, where, weights, axis_name="d",
                    reduction="sum_and_weight")
        return value, grads[0], lax.psum(grads[1:3], "d"), grads[3], pair

    value, dh, (dw, db), dweights, pair = jax.pmap(
        per_device, axis_name="d", in_axes=(0, None, None, 0, 0, 0))(
        split(h), w, b, split(y), split(where), split(weights))
    want_value, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 5))(
        h, w, b, y, where, weights)
    # The per-token weights reach the mean through the kernel's coefficients and the
    # global normalizer: each device's slice of the global gradient.
    assert _rel(dweights.reshape(-1), want_grads[3]) < 1e-5
    ref_total, ref_count = _reference(h, w, b, y, where, weights, cw,
                                      "sum_and_weight", label_smoothing=0.1,
                                      z_loss=1e-3, logit_softcap=4.0)
    np.testing.assert_allclose(value, np.full(n, ref_total / ref_count), rtol=1e-5)
    np.testing.assert_allclose(pair[0], np.full(n, ref_total), rtol=1e-5)
    np.testing.assert_allclose(pair[1], np.full(n, ref_count), rtol=1e-6)
    assert _rel(dh.reshape(h.shape), want_grads[0]) < 1e-5
    for d in range(n):
        assert _rel(dw[d], want_grads[1]) < 1e-5 and _rel(db[d], want_grads[2]) < 1e-5


def test_pmap_vocab_parallel_values_and_gradients():
    # ISSUE 11: the vocab-parallel path under pmap had the right value but 8 times the
    # kernel gradient (the transposes of its psums). Each device's kernel and bias
    # gradients are its slice of the single-device ones; the hidden states, which
    # every device holds, get one share per device (psum = the global gradient).
    n = 8
    rng = np.random.default_rng(6)
    h, w, b, y, where, weights, cw = _device_inputs(rng, 24, shards=2, masked_shard=0)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0, block_size=8)
    shard = lambda x: jnp.stack(jnp.split(jnp.asarray(x), n, axis=-1))  # noqa: E731

    def loss(h, w, b, cw, vocab_axis_name=None):
        return linear_cross_entropy(h, w, y, bias=b, class_weights=cw, where=where,
                                    weights=weights, vocab_axis_name=vocab_axis_name,
                                    **opts)

    def per_device(h, w, b, cw):
        value, (dh, dw, db, dcw) = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(
            h, w, b, cw, vocab_axis_name="d")
        return value, lax.psum(dh, "d"), dw, db, dcw

    value, dh, dw, db, dcw = jax.pmap(per_device, axis_name="d",
                                      in_axes=(None, 0, 0, 0))(
        h, shard(w), shard(b), shard(cw))
    want_value, want = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(h, w, b, cw)
    np.testing.assert_allclose(value, np.full(n, _reference(
        h, w, b, y, where, weights, cw, "mean", label_smoothing=0.1, z_loss=1e-3,
        logit_softcap=4.0)), rtol=1e-5)
    for d in range(n):
        assert _rel(dh[d], want[0]) < 1e-5
    assert _rel(jnp.concatenate(list(dw), axis=1), want[1]) < 1e-5
    assert _rel(jnp.concatenate(list(db)), want[2]) < 1e-5
    assert _rel(jnp.concatenate(list(dcw)), want[3]) < 1e-5


def test_numpy_class_weights_everywhere():
    # ISSUE 11: return_lse with NumPy class weights under jit raised
    # TracerArrayConversionError; every path takes them now (token-sharded
    # shard_map with NumPy class weights: the tests above).
    rng = np.random.default_rng(7)
    h, w, b, y, where, weights, cw = _device_inputs(rng, 16, shards=2, masked_shard=0)
    base = dict(bias=b, where=where, label_smoothing=0.1, block_size=8)
    want_none = _reference(h, w, b, y, where, np.ones(16), cw, "none",
                           label_smoothing=0.1)
    want_mean = _reference(h, w, b, y, where, np.ones(16), cw, "mean",
                           label_smoothing=0.1)
    for kw in (dict(reduction="none"), dict(reduction="mean"),
               dict(reduction="mean", return_lse=True)):
        out = jax.jit(lambda h, w, kw=kw: linear_cross_entropy(
            h, w, y, class_weights=cw, **base, **kw))(h, w)
        got = out[0] if kw.get("return_lse") else out
        want = want_none if kw["reduction"] == "none" else want_mean
        _assert_close(got, want, rtol=1e-5)


# --- hyperparameters ---------------------------------------------------------------


def test_hyperparameters_out_of_range_raise_naming_the_range():
    rng = np.random.default_rng(0)
    h, w, _, y = _inputs(rng, shape=(4,))
    in_unit = r"label_smoothing must be in \[0, 1\]"
    for kw, msg in ((dict(label_smoothing=-0.1), in_unit),
                    (dict(label_smoothing=1.5), in_unit),
                    (dict(z_loss=-1e-3), "z_loss must be >= 0"),
                    (dict(logit_softcap=0.0), "logit_softcap must be > 0"),
                    (dict(logit_softcap=-3.0), "logit_softcap must be > 0")):
        with pytest.raises(ValueError, match=msg):
            linear_cross_entropy(h, w, y, **kw)


HYPER = dict(label_smoothing=0.2, z_loss=0.05, logit_softcap=3.0)
# "mean": the token-block kernel; "none" (summed against a cotangent): vocab blocks.
HYPER_PATHS = ("mean", "none")


@pytest.mark.parametrize("path", HYPER_PATHS)
def test_traced_hyperparameters_under_jit_equal_python_numbers(path):
    rng = np.random.default_rng(8)
    h, w, b, y = _inputs(rng, shape=(12,), d=8, vocab=40)
    cw = rng.uniform(0.5, 2.0, 40).astype(np.float32)
    kw = dict(bias=b, class_weights=cw, block_size=16, reduction=path)
    want = linear_cross_entropy(h, w, y, **kw, **HYPER)
    for name in HYPER:
        traced = jax.jit(lambda v, name=name: linear_cross_entropy(
            h, w, y, **kw, **{**HYPER, name: v}))(jnp.float32(HYPER[name]))
        _assert_close(traced, want, rtol=1e-6)


@pytest.mark.parametrize("path", HYPER_PATHS)
def test_hyperparameter_gradients_match_float64_finite_differences(path):
    rng = np.random.default_rng(9)
    with jax.enable_x64(True):
        h, w, b, y = _inputs(rng, shape=(12,), d=8, vocab=40, dtype=np.float64)
        y = y.at[3].set(7)
        cw = rng.uniform(0.5, 2.0, 40)
        weights = rng.uniform(0.5, 2.0, 12)
        cot = rng.normal(size=12)

        def fused(name, v):
            out = linear_cross_entropy(h, w, y, bias=b, class_weights=cw,
                                       weights=weights, block_size=16, reduction=path,
                                       **{**HYPER, name: v})
            return out if path == "mean" else jnp.sum(out * cot)

        def reference(name, v):
            loss, norm = ref.linear_cross_entropy_options(
                h, w, y, bias=b, class_weights=cw, **{**HYPER, name: v})
            if path == "mean":
                return np.sum(weights * loss) / np.sum(weights * norm)
            return np.sum(weights * loss * cot)

        for name, v in HYPER.items():
            grad = jax.jit(jax.grad(lambda v, name=name: fused(name, v)))(
                jnp.float64(v))
            eps = 1e-6
            fd = (reference(name, v + eps) - reference(name, v - eps)) / (2 * eps)
            assert np.isfinite(grad)
            np.testing.assert_allclose(grad, fd, rtol=1e-6, err_msg=name)


def test_sum_and_weight_matches_reference():
    rng = np.random.default_rng(10)
    h, w, b, y, where, weights, cw = _device_inputs(rng, 16, shards=2, masked_shard=0)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0)
    want = _reference(h, w, b, y, where, weights, cw, "sum_and_weight", **opts)
    for return_lse in (False, True):  # token blocks / vocab blocks
        out = linear_cross_entropy(h, w, y, bias=b, class_weights=cw, where=where,
                                   weights=weights, reduction="sum_and_weight",
                                   return_lse=return_lse, block_size=8, **opts)
        total, count = out[0] if return_lse else out
        np.testing.assert_allclose(total, want[0], rtol=1e-5)
        np.testing.assert_allclose(count, want[1], rtol=1e-6)


def test_checked_mode_with_documented_keywords():
    rng = np.random.default_rng(11)
    h, w, b, y, where, weights, cw = _device_inputs(rng, 16, shards=2, masked_shard=0)
    fn = lossjax.checked(linear_cross_entropy)
    kw = dict(bias=b, class_weights=cw, where=where, weights=weights, block_size=8,
              label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0, ignore_index=-100)
    for reduction in ("none", "mean", "sum_and_weight"):
        got = fn(h, w, y, reduction=reduction, **kw)
        want = _reference(h, w, b, y, where, weights, cw, reduction,
                          label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0)
        for g, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            _assert_close(g, c, rtol=1e-5)
    loss, lse = fn(h, w, y, return_lse=True, **kw)
    assert np.isfinite(loss) and lse.shape == (16,)
    kept = np.flatnonzero(np.asarray(where) & (np.asarray(y) != -100))
    with pytest.raises(AssertionError, match="labels must lie in"):
        fn(h, w, y.at[kept[0]].set(DEV_V), **kw)


# --- the cross-device matrix (tests/test_matrix.py) --------------------------------


def _matrix_data(rng, batch):
    return (rng.normal(size=(batch, 8)).astype(np.float32),
            rng.normal(0.0, 0.5, (8, 40)).astype(np.float32),
            rng.integers(0, 40, batch).astype(np.int32))


def _matrix_head(rng):
    return dict(bias=rng.normal(size=40).astype(np.float32),
                class_weights=rng.uniform(0.5, 2.0, 40).astype(np.float32))


MATRIX_CASES = [
    # block_size 16: two full vocab blocks and a partial one.
    MatrixCase("linear_cross_entropy", _matrix_data, kwargs=dict(block_size=16),
               replicated=(1,), id="plain"),
    MatrixCase("linear_cross_entropy", _matrix_data,
               kwargs=dict(block_size=16, **HYPER), replicated_kwargs=_matrix_head,
               replicated=(1,), traced=HYPER, id="options"),
]
