"""Language-model data: CPython's own standard-library source, word-level tokens.

The corpus is text that ships with the interpreter running the code (nothing is
downloaded): every `.py` file under `sysconfig.get_paths()["stdlib"]` except
`site-packages` / `dist-packages` and the test suites (`test/`, `tests/`,
`idle_test/` directories: 1,000+ files of fixtures that would double the corpus), plus
each topic of `pydoc_data.topics` (the reference manual's text that `help()` prints)
as its own document. `pydoc_data/topics.py` itself is left out: it holds the same
topics as escaped string literals. On CPython 3.11 that is about 12.6 MB.

Tokens (`Tokenizer`): a regex splits the text into identifiers and words with one
optional leading space (GPT-2's convention: " self" and "self" are different tokens,
so most spaces cost nothing), numbers (also with a leading space), runs of
punctuation/symbols, a newline together with the next line's indentation, other
space runs and single whitespace characters. Joining the pieces gives the text back
exactly. The vocabulary is `<pad>`, `<unk>`, `<bos>`, `<eos>` (ids 0-3), then the
most frequent training-split tokens (ties by the token's text), `vocab_size` in all;
everything else maps to `<unk>`. Each document is `<bos> tokens <eos>`, and the
documents of a split are concatenated into one int32 stream.

Held-out documents: a document is a test document when the CRC-32 of its name (its
path relative to the standard library, or `pydoc_data.topics:<topic>`) falls in the
lowest `test_fraction` of the hash range: deterministic, the same on every machine,
and independent of the training seed. The vocabulary is built from the training
documents only.

Tokenizing takes about 2 s on one core; `load` caches the result as .npz in
`cache_dir`, keyed by the settings, the Python version and the files' sizes.

    data = lm_data.load("runs/lm_cache", vocab_size=32768, seq_len=256)
    data.x_train, data.y_train  # int32 [num_windows, seq_len]: inputs, next tokens
    x, y = lm_data.batch(data.train_tokens, seed=0, step=7, batch_size=32, seq_len=256)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import re
import sys
import sysconfig
import time
import zlib

import numpy as np

from experiments.dataset import Dataset

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

# Alternatives are tried in order at each position; together they match every
# character, so "".join(findall(text)) == text.
_TOKEN = re.compile(
    r"\n[ \t]*"          # newline + the next line's indentation (one token per depth)
    r"| ?[^\W\d]\w*"     # identifier or word, with an optional leading space
    r"| ?\d+"            # number
    r"| ?[^\w\s]+"       # run of punctuation / symbols: "):", '"""', "->", "=="
    r"|[ \t]+(?!\S)"     # spaces not followed by a word (the last one joins the word)
    r"|\s"               # any other whitespace character (\t before a word, \f, ...)
)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
              "__pycache__"}
_TOPICS_FILE = "pydoc_data/topics.py"
# Bump when tokenization or document selection changes, to invalidate old caches.
_FORMAT = 1


def split_tokens(text: str) -> list[str]:
    """The token strings of `text`; they join back to `text` exactly."""
    return _TOKEN.findall(text)


class Tokenizer:
    """Word-level tokenizer: `vocab[i]` is the text of token id `i`."""

    def __init__(self, vocab):
        self.vocab = tuple(vocab)
        if self.vocab[:4] != SPECIALS:
            raise ValueError(f"the vocabulary must start with {SPECIALS}.")
        self._ids = {t: i for i, t in enumerate(self.vocab)}

    @classmethod
    def train(cls, texts, vocab_size: int) -> Tokenizer:
        """The `vocab_size - 4` most frequent tokens of `texts`, after the specials.

        If the texts hold fewer distinct tokens, the rest of the vocabulary is filled
        with `<unused:i>` placeholders, so the head always has `vocab_size` rows.
        """
        counts = collections.Counter()
        for text in texts:
            counts.update(split_tokens(text) if isinstance(text, str) else text)
        return cls.from_counts(counts, vocab_size)

    @classmethod
    def from_counts(cls, counts, vocab_size: int) -> Tokenizer:
        if vocab_size <= len(SPECIALS):
            raise ValueError(f"vocab_size must exceed {len(SPECIALS)}, got "
                             f"{vocab_size}.")
        for s in SPECIALS:
            counts.pop(s, None)  # the literal text "<unk>" must not get a 2nd id
        # Ties broken by the text, so the vocabulary never depends on file order.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        words = [t for t, _ in ranked[: vocab_size - len(SPECIALS)]]
        unused = [f"<unused:{i}>" for i in range(vocab_size - len(SPECIALS)
                                                 - len(words))]
        return cls(SPECIALS + tuple(words) + tuple(unused))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_tokens(self, tokens) -> np.ndarray:
        # map(dict.get, ..., repeat(UNK_ID)) runs in C: ~0.1 s per million tokens.
        return np.fromiter(map(self._ids.get, tokens, itertools.repeat(UNK_ID)),
                           np.int32, count=len(tokens))

    def encode(self, text: str, *, bos_eos: bool = False) -> np.ndarray:
        """int32 ids of `text`; with `bos_eos`, wrapped in <bos> ... <eos>."""
        ids = self.encode_tokens(split_tokens(text))
        if bos_eos:
            ids = np.concatenate([[BOS_ID], ids, [EOS_ID]]).astype(np.int32)
        return ids

    def decode(self, ids, *, skip_specials: bool = True) -> str:
        """The text of `ids` (<unk> stays "<unk>"; other specials dropped if asked)."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if skip_specials and i in (PAD_ID, BOS_ID, EOS_ID):
                continue
            out.append(self.vocab[i])
        return "".join(out)


# --- documents ------------------------------------------------------------------------


def _stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    files = []
    # os.walk with pruning, not rglob: site-packages and the test suites hold ~13k
    # files that would only be listed to be skipped (0.9 s -> 0.05 s).
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        rel_dir = pathlib.Path(dirpath).relative_to(root)
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            if f.endswith(".py") and rel != _TOPICS_FILE:
                files.append((rel, pathlib.Path(dirpath, f)))
    return sorted(files)


def _topics() -> dict[str, str]:
    from pydoc_data import topics

    return dict(sorted(topics.topics.items()))


def _hash_unit(name: str) -> float:
    """A deterministic number in [0, 1) for a document name (crc32: not salted)."""
    return zlib.crc32(name.encode("utf-8")) / 2**32


def _is_test(name: str, test_fraction: float) -> bool:
    return _hash_unit(name) < test_fraction


def _select(names_sizes, test_fraction, max_files, max_bytes):
    """(train, test) lists of (name, byte budget or None), in hash order.

    The split is a property of each name alone; `max_files` / `max_bytes` take a
    prefix of each split in hash order (a pseudo-random sample, always at least one
    document per split), so a smoke corpus's test documents are full-corpus test
    documents too. Under `max_bytes` the last document of a split is truncated.
    """
    ordered = sorted(names_sizes, key=lambda ns: (_hash_unit(ns[0]), ns[0]))
    train = [ns for ns in ordered if not _is_test(ns[0], test_fraction)]
    test = [ns for ns in ordered if _is_test(ns[0], test_fraction)]
    if not train or not test:
        raise ValueError(f"test_fraction={test_fraction} leaves a split empty "
                         f"({len(train)} train / {len(test)} test documents).")
    if max_files is not None:
        num_test = max(1, round(max_files * test_fraction))
        train, test = train[: max(1, max_files - num_test)], test[:num_test]

    def budget(docs, limit):
        out, used = [], 0
        for name, size in docs:
            if limit is not None and used >= limit and out:
                break
            take = None if limit is None or used + size <= limit else limit - used
            out.append((name, take))
            used += size if take is None else take
        return out

    if max_bytes is None:
        return budget(train, None), budget(test, None)
    num_test_bytes = max(1, int(max_bytes * test_fraction))
    return (budget(train, max(1, max_bytes - num_test_bytes)),
            budget(test, num_test_bytes))


def _read_docs(selected, files, topics) -> list[str]:
    texts = []
    for name, take in selected:
        if name.startswith("pydoc_data.topics:"):
            text = topics[name.split(":", 1)[1]]
        else:
            # Universal newlines; the stdlib is UTF-8 (PEP 3120), "replace" keeps a
            # stray byte from failing the whole load.
            text = files[name].read_bytes().decode("utf-8", "replace")
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        texts.append(text if take is None else text[:take])
    return texts


# --- the data set ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMDataset(Dataset):
    """A tokenized corpus plus the trainer's usual `x_*` / `y_*` arrays.

    x_train, y_train, x_test, y_test: int32 `[num_windows, seq_len]`, consecutive
    non-overlapping windows of each split's token stream; `y` is `x` shifted by one
    token (next-token targets). `num_classes` is the vocabulary size.
    train_tokens, test_tokens: the int32 token streams (documents concatenated, each
    `<bos> ... <eos>`), for `batch` (random windows) or other window schemes.
    vocab: token texts by id. stats: what `load` measured (sizes, times).
    """

    train_tokens: np.ndarray = None
    test_tokens: np.ndarray = None
    vocab: tuple[str, ...] = ()
    seq_len: int = 0
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.vocab)


def windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each int32 `[n, seq_len]`: consecutive windows of `tokens`.

    `targets[i, t] = inputs[i, t + 1]` within a window and the token after the window
    at its end; the tail that does not fill a window is dropped.
    """
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of "
                         f"seq_len={seq_len} (plus its target).")
    return (tokens[: n * seq_len].reshape(n, seq_len),
            tokens[1: n * seq_len + 1].reshape(n, seq_len))


def batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
          seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Training batch `step`: random windows, a pure function of (seed, step).

    Returns (inputs, targets), int32 `[batch_size, seq_len]`, targets shifted by one.
    Every offset is equally likely (windows may cross document boundaries, where
    <eos> is followed by <bos>); a resumed run draws the same batches as an
    uninterrupted one because no state is carried between steps.
    """
    span = len(tokens) - seq_len
    if span < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for seq_len={seq_len}.")
    starts = np.random.default_rng([int(seed), int(step)]).integers(
        0, span, size=batch_size)
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)]
    return rows[:, :-1], rows[:, 1:]


def _cache_key(settings: dict, names_sizes) -> str:
    blob = json.dumps({"settings": settings, "python": sys.version,
                       "docs": names_sizes, "format": _FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenize(train_texts, test_texts, vocab_size):
    t0 = time.perf_counter()
    train_split = [split_tokens(t) for t in train_texts]
    test_split = [split_tokens(t) for t in test_texts]
    t1 = time.perf_counter()
    counts = collections.Counter(itertools.chain.from_iterable(train_split))
    tokenizer = Tokenizer.from_counts(collections.Counter(counts), vocab_size)
    t2 = time.perf_counter()

    def stream(docs):
        flat = [BOS]
        for toks in docs:
            flat += toks
            flat += (EOS, BOS)
        flat.pop()  # the trailing <bos> of a document that does not exist
        return tokenizer.encode_tokens(flat)

    train_ids, test_ids = stream(train_split), stream(test_split)
    t3 = time.perf_counter()
    stats = {
        "distinct_train_tokens": len(counts),
        "split_seconds": round(t1 - t0, 3), "vocab_seconds": round(t2 - t1, 3),
        "map_seconds": round(t3 - t2, 3), "tokenize_seconds": round(t3 - t0, 3),
    }
    return tokenizer, train_ids, test_ids, stats


def load(cache_dir=None, *, vocab_size: int = 32768, seq_len: int = 256,
         test_fraction: float = 0.05, max_files: int | None = None,
         max_bytes: int | None = None,
         max_test_windows: int | None = None) -> LMDataset:
    """The tokenized standard-library corpus, cached as .npz in `cache_dir`.

    Args:
      cache_dir: where to keep the tokenized corpus (None: tokenize every time).
      vocab_size: total vocabulary including the 4 specials.
      seq_len: window length of `x_*` / `y_*` (not part of the cache key).
      test_fraction: share of the hash range whose documents are held out.
      max_files: at most this many documents (train + test), for smoke runs.
      max_bytes: at most about this many characters (train + test), for smoke runs.
      max_test_windows: keep this many test windows, evenly spaced over the test
        stream, to bound evaluation time.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    root = _stdlib_root()
    files = dict(_source_files(root))
    topics = _topics()
    if not files:
        raise RuntimeError(f"no .py files under {str(root)!r}; the language-model "
                           "data need CPython's standard-library sources.")
    names_sizes = ([(n, p.stat().st_size) for n, p in files.items()]
                   + [(f"pydoc_data.topics:{k}", len(v)) for k, v in topics.items()])
    train_sel, test_sel = _select(names_sizes, test_fraction, max_files, max_bytes)
    settings = dict(vocab_size=vocab_size, test_fraction=test_fraction,
                    max_files=max_files, max_bytes=max_bytes)
    path = None
    if cache_dir is not None:
        path = pathlib.Path(cache_dir) / f"lm_{_cache_key(settings, names_sizes)}.npz"
    if path is not None and path.exists():
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            train_ids, test_ids = f["train_tokens"], f["test_tokens"]
        vocab, stats = tuple(meta["vocab"]), meta["stats"] | {"cache_hit": True}
    else:
        t0 = time.perf_counter()
        train_texts = _read_docs(train_sel, files, topics)
        test_texts = _read_docs(test_sel, files, topics)
        read_seconds = time.perf_counter() - t0
        tokenizer, train_ids, test_ids, stats = _tokenize(train_texts, test_texts,
                                                          vocab_size)
        vocab = tokenizer.vocab
        stats = {
            "train_docs": len(train_sel), "test_docs": len(test_sel),
            "train_chars": sum(map(len, train_texts)),
            "test_chars": sum(map(len, test_texts)),
            "train_tokens": int(train_ids.size), "test_tokens": int(test_ids.size),
            "train_unk_rate": round(float(np.mean(train_ids == UNK_ID)), 5),
            "test_unk_rate": round(float(np.mean(test_ids == UNK_ID)), 5),
            "read_seconds": round(read_seconds, 3), **stats,
            "stdlib": str(root), "python": sys.version.split()[0],
        }
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A unique temporary name, then an atomic rename: concurrent loaders
            # and killed runs never leave or read a half-written cache.
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.{time.time_ns()}.tmp.npz")
            np.savez(tmp, train_tokens=train_ids, test_tokens=test_ids,
                     meta=json.dumps({"vocab": vocab, "stats": stats,
                                      "settings": settings}))
            os.replace(tmp, path)
        stats = stats | {"cache_hit": False}
    x_train, y_train = windows(train_ids, seq_len)
    x_test, y_test = windows(test_ids, seq_len)
    if max_test_windows is not None and max_test_windows < len(x_test):
        keep = np.linspace(0, len(x_test) - 1, max_test_windows).round().astype(int)
        x_test, y_test = x_test[keep], y_test[keep]
    return LMDataset(
        name="stdlib_lm", x_train=x_train, y_train=y_train, x_test=x_test,
        y_test=y_test, num_classes=len(vocab),
        description=(f"CPython {stats['python']} standard-library source + pydoc "
                     f"topics, word-level tokens (vocab {len(vocab)}), next-token "
                     f"prediction over {seq_len}-token windows"),
        train_tokens=train_ids, test_tokens=test_ids, vocab=vocab, seq_len=seq_len,
        stats=stats)
