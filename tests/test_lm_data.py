"""Tests of the language-model data (experiments/lm_data.py) and the Transformer.

The corpus tests use a few documents (`max_files`) so they run in seconds; the split
tests list the whole standard library, which needs no tokenizing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lossjax
from experiments import lm_data, models

SMALL = dict(vocab_size=512, seq_len=16, max_files=12, test_fraction=0.2)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_cache")


@pytest.fixture(scope="module")
def small(cache_dir):
    return lm_data.load(cache_dir, **SMALL)


def _sample_texts():
    root = lm_data._stdlib_root()
    names = ["textwrap.py", "json/decoder.py", "colorsys.py"]
    return [(root / n).read_text(encoding="utf-8") for n in names]


# --- tokenizer ------------------------------------------------------------------------


def test_split_tokens_joins_back_exactly():
    tricky = ("def f(x):\n\tif x  >= 1_000:  # café\n        return x**2\f\n"
              "  \n\u00a0y = '<bos>'  \n")
    for text in _sample_texts() + [tricky]:
        tokens = lm_data.split_tokens(text)
        assert "".join(tokens) == text
    tokens = lm_data.split_tokens("    def foo(self):\n        return 1.5\n")
    # The last space of a run joins the word after it (GPT-2's convention).
    assert tokens == ["   ", " def", " foo", "(", "self", "):", "\n        ",
                      "return", " 1", ".", "5", "\n"]
    # Special-token text in a document is ordinary characters, never a special id.
    assert "<bos>" not in lm_data.split_tokens("x = '<bos>'")


def test_tokenizer_round_trip_vocab_size_and_determinism():
    texts = _sample_texts()
    big = lm_data.Tokenizer.train(texts, vocab_size=20000)
    assert big.vocab_size == 20000 and big.vocab[:4] == lm_data.SPECIALS
    for text in texts:
        ids = big.encode(text, bos_eos=True)
        assert ids.dtype == np.int32 and ids[0] == lm_data.BOS_ID
        assert ids[-1] == lm_data.EOS_ID and lm_data.UNK_ID not in ids
        assert big.decode(ids) == text
    # Fewer distinct tokens than the vocabulary: placeholders fill it up.
    assert big.vocab[-1].startswith("<unused:")

    small = lm_data.Tokenizer.train(texts, vocab_size=64)
    assert small.vocab_size == 64
    # The same vocabulary whatever the document order (ties broken by text).
    assert lm_data.Tokenizer.train(texts[::-1], vocab_size=64).vocab == small.vocab
    counts = {}
    for text in texts:
        for t in lm_data.split_tokens(text):
            counts[t] = counts.get(t, 0) + 1
    kept = [counts[t] for t in small.vocab[4:]]
    assert kept == sorted(kept, reverse=True)
    assert max(c for t, c in counts.items() if t not in small.vocab) <= kept[-1]
    ids = small.encode(texts[0])
    assert ids.max() < 64
    # Out-of-vocabulary tokens become <unk>; the rest decode to themselves.
    tokens = lm_data.split_tokens(texts[0])
    expect = "".join(t if t in small.vocab else "<unk>" for t in tokens)
    assert small.decode(ids) == expect and lm_data.UNK_ID in ids


# --- split, windows, batches ----------------------------------------------------------


def test_split_is_disjoint_deterministic_and_by_name():
    files = lm_data._source_files(lm_data._stdlib_root())
    names = [n for n, _ in files]
    assert names and not any(n.startswith(("test/", "site-packages/")) for n in names)
    sizes = [(n, 1) for n in names] + [
        (f"pydoc_data.topics:{k}", 1) for k in lm_data._topics()]
    train, test = lm_data._select(sizes, 0.05, None, None)
    train_n, test_n = {n for n, _ in train}, {n for n, _ in test}
    assert not train_n & test_n and len(train_n | test_n) == len(sizes)
    assert 0.02 < len(test_n) / len(sizes) < 0.09
    # Deterministic, and a property of the name alone (not of the list or order).
    again = lm_data._select(sizes[::-1], 0.05, None, None)
    assert again == (train, test)
    sub_train, sub_test = lm_data._select(sizes[:200], 0.05, None, None)
    assert {n for n, _ in sub_test} == test_n & {n for n, _ in sizes[:200]}
    # A smoke selection draws from the same split, with both sides non-empty.
    few_train, few_test = lm_data._select(sizes, 0.05, 10, None)
    assert len(few_train) == 9 and len(few_test) == 1
    assert {n for n, _ in few_test} <= test_n and {n for n, _ in few_train} <= train_n


def test_windows_and_batches_are_pure_functions():
    tokens = np.arange(1000, dtype=np.int32)
    x, y = lm_data.windows(tokens, 16)
    assert x.shape == y.shape == (62, 16)
    np.testing.assert_array_equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])
    a = lm_data.batch(tokens, seed=3, step=7, batch_size=8, seq_len=16)
    b = lm_data.batch(tokens, seed=3, step=7, batch_size=8, seq_len=16)
    c = lm_data.batch(tokens, seed=3, step=8, batch_size=8, seq_len=16)
    d = lm_data.batch(tokens, seed=4, step=7, batch_size=8, seq_len=16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    assert a[0].shape == (8, 16) and a[0].dtype == np.int32
    np.testing.assert_array_equal(a[1], a[0] + 1)  # consecutive tokens, shifted


# --- the data set and its cache -------------------------------------------------------


def test_load_small_corpus(small):
    v = SMALL["vocab_size"]
    assert small.num_classes == small.vocab_size == v
    assert small.x_train.dtype == small.y_train.dtype == np.int32
    assert small.x_train.shape[1:] == small.x_test.shape[1:] == (SMALL["seq_len"],)
    assert len(small.x_train) > 10 and len(small.x_test) >= 1
    for tokens in (small.train_tokens, small.test_tokens):
        assert tokens.dtype == np.int32 and 0 <= tokens.min() and tokens.max() < v
        assert tokens[0] == lm_data.BOS_ID and tokens[-1] == lm_data.EOS_ID
        assert lm_data.PAD_ID not in tokens
    np.testing.assert_array_equal(small.x_train[:, 1:], small.y_train[:, :-1])
    np.testing.assert_array_equal(small.x_train.reshape(-1)[1:],
                                  small.y_train.reshape(-1)[:-1])
    s = small.stats
    assert s["train_docs"] + s["test_docs"] == SMALL["max_files"]
    assert s["train_tokens"] == small.train_tokens.size
    n_docs = np.sum(small.train_tokens == lm_data.BOS_ID)
    assert n_docs == s["train_docs"] == np.sum(small.train_tokens == lm_data.EOS_ID)
    # The vocabulary comes from the training documents: every token it holds appears
    # in the training stream.
    assert set(np.unique(small.train_tokens).tolist()) >= set(range(4, v))
    text = small.tokenizer.decode(small.train_tokens[:400])
    assert "<pad>" not in text and len(text) > 400


def test_cache_hit_returns_identical_arrays(small, cache_dir):
    files = list(cache_dir.glob("lm_*.npz"))
    assert len(files) == 1 and not list(cache_dir.glob("*.tmp*"))
    again = lm_data.load(cache_dir, **SMALL)
    assert again.stats["cache_hit"] and not small.stats["cache_hit"]
    for field in ("train_tokens", "test_tokens", "x_train", "y_test"):
        np.testing.assert_array_equal(getattr(again, field), getattr(small, field))
    assert again.vocab == small.vocab
    # Other settings, another cache entry; the same tokens as without a cache.
    other = lm_data.load(cache_dir, **{**SMALL, "vocab_size": 256})
    assert len(list(cache_dir.glob("lm_*.npz"))) == 2 and other.vocab_size == 256
    assert other.vocab == small.vocab[:256]
    fresh = lm_data.load(None, **SMALL)
    np.testing.assert_array_equal(fresh.train_tokens, small.train_tokens)


def test_max_bytes_and_max_test_windows():
    data = lm_data.load(None, vocab_size=300, seq_len=8, max_bytes=30_000,
                        test_fraction=0.1, max_test_windows=5)
    assert data.stats["train_chars"] + data.stats["test_chars"] <= 30_000
    assert data.stats["train_chars"] > 20_000 and data.stats["test_chars"] > 1000
    assert data.x_test.shape == (5, 8) and data.vocab_size == 300


# --- the model ------------------------------------------------------------------------

VOCAB = 300
MODEL_CASES = [
    dict(positions="rope", tie_embeddings=False, dtype="float32"),
    dict(positions="learned", tie_embeddings=True, dtype="bfloat16"),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c["positions"])
def test_transformer(case):
    case = dict(case)
    dtype = jnp.dtype(case.pop("dtype"))
    model = models.create("transformer", num_outputs=VOCAB, dtype=dtype,
                          num_layers=2, d_model=32, num_heads=4, max_len=64, **case)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 12)),
                         jnp.int32)
    boxed = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    # Logical axis names for the mesh rules (experiments.sharding), then plain arrays.
    names = nn.get_partition_spec(boxed)
    assert tuple(names["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(names["block_0"]["mlp_in"]["kernel"]) == ("embed", "mlp")
    assert tuple(names["block_0"]["query"]["kernel"]) == ("embed", "heads", "head_dim")
    params = nn.unbox(boxed)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert ("head" in params) == (not case["tie_embeddings"])
    assert ("pos_embed" in params) == (case["positions"] == "learned")
    apply = jax.jit(model.apply, static_argnames="return_hidden")

    logits = apply({"params": params}, tokens)
    hidden, kernel = apply({"params": params}, tokens, return_hidden=True)
    assert logits.shape == (2, 12, VOCAB) and logits.dtype == dtype
    assert hidden.shape == (2, 12, 32) and kernel.shape == (32, VOCAB)
    assert hidden.dtype == kernel.dtype == dtype
    if case["tie_embeddings"]:
        np.testing.assert_array_equal(
            kernel, params["embed"]["embedding"].T.astype(dtype))
    np.testing.assert_allclose(np.asarray(hidden @ kernel, np.float32),
                               np.asarray(logits, np.float32), rtol=1e-6, atol=1e-6)
    # Small initial logits: the initial loss is about log(vocab).
    ce = lossjax.cross_entropy(logits, tokens)
    assert abs(float(ce) - np.log(VOCAB)) < 0.1
    fused = lossjax.linear_cross_entropy(hidden, kernel, tokens)
    np.testing.assert_allclose(float(fused), float(ce), rtol=1e-2 if
                               dtype == jnp.bfloat16 else 1e-5)

    # Causal: changing token 7 changes no output before position 7.
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % VOCAB)
    other = apply({"params": params}, changed)
    np.testing.assert_array_equal(other[:, :7], logits[:, :7])
    assert not np.array_equal(other[:, 7:], logits[:, 7:])


def test_transformer_bad_settings():
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="num_heads"):
        models.create("transformer", num_outputs=10, dtype="float32", d_model=30,
                      num_heads=4).init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="max_len"):
        models.create("transformer", num_outputs=10, dtype="float32", d_model=8,
                      num_heads=2, positions="learned", max_len=4).init(
            jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="positions"):
        models.create("transformer", num_outputs=10, dtype="float32", d_model=8,
                      num_heads=2, positions="alibi").init(jax.random.key(0), tokens)
