"""Input checks: trace-time shape and dtype rules, and value rules for checked mode.

Shape and dtype rules run while a loss traces and raise at once: ValueError naming the
argument and both shapes, TypeError for a wrong dtype.

Value rules (labels in range, targets in [0, 1], finite inputs; kept entries only)
cannot raise under `jit`. They are written as chex value assertions that are traced
only while `checked(fn)` traces `fn`; outside it they cost nothing and never fire.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

_CHECKS_ON = contextvars.ContextVar("lossjax_value_checks", default=False)


# --- trace-time rules ---------------------------------------------------------------


def _dtype(x):
    return jnp.result_type(x)


def check_float(name: str, x) -> None:
    if not jnp.issubdtype(_dtype(x), jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {_dtype(x)}.")


def check_int(name: str, x) -> None:
    if not jnp.issubdtype(_dtype(x), jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {_dtype(x)}.")


def check_bool(name: str, x) -> None:
    if _dtype(x) != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {_dtype(x)}.")


def check_rank(name: str, x, rank: int | Sequence[int], *, at_least=False) -> None:
    ndim = jnp.ndim(x)
    if at_least:
        if ndim < rank:
            raise ValueError(
                f"{name} must have rank >= {rank}, got shape {jnp.shape(x)}."
            )
        return
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if ndim not in ranks:
        want = ranks[0] if len(ranks) == 1 else f"one of {ranks}"
        raise ValueError(f"{name} must have rank {want}, got shape {jnp.shape(x)}.")


def check_shape(name: str, x, expected: Sequence[int], *, against: str) -> None:
    """Raises unless `x.shape == expected`; `against` names where `expected` comes
    from."""
    if tuple(jnp.shape(x)) != tuple(expected):
        raise ValueError(
            f"{name} has shape {jnp.shape(x)}, but {against} requires shape "
            f"{tuple(expected)}."
        )


def check_same_shape(name_a: str, a, name_b: str, b) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {jnp.shape(a)} and "
            f"{jnp.shape(b)}."
        )


def check_broadcastable(name: str, x, shape: Sequence[int]) -> None:
    """Raises unless `x` broadcasts to exactly `shape` (the loss shape)."""
    try:
        out = jnp.broadcast_shapes(jnp.shape(x), tuple(shape))
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"{name} of shape {jnp.shape(x)} does not broadcast to the loss shape "
            f"{tuple(shape)}."
        )


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an input of rank {ndim}.")
    return axis % ndim


# --- hyperparameters ----------------------------------------------------------------


def _concrete_number(value):
    """`value` as a float if it is a Python or NumPy number (a traced array: None)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.number)) or (
        isinstance(value, np.ndarray) and value.ndim == 0
    ):
        return float(value)
    return None


def check_range(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError if a Python number `value` lies outside its valid range.

    The range is [low, high], each end open when `low_open` / `high_open` and absent
    when None. A traced array passes: its value is unknown while tracing, and a
    schedule or a learnable hyperparameter must stay traceable.
    """
    v = _concrete_number(value)
    if v is None:
        return
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high or v != v:
        if low is not None and high is not None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            rng = f"{left}{low:g}, {high:g}{right}"
            rule = f"in {rng}"
        elif low is not None:
            rule = f"{'>' if low_open else '>='} {low:g}"
        else:
            rule = f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be {rule}, got {value!r}.")


def is_zero(value) -> bool:
    """True iff `value` is a Python / NumPy number equal to 0.

    Lets a loss skip a term that a hyperparameter switches off (label_smoothing=0.0)
    without a Python `if` on a traced value: a traced hyperparameter is never
    "zero" here, so its term is computed (and its gradient flows).
    """
    v = _concrete_number(value)
    return v is not None and v == 0


# --- value rules (checked mode only) ------------------------------------------------


def value_checks_enabled() -> bool:
    return _CHECKS_ON.get()


@contextlib.contextmanager
def value_checks():
    """Turns lossjax's value assertions on for whatever traces inside the block."""
    token = _CHECKS_ON.set(True)
    try:
        yield
    finally:
        _CHECKS_ON.reset(token)


def assert_values(loss: str, rule: str, ok: jax.Array, kept=None) -> None:
    """In checked mode, asserts that `ok` holds wherever `kept` (broadcastable) is True.

    `loss` and `rule` name the loss and the rule in the error.
    """
    if not _CHECKS_ON.get():
        return
    if kept is not None:
        ok = ok | ~kept
    chex.assert_trees_all_equal(
        jnp.all(ok), jnp.array(True), custom_message=f"lossjax.{loss}: {rule}"
    )


def assert_finite(loss: str, name: str, x: jax.Array, kept=None) -> None:
    assert_values(loss, f"{name} must be finite.", jnp.isfinite(x), kept)


def assert_labels_in_range(loss: str, labels, num_classes: int, kept=None) -> None:
    assert_values(
        loss,
        f"labels must lie in [0, {num_classes}) (or equal ignore_index).",
        (labels >= 0) & (labels < num_classes),
        kept,
    )


def assert_unit_interval(loss: str, name: str, x, kept=None) -> None:
    assert_values(loss, f"{name} must lie in [0, 1].", (x >= 0) & (x <= 1), kept)


def _is_array(x) -> bool:
    # NumPy scalars (np.int64(0) as a blank id) stay static, like Python numbers.
    return isinstance(x, (jax.Array, np.ndarray))


def checked(fn: Callable) -> Callable:
    """Returns `fn` jitted, with lossjax's value checks on, raising on a bad value.

    The result is `chex.chexify(jax.jit(fn))` with synchronous checks: a call whose
    inputs break a value rule of a loss (a label out of range, a target outside [0, 1],
    a non-finite input in a kept entry) raises an error naming the loss and the rule.
    Array arguments (JAX or NumPy arrays, anywhere in the arguments' pytrees) are
    traced; everything else (strings, Python and NumPy numbers, bools, None) is
    static, as the loss sees it outside `checked`: `reduction="none"`,
    `label_smoothing=0.1` and `blank_id=0` all work, and a traced hyperparameter is
    passed as an array. One compiled check runs per set of static values. Pass the
    plain function, not one already jitted: a jitted function would reuse its
    unchecked trace.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> f = lossjax.checked(lossjax.cross_entropy)
      >>> f(jnp.zeros((2, 3)), jnp.array([0, 2]), label_smoothing=0.1, reduction="none")
      Array([1.0986123, 1.0986123], dtype=float32)
      >>> f(jnp.zeros((2, 3)), jnp.array([0, 7]))
      Traceback (most recent call last):
      ...
      AssertionError: ... lossjax.cross_entropy: labels must lie in [0, 3) ...
    """
    compiled = {}

    @functools.wraps(fn)
    def with_value_checks(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        is_array = tuple(_is_array(leaf) for leaf in leaves)
        pairs = zip(is_array, leaves, strict=True)
        static = tuple(None if a else leaf for a, leaf in pairs)
        key = (treedef, is_array, static)
        if key not in compiled:

            def call(*arrays):
                it = iter(arrays)
                pairs = zip(is_array, static, strict=True)
                full = [next(it) if a else leaf for a, leaf in pairs]
                a, kw = jax.tree.unflatten(treedef, full)
                with value_checks():
                    return fn(*a, **kw)

            compiled[key] = chex.chexify(jax.jit(call), async_check=False)
        arrays = [leaf for a, leaf in zip(is_array, leaves, strict=True) if a]
        return compiled[key](*arrays)

    return with_value_checks
