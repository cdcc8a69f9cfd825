"""Compiled-function caches shared by the table-driven loss tests.

A test case is any object with `id`, `fn` (the loss) and `kwargs` (its options).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

REDUCTIONS = ("none", "sum", "mean")
_EVALUATE = {}


def evaluate(case):
    """One compiled function: (data, **kw) -> ({reduction: loss}, grads of the mean).

    The grads are w.r.t. every data argument; `kw` holds the array options (where=,
    weights=). Tests in float32 pass both, so that they share one executable per shape.
    """
    key = (case.fn, case.id)
    if key not in _EVALUATE:

        def run(data, **kw):
            def loss(*a, reduction="mean"):
                return case.fn(*a, **case.kwargs, **kw, reduction=reduction)

            losses = {r: loss(*data, reduction=r) for r in REDUCTIONS}
            return losses, jax.grad(loss, argnums=tuple(range(len(data))))(*data)

        _EVALUATE[key] = jax.jit(run)
    return _EVALUATE[key]


def jit_case(case, **static):
    """The case's loss, jitted, with its options and `static` bound."""
    return jax.jit(functools.partial(case.fn, **case.kwargs, **static))


def check_shard_map(case, data, batch_axis: int):
    """Per-device "none" losses under shard_map, and the mean from psums of per-device
    sums and counts, equal the single-device call.

    The hook is the caller's: each table builds its own float32 `data` and names the
    axis of the data arguments that is the batch (`batch_axis`, of a length divisible
    by 8; it must be the loss shape's first axis). That axis is sharded over the 8 fake
    CPU devices of conftest.py.
    """
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    ndim = np.ndim(data[0])
    spec = P(*[("data" if i == batch_axis else None) for i in range(ndim)])

    def per_device(*a):
        none = case.fn(*a, **case.kwargs, reduction="none")
        total = jax.lax.psum(case.fn(*a, **case.kwargs, reduction="sum"), "data")
        count = jax.lax.psum(none.size, "data")
        return none, total / count

    none, mean = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec,
                                       out_specs=(P("data"), P())))(*data)
    np.testing.assert_allclose(none, jit_case(case, reduction="none")(*data),
                               rtol=1e-6)
    np.testing.assert_allclose(mean, jit_case(case)(*data), rtol=1e-6)


# --- the cross-device test matrix (tests/test_matrix.py) -----------------------------


@dataclasses.dataclass(frozen=True)
class MatrixCase:
    """One registered loss with a typical keyword set, for the registry-driven matrix.

    Each family's test module lists its cases in `MATRIX_CASES`; tests/test_matrix.py
    runs every case under shard_map, pmap, batch-sharded jit, checked mode and traced
    hyperparameters, and fails for a registered loss that has no case.

    Fields:
      name: the registry name (`lossjax.get(name)`).
      data: `(rng, batch) -> tuple` of NumPy positional arguments (float32 floats,
        int32 ints). Every argument not in `replicated` has the batch as its first
        axis, and the loss shape's first axis is that batch.
      kwargs: static keywords (Python numbers, strings, bools): a typical set a user
        passes, excluding where / weights / reduction / axis_name.
      batch_kwargs: `(rng, batch) -> dict` of keyword arrays that are sharded like the
        batch (first axis the batch), e.g. per-sequence lengths.
      replicated_kwargs: `rng -> dict` of keyword arrays that every device holds whole
        (class weights, a head bias sharded nowhere).
      replicated: positions in `data` of arguments every device holds whole (a head
        kernel).
      traced: float hyperparameters -> a valid value, each also passed as a traced
        array under jit and differentiated (with every other keyword in `kwargs`).
      id: tells several cases of one loss apart.
      rtol, atol: tolerance of float32 multi-device results vs one device.
    """

    name: str
    data: Callable
    kwargs: dict = dataclasses.field(default_factory=dict)
    batch_kwargs: Callable | None = None
    replicated_kwargs: Callable | None = None
    replicated: tuple[int, ...] = ()
    traced: dict = dataclasses.field(default_factory=dict)
    id: str = ""
    rtol: float = 2e-5
    atol: float = 2e-6

    @property
    def label(self) -> str:
        return f"{self.name}-{self.id}" if self.id else self.name
