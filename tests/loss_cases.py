"""Compiled-function caches shared by the table-driven loss tests.

A test case is any object with `id`, `fn` (the loss) and `kwargs` (its options).
"""

from __future__ import annotations

import functools

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
