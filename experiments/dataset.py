"""The `Dataset` every loader returns, its validation split and its training batches.

Batches are a pure function of `(seed, step)` (`batch_indices`, from grain's
random-access index `sampler`), never of an iterator's state: a run resumed from a
checkpoint at step s draws exactly the batches an uninterrupted run draws from step s
on, whatever its mesh or process count.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

# The splits never depend on the training seed, so seeds vary only the model's
# initialisation and the batch order.
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split held as NumPy arrays.

    Attributes:
      name: the data set's name.
      x_train, x_test: inputs, float32 (images, features) or int32 (token ids).
      y_train, y_test: int32 class ids `[n]` or float32 regression targets `[n]`.
      num_classes: number of classes, or 0 for regression.
      target_scale: (mean, std) used to standardize regression targets; metrics are
        reported in the original units by undoing it. (0, 1) for classification.
      class_names: the label names, for reports.
      description: one line for reports.
      x_train_lengths, x_test_lengths, y_train_lengths, y_test_lengths: int32 `[n]`
        valid frames and labels per example, for sequence data (`x` `[n, frames,
        features]`, `y` `[n, max_labels]` padded with -1); None otherwise.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    target_scale: tuple[float, float] = (0.0, 1.0)
    class_names: tuple[str, ...] = ()
    description: str = ""
    x_train_lengths: np.ndarray | None = None
    y_train_lengths: np.ndarray | None = None
    x_test_lengths: np.ndarray | None = None
    y_test_lengths: np.ndarray | None = None

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """The batchable arrays of `split` ("train" or "test"): x, y and any lengths."""
        arrays = {"x": getattr(self, f"x_{split}"), "y": getattr(self, f"y_{split}"),
                  "x_lengths": getattr(self, f"x_{split}_lengths"),
                  "y_lengths": getattr(self, f"y_{split}_lengths")}
        return {k: v for k, v in arrays.items() if v is not None}

    @property
    def num_train(self) -> int:
        return len(self.x_train)

    @property
    def num_test(self) -> int:
        return len(self.x_test)


def split_indices(n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted example ids: a fixed permutation (`SPLIT_SEED`)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    num_test = int(round(n * test_fraction))
    return np.sort(perm[num_test:]), np.sort(perm[:num_test])


def validation_split(dataset: Dataset, fraction: float) -> Dataset:
    """`dataset` with a validation split carved from its training data as its test
    split: the study picks learning rates on it and never looks at the test set.

    The carve is fixed (`SPLIT_SEED`), so every seed and rate sees the same split.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}.")
    keep, held = split_indices(dataset.num_train, fraction)
    train = dataset.arrays("train")
    fields = {}
    for key, value in train.items():
        name = f"{key[0]}_{{}}{key[1:]}"  # "x_lengths" -> "x_{}_lengths"
        fields[name.format("train")] = value[keep]
        fields[name.format("test")] = value[held]
    return dataclasses.replace(
        dataset, **fields,
        description=f"{dataset.description} (validation: {len(held)} of its "
                    f"{dataset.num_train} training examples)")


def sampler(seed: int, num_examples: int, batch_size: int) -> grain.MapDataset:
    """grain's index sampler of the training batches: element s is the example ids
    of step s (`[batch_size]`).

    Epochs are fresh permutations of the training set (grain's `shuffle` before
    `repeat` reshuffles every epoch); batches run on across an epoch's end. grain
    seeds epoch e with (its seed + e), so the run's seed is hashed into grain's
    first: seeds 0 and 1 would otherwise see the same epochs one epoch apart.
    Random access, so the batches of step s need no iterator state.
    """
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {num_examples} training examples.")
    return (_shuffled(int(seed), int(num_examples))
            .batch(int(batch_size), drop_remainder=True))


def _shuffled(seed: int, num_examples: int) -> grain.MapDataset:
    grain_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    return grain.MapDataset.range(num_examples).shuffle(seed=grain_seed).repeat()


@functools.lru_cache(maxsize=256)
def _epoch(seed: int, num_examples: int, epoch: int) -> np.ndarray:
    # grain computes a shuffled index per element (tens of microseconds each on
    # CPU); the runs of a study share each epoch's permutation through this cache.
    shuffled = _shuffled(seed, num_examples)
    start = epoch * num_examples
    return np.fromiter((shuffled[i] for i in range(start, start + num_examples)),
                       np.int64, num_examples)


def batch_indices(seed: int, step: int, num_examples: int,
                  batch_size: int) -> np.ndarray:
    """The example ids of training step `step`: a pure function of (seed, step),
    element `step` of `sampler(seed, num_examples, batch_size)`, read through a
    cache of whole epochs."""
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {num_examples} training examples.")
    seed, n = int(seed), int(num_examples)
    first = int(step) * int(batch_size)
    positions = np.arange(first, first + int(batch_size))
    epochs = positions // n
    out = np.empty(len(positions), np.int64)
    for e in np.unique(epochs):
        where = epochs == e
        out[where] = _epoch(seed, n, int(e))[positions[where] - e * n]
    return out
