"""Data sets that ship inside installed packages: nothing is downloaded at run time.

- `digits`: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).
- `stdlib_docs`: English docstrings of CPython standard-library packages, labelled by
  the package they come from (read with `ast` from the interpreter's own `Lib/`, never
  imported, so the text is exactly what ships with the Python that runs the code).
- `diabetes`: scikit-learn's diabetes regression data (442 patients, 10 features).
- `spoken_words`: spoken digit and command-word sequences synthesized with espeak-ng
  (`experiments/asr_data.py`), log-mel frames and character targets for CTC; the
  only data set generated locally, cached in the `cache_dir` the trainer passes.
- `stdlib_lm`: next-token windows of CPython's standard-library source, word-level
  tokens (`experiments/lm_data.py`), tokenized on first use and cached in `cache_dir`.

Each loader returns a `Dataset` of NumPy arrays with explicit dtypes (float32 inputs,
int32 labels, float32 targets), so switching `jax_enable_x64` on changes nothing.
Train/test splits use a fixed permutation (seed 0), independent of the training seed:
every run of a study sees the same test set.

`Dataset`, the validation split and `batch_indices` live in `experiments.dataset`
(re-exported here).
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re
import sysconfig
import tempfile
import zlib

import numpy as np

from experiments import asr_data, lm_data
from experiments.dataset import Dataset, batch_indices, split_indices

__all__ = ["Dataset", "batch_indices", "load"]


@functools.cache
def digits(test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to [0, 1] and add the channel axis flax wants.
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    train, test = split_indices(len(x), test_fraction)
    return Dataset(
        name="digits", x_train=x[train], y_train=y[train], x_test=x[test],
        y_test=y[test], num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        description="scikit-learn handwritten digits, 8x8 grey images, 10 classes",
    )


@functools.cache
def diabetes(test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.float64)
    train, test = split_indices(len(x), test_fraction)
    # Standardize the target with training statistics only; metrics undo it.
    mean, std = float(y[train].mean()), float(y[train].std())
    y = ((y - mean) / std).astype(np.float32)
    # The features ship mean-centred and scaled by sqrt(n) * std; rescale to unit
    # variance (training statistics) so a default-initialised MLP sees O(1) inputs.
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    x = ((x - x_mean) / x_std).astype(np.float32)
    return Dataset(
        name="diabetes", x_train=x[train], y_train=y[train], x_test=x[test],
        y_test=y[test], num_classes=0, target_scale=(mean, std),
        description="scikit-learn diabetes progression, 10 features, 442 patients",
    )


# --- text ---------------------------------------------------------------------------

# Standard-library packages present in every CPython build (no tkinter / idlelib, which
# distributions split off; no distutils / lib2to3, removed in 3.12).
STDLIB_PACKAGES = ("asyncio", "email", "http", "importlib", "logging",
                   "multiprocessing", "unittest", "xml")
_MIN_DOC_CHARS = 40
_WORD = re.compile(r"[a-z]+")


def _stdlib_docstrings(packages) -> list[tuple[str, int]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for label, package in enumerate(packages):
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.relative_to(root / package).parts[:-1]:
                continue  # Test suites are code, not prose.
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= _MIN_DOC_CHARS:
                        docs.append((doc, label))
    return docs


def _hash_tokens(text: str, num_buckets: int, max_len: int) -> np.ndarray:
    """Hashed word unigrams and bigrams; 0 is padding, ids are 1..num_buckets-1."""
    words = _WORD.findall(text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:], strict=False)]
    # crc32, not hash(): Python's str hash is salted per process.
    ids = [1 + zlib.crc32(g.encode()) % (num_buckets - 1) for g in grams[:max_len]]
    out = np.zeros(max_len, np.int32)
    out[: len(ids)] = ids
    return out


@functools.cache
def stdlib_docs(num_buckets: int = 8192, max_len: int = 128,
                test_fraction: float = 0.2,
                packages: tuple[str, ...] = STDLIB_PACKAGES) -> Dataset:
    docs = _stdlib_docstrings(packages)
    if not docs:
        raise RuntimeError(
            f"no docstrings found under {sysconfig.get_paths()['stdlib']!r}; the "
            "text task needs CPython's standard library sources (Lib/*.py).")
    x = np.stack([_hash_tokens(d, num_buckets, max_len) for d, _ in docs])
    y = np.array([label for _, label in docs], np.int32)
    train, test = split_indices(len(x), test_fraction)
    return Dataset(
        name="stdlib_docs", x_train=x[train], y_train=y[train], x_test=x[test],
        y_test=y[test], num_classes=len(packages), class_names=tuple(packages),
        description=(f"CPython standard-library docstrings labelled by package "
                     f"({len(packages)} classes, hashed word uni+bigrams)"),
    )


# --- speech -------------------------------------------------------------------------

# In-process memo of the speech data by generation parameters (not by cache_dir), so
# the runs of a study generate or read it once.
_SPOKEN: dict = {}


def spoken_words(cache_dir=None, *, num_train: int = 2000, num_test: int = 400,
                 max_words: int = 4, seed: int = 0) -> Dataset:
    """espeak-ng utterances as log-mel frames and character ids, split by voice.

    Generated on first use into `cache_dir` (the trainer passes `<workdir>/data`;
    None: a temporary directory, so only this process's memo keeps it). Raises
    `asr_data.EspeakNotFoundError`, saying how to install espeak-ng, if it is missing.
    """
    key = (num_train, num_test, max_words, seed)
    if key not in _SPOKEN:
        with tempfile.TemporaryDirectory() as tmp:
            d = asr_data.load(tmp if cache_dir is None else cache_dir,
                              num_train=num_train, num_test=num_test,
                              max_words=max_words, seed=seed)
        _SPOKEN[key] = Dataset(
            name="spoken_words", x_train=d.x_train, y_train=d.y_train,
            x_test=d.x_test, y_test=d.y_test, num_classes=d.num_classes,
            class_names=asr_data.CHARS,
            description=(f"espeak-ng spoken sequences of 1-{max_words} words from "
                         f"{len(asr_data.WORDS)}, log-mel frames, characters; test "
                         f"voices unseen in training"),
            x_train_lengths=d.x_train_lengths, y_train_lengths=d.y_train_lengths,
            x_test_lengths=d.x_test_lengths, y_test_lengths=d.y_test_lengths)
    return _SPOKEN[key]


# In-process memo of the language-model data by their settings (as `_SPOKEN`).
_LM: dict = {}


def stdlib_lm(cache_dir=None, **kwargs) -> Dataset:
    """`lm_data.load(cache_dir, **kwargs)`: `x_*` / `y_*` int32 `[n, seq_len]` windows
    (`y` is `x` shifted by one token), `num_classes` the vocabulary size."""
    key = tuple(sorted(kwargs.items()))
    if key not in _LM:
        _LM[key] = lm_data.load(cache_dir, **kwargs)
    return _LM[key]


def load(name: str, *, cache_dir=None, **kwargs) -> Dataset:
    """The data set called `name` ("digits", "stdlib_docs", "diabetes",
    "spoken_words", "stdlib_lm"); `cache_dir` is where generated data sets are
    cached."""
    loaders = {"digits": digits, "stdlib_docs": stdlib_docs, "diabetes": diabetes,
               "spoken_words": functools.partial(spoken_words, cache_dir),
               "stdlib_lm": functools.partial(stdlib_lm, cache_dir)}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(loaders)}")
    return loaders[name](**kwargs)
