"""Regression losses: squared, absolute, Huber, log-cosh, Poisson, Gaussian, pinball...

Every loss here except `cosine_similarity_loss` is elementwise: its loss shape is the
shape of `predictions` itself, with no hidden mean over the last axis (Keras takes one
first; over a whole array that gives the same "mean"). "mean" equals torch's
`reduction="mean"`.

`predictions` and `targets` must have the same shape: a mismatch raises ValueError at
trace time. torch broadcasts them with a warning, which turns a `[batch, 1]` against
`[batch]` slip into a `[batch, batch]` loss; `where` and `weights` are the ways to
broadcast here, and `gaussian_nll`'s `variance` takes the shapes torch accepts.

Float hyperparameters (`delta`, `beta`, `quantile`, `eps`) follow one policy: a Python
number out of range raises ValueError when the loss is called, naming the argument
and its range; a JAX array (a schedule under `jit`, a learnable value) is taken as it
is, with its gradient, and is never branched on in Python.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lossjax import _checks
from lossjax._reduce import (
    AxisName,
    compute_dtype,
    hyperparameter,
    kept_mask,
    reduce_loss,
    sanitize,
)

__all__ = [
    "squared_error",
    "absolute_error",
    "huber_loss",
    "smooth_l1_loss",
    "log_cosh",
    "poisson_nll",
    "gaussian_nll",
    "quantile_loss",
    "mean_absolute_percentage_error",
    "squared_log_error",
    "cosine_similarity_loss",
]
LOSS_NAMES = tuple(__all__)


def _setup(loss: str, predictions, targets, where):
    """Shared front half of the elementwise losses.

    Checks dtypes and shapes, builds the kept mask, runs the value checks, sanitizes
    excluded entries and upcasts. Returns (predictions, targets, kept).
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    _checks.check_float("predictions", predictions)
    _checks.check_float("targets", targets)
    _checks.check_same_shape("predictions", predictions, "targets", targets)
    kept = kept_mask(predictions.shape, where=where)
    _checks.assert_finite(loss, "predictions", predictions, kept)
    _checks.assert_finite(loss, "targets", targets, kept)
    dtype = compute_dtype(predictions, targets)
    p = sanitize(predictions, kept, 0).astype(dtype)
    t = sanitize(targets, kept, 0).astype(dtype)
    return p, t, kept


def squared_error(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Squared error (the L2 / MSE loss).

    The default regression loss: the negative log-likelihood of a unit-variance
    Gaussian, up to constants. Sensitive to outliers; see `huber_loss` when they
    matter. "mean" equals `torch.nn.functional.mse_loss`, Keras `MeanSquaredError`
    and `optax.losses.squared_error(...).mean()`.

    .. math::
        \ell = (p - t)^2

    Args:
      predictions: float, any shape `[...]`.
      targets: float, the shape of `predictions`.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]` (the shape of `predictions`); "sum", "mean": a scalar,
      "sum_and_weight" a pair of scalars.
      dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.squared_error(jnp.array([1.0, 2.0]), jnp.array([1.5, 0.0]))
      Array(2.125, dtype=float32)

    See also: `absolute_error`, `huber_loss`, `log_cosh`.
    """
    p, t, kept = _setup("squared_error", predictions, targets, where)
    return reduce_loss((p - t) ** 2, kept=kept, weights=weights,
                       reduction=reduction, axis_name=axis_name)


def absolute_error(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Absolute error (the L1 / MAE loss).

    Regression with a median rather than a mean target: robust to outliers, with a
    gradient of constant size. "mean" equals `torch.nn.functional.l1_loss` and Keras
    `MeanAbsoluteError`. At `p == t` the gradient is `jnp.abs`'s (1), torch's is 0.

    .. math::
        \ell = |p - t|

    Args:
      predictions: float, any shape `[...]`.
      targets: float, the shape of `predictions`.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.absolute_error(jnp.array([1.0, 2.0]), jnp.array([1.5, 0.0]))
      Array(1.25, dtype=float32)

    See also: `squared_error`, `smooth_l1_loss`, `quantile_loss`.
    """
    p, t, kept = _setup("absolute_error", predictions, targets, where)
    return reduce_loss(jnp.abs(p - t), kept=kept, weights=weights,
                       reduction=reduction, axis_name=axis_name)


def huber_loss(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    delta: float = 1.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Huber loss: quadratic for small errors, linear (slope `delta`) for large ones.

    Regression with outliers, and value targets in RL (DQN). Equals
    `torch.nn.functional.huber_loss`, `optax.losses.huber_loss` and Keras `Huber`
    elementwise; `huber_loss(delta=d) == d * smooth_l1_loss(beta=d)`.

    .. math::
        \ell = \begin{cases} \tfrac12 (p - t)^2 & |p - t| < \delta \\
               \delta\,(|p - t| - \tfrac12 \delta) & \text{otherwise} \end{cases}

    Args:
      predictions: float, any shape `[...]`.
      targets: float, the shape of `predictions`.
      delta: > 0, where the loss turns from quadratic to linear; may be a traced
        array.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.huber_loss(jnp.array([0.5, 3.0]), jnp.zeros(2), reduction="none")
      Array([0.125, 2.5  ], dtype=float32)

    References:
      Huber, Robust Estimation of a Location Parameter, 1964.

    See also: `smooth_l1_loss`, `log_cosh`, `squared_error`.
    """
    _checks.check_range("delta", delta, low=0, low_open=True)
    p, t, kept = _setup("huber_loss", predictions, targets, where)
    delta = hyperparameter(delta, p.dtype)
    d = p - t
    a = jnp.abs(d)
    # The select is on purpose: XLA:CPU fuses a select-free elementwise chain into
    # its library reduction, which runs each op as its own pass (optax's branch-free
    # form measured ~1.5x slower there); with the select the loss is one compiled loop
    # and only the sum goes to the library. d * d in the unselected branch may be
    # inf only where d is huge, and the select's gradient then multiplies finite d.
    loss = jnp.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def smooth_l1_loss(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    beta: float = 1.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Smooth L1 loss: quadratic below `beta`, then L1 (slope 1).

    Box regression in object detection (Fast R-CNN). Equals
    `torch.nn.functional.smooth_l1_loss`, including `beta=0` giving the plain L1
    loss. Unlike `huber_loss`, the linear part has slope 1 whatever `beta` is.

    .. math::
        \ell = \begin{cases} \tfrac{1}{2\beta} (p - t)^2 & |p - t| < \beta \\
               |p - t| - \tfrac12 \beta & \text{otherwise} \end{cases}

    Args:
      predictions: float, any shape `[...]`.
      targets: float, the shape of `predictions`.
      beta: >= 0, where the loss turns from quadratic to linear; 0 gives L1. May
        be a traced array (a traced 0 gives L1 too, with a finite gradient).
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.smooth_l1_loss(jnp.array([0.5, 3.0]), jnp.zeros(2), reduction="none")
      Array([0.125, 2.5  ], dtype=float32)

    References:
      Girshick, Fast R-CNN, 2015.

    See also: `huber_loss`, `absolute_error`.
    """
    _checks.check_range("beta", beta, low=0)
    p, t, kept = _setup("smooth_l1_loss", predictions, targets, where)
    d = p - t
    a = jnp.abs(d)
    if _checks.is_zero(beta):
        loss = a  # torch's special case: the quadratic piece would divide by 0
    else:
        # As in `huber_loss` (one loop, then the sum); one constant multiply rather
        # than a division per entry. A traced beta may be 0: a < 0 never holds, so the
        # loss is exactly |d|, and 1 / beta is taken at a safe 1 there (its unselected
        # branch then has a finite value and gradient, and beta's gradient is -1/2).
        beta = hyperparameter(beta, p.dtype)
        if isinstance(beta, jax.Array):
            inv = 0.5 / jnp.where(beta > 0, beta, 1.0)
        else:
            inv = 0.5 / beta
        loss = jnp.where(a < beta, inv * (d * d), a - 0.5 * beta)
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def log_cosh(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Log-cosh loss: like squared error near 0, like absolute error far away.

    A smooth (infinitely differentiable) alternative to `huber_loss` with no
    threshold to tune; the gradient is `tanh(p - t)`. Keras `LogCosh` and
    `optax.losses.log_cosh` compute the same value per entry (Keras then averages the
    last axis). Computed as `log1p(u^2 / (2 (1 + u)))` with `u = expm1(|x|)` for
    |x| < 10 (exact near 0, where optax's softplus form loses digits) and
    `log cosh(10) + |x| - 10` beyond (20 in float64), which is finite at any finite
    `x`, where `log(cosh(x))` overflows beyond |x| ~ 89 in float32.

    .. math::
        \ell = \log\cosh(p - t) = |x| + \log(1 + e^{-2|x|}) - \log 2,\quad x = p - t

    Args:
      predictions: float, any shape `[...]`.
      targets: float, the shape of `predictions`.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.log_cosh(jnp.array([1.0, 1e4]), jnp.zeros(2), reduction="none")
      Array([4.338e-01, 9.999e+03], dtype=float32)

    See also: `huber_loss`, `squared_error`.
    """
    p, t, kept = _setup("log_cosh", predictions, targets, where)
    a = jnp.abs(p - t)
    # log cosh a = log1p(cosh a - 1), with cosh a - 1 = u^2 / (2 (1 + u)), u = expm1(a):
    # exact near 0, where the softplus form cancels (its 1e-3 value would be 7% off in
    # float32). Past `cap`, log cosh a = a - log 2 + log1p(e^-2a) and the last term is
    # below the dtype's resolution, so log cosh a = log cosh(cap) + (a - cap): clamping
    # `a` at `cap` and adding back the excess keeps u^2 finite with no select, which
    # lets XLA:CPU fuse the whole loss into its reduction (1.8x faster than a select).
    cap = 20.0 if p.dtype == jnp.float64 else 10.0
    m = jnp.minimum(a, cap)
    u = jnp.expm1(m)
    loss = jnp.log1p(u * u / (2.0 * (1.0 + u))) + (a - m)
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def poisson_nll(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    log_input: bool = True,
    full: bool = False,
    eps: float = 1e-8,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Poisson negative log-likelihood of count targets.

    Regression of counts or rates (events, spikes, photon counts). Matches
    `torch.nn.functional.poisson_nll_loss` in every option: `log_input=True` takes
    log-rates (the stable choice), `log_input=False` takes rates and adds `eps`
    inside the log, and `full=True` adds the Stirling approximation of `log(t!)` for
    targets > 1 (0 for targets <= 1, as torch). Keras `Poisson` is
    `log_input=False` with its epsilon 1e-7.

    With `log_input=True` the loss holds `exp(p)`, which overflows to inf for
    `p` above ~88 in float32 (as in torch): the true value is that large.

    .. math::
        \ell = \begin{cases} e^{p} - t\,p & \text{log\_input} \\
               p - t \log(p + \epsilon) & \text{otherwise} \end{cases}
               + [\text{full}, t > 1]\,\big(t \log t - t + \tfrac12 \log(2\pi t)\big)

    Args:
      predictions: float, any shape `[...]`: log-rates (`log_input=True`) or rates
        (>= 0).
      targets: float counts >= 0, the shape of `predictions`.
      log_input: whether `predictions` are log-rates.
      full: whether to add the Stirling term, making the loss the full NLL.
      eps: > 0, added to the rate inside the log when `log_input=False` (torch's
        default); may be a traced array.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(predictions.dtype, float32)`.
      Checked mode asserts targets >= 0 (and rates >= 0 when `log_input=False`).

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.poisson_nll(jnp.array([0.0, 1.0]), jnp.array([1.0, 3.0]),
      ...                     reduction="none")
      Array([ 1.    , -0.2817], dtype=float32)

    See also: `gaussian_nll`.
    """
    _checks.check_range("eps", eps, low=0, low_open=True)
    p, t, kept = _setup("poisson_nll", predictions, targets, where)
    eps = hyperparameter(eps, p.dtype)
    _checks.assert_values("poisson_nll", "targets must be >= 0.", targets >= 0, kept)
    if log_input:
        loss = jnp.exp(p) - t * p
    else:
        _checks.assert_values(
            "poisson_nll", "predictions (rates, log_input=False) must be >= 0.",
            predictions >= 0, kept)
        loss = p - t * jnp.log(p + eps)
    if full:
        big = t > 1
        # The unselected branch is evaluated at t = 2 so that neither it nor its
        # gradient is NaN for targets <= 0.
        ts = jnp.where(big, t, 2.0)
        stirling = ts * jnp.log(ts) - ts + 0.5 * jnp.log(2.0 * math.pi * ts)
        loss = loss + jnp.where(big, stirling, 0.0)
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def _variance_to_shape(variance, shape: tuple[int, ...]) -> jax.Array:
    """Brings `variance` to the loss shape by torch's gaussian_nll_loss rules."""
    if isinstance(variance, (int, float)):
        variance = float(variance)
    variance = jnp.asarray(variance)
    _checks.check_float("variance", variance)
    vshape = variance.shape
    if vshape == shape or vshape == ():
        pass
    elif len(shape) >= 1 and vshape == shape[:-1]:
        # torch's homoscedastic case: one variance per row of the last axis (so
        # [n] against [n, n] is per row, not numpy's per column).
        variance = variance[..., None]
    elif len(vshape) == len(shape) and all(
            v in (s, 1) for v, s in zip(vshape, shape, strict=True)):
        pass
    else:
        raise ValueError(
            f"variance of shape {vshape} does not fit predictions of shape {shape}: "
            "it must have the same shape, that shape with size-1 axes, that shape "
            "without the last axis, or be a scalar."
        )
    return jnp.broadcast_to(variance, shape)


def gaussian_nll(
    predictions: jax.Array,
    targets: jax.Array,
    variance: jax.Array | float,
    *,
    full: bool = False,
    eps: float = 1e-6,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Gaussian negative log-likelihood with a predicted (or given) variance.

    Regression that also learns its uncertainty (heteroscedastic models, deep
    ensembles). Matches `torch.nn.functional.gaussian_nll_loss`: the variance is
    clamped below at `eps` with torch's no-grad clamp, so the forward uses
    `max(variance, eps)` while the gradient is that of the unclamped formula evaluated
    at the clamped value (a straight-through clamp; a plain `maximum` would give a
    zero gradient and stall a variance head stuck below eps). `full=True` adds
    `log(2 pi) / 2`.

    `variance` is a third data argument (not in the naming table: it is neither a
    prediction nor a target but the Gaussian's second parameter). Its shape may be
    that of `predictions` (heteroscedastic), that shape with size-1 axes, that shape
    without the last axis (one variance per row, torch's rule: `[n]` against
    `[n, n]` is per row), or a scalar.

    A negative variance gives NaN for that entry (torch raises eagerly, which cannot
    happen under jit); checked mode asserts variance >= 0.

    .. math::
        \ell = \tfrac12 \Big(\log \tilde v + \frac{(p - t)^2}{\tilde v}\Big)
               + [\text{full}]\,\tfrac12 \log 2\pi,\quad \tilde v = \max(v, \epsilon)

    Args:
      predictions: float, any shape `[...]`: the Gaussian means.
      targets: float, the shape of `predictions`.
      variance: float >= 0, see above for its shapes.
      full: whether to add the constant `log(2 pi) / 2`.
      eps: > 0, the variance's lower clamp (torch's default); may be a traced array.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype
      `promote_types(predictions.dtype, variance.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.gaussian_nll(jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]),
      ...                      jnp.array([1.0, 0.5]), reduction="none")
      Array([ 0.5   , -0.3466], dtype=float32)

    References:
      Nix & Weigend, Estimating the mean and variance of the target probability
      distribution, 1994.

    See also: `poisson_nll`, `squared_error`.
    """
    _checks.check_range("eps", eps, low=0, low_open=True)
    predictions = jnp.asarray(predictions)
    variance = _variance_to_shape(variance, jnp.shape(predictions))
    p, t, kept = _setup("gaussian_nll", predictions, targets, where)
    _checks.assert_finite("gaussian_nll", "variance", variance, kept)
    _checks.assert_values("gaussian_nll", "variance must be >= 0.", variance >= 0, kept)
    v = sanitize(variance, kept, 1).astype(compute_dtype(p, variance))
    p, t = p.astype(v.dtype), t.astype(v.dtype)
    negative = v < 0
    # torch's `with no_grad(): var.clamp_(min=eps)`: below eps the value is eps but
    # d(clamped)/d(variance) stays 1, so the formula's gradient at eps flows through
    # (and a traced eps gets its own gradient, 1, there).
    eps = hyperparameter(eps, v.dtype)
    v = jnp.where(v < eps, eps + (v - jax.lax.stop_gradient(v)), v)
    loss = 0.5 * (jnp.log(v) + (p - t) ** 2 / v)
    if full:
        loss = loss + 0.5 * math.log(2.0 * math.pi)
    loss = jnp.where(negative, jnp.nan, loss)
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def quantile_loss(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    quantile: float = 0.5,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Quantile (pinball) loss: its minimizer is the `quantile`-quantile of the target.

    Quantile regression and prediction intervals (e.g. 0.1 / 0.5 / 0.9 heads).
    `quantile=0.5` is half the absolute error. Matches TensorFlow Addons
    `PinballLoss` elementwise (no torch or optax counterpart).

    .. math::
        \ell = \max\big(q\,(t - p),\ (q - 1)\,(t - p)\big)

    Args:
      predictions: float, any shape `[...]`.
      targets: float, the shape of `predictions`.
      quantile: q in (0, 1); may be a traced array.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.quantile_loss(jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]),
      ...                       quantile=0.9, reduction="none")
      Array([0.9, 0.1], dtype=float32)

    References:
      Koenker & Bassett, Regression Quantiles, 1978.

    See also: `absolute_error`.
    """
    _checks.check_range("quantile", quantile, low=0, high=1, low_open=True,
                        high_open=True)
    p, t, kept = _setup("quantile_loss", predictions, targets, where)
    quantile = hyperparameter(quantile, p.dtype)
    r = t - p
    loss = jnp.maximum(quantile * r, (quantile - 1.0) * r)
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def mean_absolute_percentage_error(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    eps: float = 1e-7,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Absolute percentage error, Keras's MAPE (in percent).

    Regression where relative error matters (forecasting). Matches Keras
    `MeanAbsolutePercentageError`: the error is divided by `max(|t|, eps)` with Keras's
    epsilon 1e-7, so a zero target gives a huge but finite loss, and the result is
    times 100. "mean" is Keras's value (Keras averages the last axis, then the batch).

    .. math::
        \ell = 100\, \frac{|t - p|}{\max(|t|, \epsilon)}

    Args:
      predictions: float, any shape `[...]`.
      targets: float, the shape of `predictions`; best kept away from 0.
      eps: > 0, the floor on `|targets|` (Keras's `backend.epsilon()`); may be a
        traced array.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.mean_absolute_percentage_error(jnp.array([1.1, 1.5]),
      ...                                        jnp.array([1.0, 2.0]))
      Array(17.5, dtype=float32)

    See also: `absolute_error`, `squared_log_error`.
    """
    _checks.check_range("eps", eps, low=0, low_open=True)
    p, t, kept = _setup("mean_absolute_percentage_error", predictions, targets, where)
    eps = hyperparameter(eps, p.dtype)
    loss = 100.0 * jnp.abs(t - p) / jnp.maximum(jnp.abs(t), eps)
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def squared_log_error(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Squared logarithmic error, Keras's MSLE.

    Regression of positive quantities spanning orders of magnitude (prices, counts),
    where relative error matters. Like Keras `MeanSquaredLogarithmicError`, negative
    values are clipped first; we clip at 0 where Keras clips at its epsilon 1e-7, a
    difference below 1e-7 in each log. The gradient is 0 below the clip, and at
    exactly 0 it is `jnp.maximum`'s (half).

    .. math::
        \ell = \big(\log(1 + \max(p, 0)) - \log(1 + \max(t, 0))\big)^2

    Args:
      predictions: float, any shape `[...]`.
      targets: float, the shape of `predictions`.
      where: bool, broadcastable to `[...]`; False entries count for nothing.
      weights: float, broadcastable to `[...]`; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": `[...]`; "sum", "mean": a scalar, "sum_and_weight" a
      pair of scalars. dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.squared_log_error(jnp.array([0.0, 3.0]), jnp.array([1.0, -2.0]),
      ...                           reduction="none")
      Array([0.4805, 1.922], dtype=float32)

    See also: `squared_error`, `mean_absolute_percentage_error`.
    """
    p, t, kept = _setup("squared_log_error", predictions, targets, where)
    # log1p is exact near 0, where log(1 + x) loses the digits of small values.
    d = jnp.log1p(jnp.maximum(p, 0.0)) - jnp.log1p(jnp.maximum(t, 0.0))
    return reduce_loss(d**2, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def _norm_clamped(x: jax.Array, eps: float) -> jax.Array:
    """||x|| over the last axis (kept), clamped below at eps the way torch does it.

    torch's cosine_similarity clamps the norm under no_grad: the value is
    max(||x||, eps) but the gradient flows as if unclamped. The norm itself has a
    zero (not NaN) gradient at x = 0.
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    pos = sq > 0
    n = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return jnp.where(n < eps, eps + (n - jax.lax.stop_gradient(n)), n)


def cosine_similarity_loss(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    axis: int = -1,
    eps: float = 1e-8,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""One minus the cosine similarity of two vectors along `axis`.

    Embedding regression and distillation where direction matters and length does
    not. Equals `1 - torch.nn.functional.cosine_similarity(p, t, dim=axis, eps=eps)`
    in value and gradient (each vector divided by `max(||x||, eps)`, torch's no-grad
    clamp), `optax.losses.cosine_distance` with `epsilon=eps`, and
    `torch.nn.functional.cosine_embedding_loss` with target 1 (which adds 1e-12 under
    its square root instead). A zero vector has cosine 0, so loss 1.

    .. math::
        \ell = 1 - \sum_k \frac{p_k}{\max(\|p\|, \epsilon)}
                           \frac{t_k}{\max(\|t\|, \epsilon)}

    Args:
      predictions: float, `[..., dim, ...]` with the vector on `axis`.
      targets: float, the shape of `predictions`.
      axis: the vector axis; it is absent from the loss shape.
      eps: > 0, the floor on each vector's norm (torch's default); may be a traced
        array.
      where: bool, broadcastable to the loss shape; False entries count for nothing.
      weights: float, broadcastable to the loss shape; per-entry weights.
      reduction: "none", "sum", "mean" or "sum_and_weight" (the pair
        (sum, weight) that "mean" divides, see `lossjax.reduce_loss`).
      axis_name: the mesh / pmap axis (or tuple) over which the batch is
        sharded; "sum"/"mean" are then over the global batch, with exact
        values and gradients under shard_map and pmap; "none" stays local
        (the README's contract).

    Returns:
      "none": the loss shape (`predictions.shape` without `axis`); "sum", "mean": a
      scalar, "sum_and_weight" a pair of scalars.
      dtype `promote_types(predictions.dtype, float32)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> p = jnp.array([[1.0, 0.0], [3.0, 4.0]])
      >>> lossjax.cosine_similarity_loss(p, jnp.array([[0.0, 2.0], [6.0, 8.0]]),
      ...                                reduction="none")
      Array([1., 0.], dtype=float32)

    See also: `squared_error`, `kl_divergence`.
    """
    _checks.check_range("eps", eps, low=0, low_open=True)
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    _checks.check_float("predictions", predictions)
    _checks.check_float("targets", targets)
    _checks.check_same_shape("predictions", predictions, "targets", targets)
    _checks.check_rank("predictions", predictions, 1, at_least=True)
    axis = _checks.normalize_axis(axis, predictions.ndim)
    p = jnp.moveaxis(predictions, axis, -1)
    t = jnp.moveaxis(targets, axis, -1)
    kept = kept_mask(p.shape[:-1], where=where)
    kept_v = None if kept is None else kept[..., None]
    _checks.assert_finite("cosine_similarity_loss", "predictions", p, kept_v)
    _checks.assert_finite("cosine_similarity_loss", "targets", t, kept_v)
    dtype = compute_dtype(p, t)
    p = sanitize(p, kept, 0, axis=-1).astype(dtype)
    t = sanitize(t, kept, 0, axis=-1).astype(dtype)
    # (p . t) / (|p| |t|) equals the sum of the normalized vectors' products with
    # one division per vector instead of two per element.
    eps = hyperparameter(eps, dtype)
    norms = (_norm_clamped(p, eps) * _norm_clamped(t, eps))[..., 0]
    cos = jnp.sum(p * t, axis=-1) / norms
    return reduce_loss(1.0 - cos, kept=kept, weights=weights,
                       reduction=reduction, axis_name=axis_name)
