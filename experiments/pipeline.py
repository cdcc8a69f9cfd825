"""The trainer's training batches through grain: a random-access source, grain's index
sampler seeded by `config.seed`, sharded by process, batched.

Step s's global batch is the records `dataset.sampler(seed, len(source),
batch_size)[s]` of the source (read as `dataset.batch_indices`). Each process reads
from the source only the rows of that batch which land on its own devices
(`CompiledStep.rows`) and stacks them; the step's `put_rows` makes the global array.
The sampler is random access, so the pipeline's whole state is the step: the
checkpoint's `step` restores it, and a resumed run, on any mesh or process count,
reads exactly the batches an uninterrupted run reads (there is no iterator position
to save beside it, and none to disagree with it).

A source is anything with `__len__` and `__getitem__(i) -> {"x": ..., "y": ..., ...}`
(one record: the keys and per-example shapes of the data set's arrays), the protocol
of grain's `RandomAccessDataSource` (an `ArrayRecordDataSource` with a parsing
wrapper, a memory map, a list). An optional `__getitems__(ids)` reads many records at
once. The built-in data sets' training splits are `ArraySource`s; a user's own comes
in with `config.data.train_source="package.module:name"` (an object, or a class or
callable returning one, called with no arguments), which replaces the training split
of `config.data.name` (whose test split, classes and model shapes the run keeps).
"""

from __future__ import annotations

import importlib

import numpy as np

from experiments import dataset as dataset_lib


class ArraySource:
    """A random-access source over equal-length NumPy arrays: record i is
    `{key: array[i]}`."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = dict(arrays)
        lengths = {len(v) for v in self._arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays of unequal lengths {sorted(lengths)}.")
        self._len = lengths.pop()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self._arrays.items()}

    def __getitems__(self, ids) -> dict[str, np.ndarray]:
        return {k: v[ids] for k, v in self._arrays.items()}


def load_source(spec: str):
    """The source named by `"package.module:name"`: the object, or what it returns
    when it is a class or a callable that is not itself a source."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"config.data.train_source={spec!r} is not "
                         "'package.module:name'.")
    obj = getattr(importlib.import_module(module), name)
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "__getitem__")):
        obj = obj()  # a class or a factory
    if not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
        raise TypeError(f"config.data.train_source={spec!r} gives a "
                        f"{type(obj).__name__}, which has no __len__ and "
                        "__getitem__.")
    return obj


class TrainBatches:
    """`batches(step)`: this process's rows of training step `step` as NumPy arrays."""

    def __init__(self, source, *, seed: int, batch_size: int, rows: np.ndarray):
        self.source = source
        self.rows = np.asarray(rows)
        self.seed, self.batch_size = int(seed), int(batch_size)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        ids = dataset_lib.batch_indices(self.seed, step, len(self.source),
                                        self.batch_size)[self.rows]
        read_many = getattr(self.source, "__getitems__", None)
        if read_many is not None:
            return read_many(ids)
        records = [self.source[int(i)] for i in ids]
        return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
