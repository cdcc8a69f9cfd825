"""Compiled-function caches shared by the table-driven loss tests.

A test case is any object with `id`, `fn` (the loss) and `kwargs` (its options).
"""

from __future__ import annotations

import functools

import jax

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
