"""Float64 NumPy references, written from the formulas and independent of jax.nn.

Each family keeps its references in its own section below. Every function takes and
returns NumPy arrays and computes the per-entry loss (reduction "none", unweighted)
unless its docstring says otherwise; `reduce` applies the contract's reductions.
"""

from __future__ import annotations

import numpy as np


def reduce(loss, *, kept=None, weights=None, reduction="mean", normalizer=None):
    """The contract's reductions, written out plainly in float64."""
    loss = np.asarray(loss, np.float64)
    kept = np.ones(loss.shape, bool) if kept is None else np.broadcast_to(kept, loss.shape)
    w = np.ones(loss.shape) if weights is None else np.broadcast_to(weights, loss.shape)
    n = w if normalizer is None else np.broadcast_to(normalizer, loss.shape)
    out = np.where(kept, w * np.where(kept, loss, 0.0), 0.0)
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    denom = np.where(kept, n, 0.0).sum()
    return out.sum() / denom if denom != 0 else 0.0


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


# --- classification -------------------------------------------------------------------


# --- regression -----------------------------------------------------------------------


# --- divergence -----------------------------------------------------------------------
