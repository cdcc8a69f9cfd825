"""Preference-optimization losses on per-sequence log-probabilities: DPO and its
variants, ORPO, SimPO, CPO and KTO, and the fused DPO of a linear head.

Each loss takes per-sequence log-probabilities, `log pi(y | x) = sum_t log p(y_t)`
(of the policy, and where the method has one, of the frozen reference model), as
`[batch]` arrays, one entry per pair (KTO: per unpaired example), and returns a loss
of shape `[batch]` before the contract's `where` / `weights` / `reduction` /
`axis_name`. `linear_sequence_logprobs` computes the log-probabilities from a
model's final hidden states and head without the `[batch, seq, vocab]` logits;
`linear_dpo_loss` is the whole DPO loss from the two sequences' hidden states.

Formulas and defaults follow TRL (`DPOTrainer.dpo_loss`, `CPOTrainer`, `ORPOTrainer`,
`KTOTrainer`), written here from the papers; where TRL's trainer averages a term over
tokens of the whole batch rather than per pair, the docstring says so.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from lossjax import _checks
from lossjax._reduce import (
    AxisName,
    compute_dtype,
    hyperparameter,
    kept_mask,
    reduce_loss,
    sanitize,
)
from lossjax.large_vocab import linear_sequence_logprobs

__all__ = [
    "dpo_loss",
    "orpo_loss",
    "simpo_loss",
    "cpo_loss",
    "kto_loss",
    "linear_dpo_loss",
]
LOSS_NAMES = tuple(__all__)

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "bco_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
)
_EXO_EPSILON = 1e-3  # TRL's exo_pair smoothing when label_smoothing is 0


def _setup(loss, names, arrays, where, optional=()):
    """Checks same-shape float `[batch]` inputs (and optional ones of the same shape);
    returns them upcast and sanitized, the kept mask and the compute dtype."""
    arrays = [jnp.asarray(a) for a in arrays]
    optional = [None if a is None else jnp.asarray(a) for a in optional]
    for n, a in zip(names, arrays, strict=True):
        _checks.check_float(n, a)
        _checks.check_rank(n, a, 1, at_least=True)
        _checks.check_same_shape(names[0], arrays[0], n, a)
    dtype = compute_dtype(*arrays)
    kept = kept_mask(arrays[0].shape, where=where)
    for n, a in zip(names, arrays, strict=True):
        _checks.assert_finite(loss, n, a, kept)
    # Excluded entries become -1, a valid log-probability (0 would put ORPO's
    # log(1 - e^0) = -inf into the backward).
    out = [sanitize(a, kept, -1).astype(dtype) for a in arrays]
    opt = [None if a is None else sanitize(a, kept, 1).astype(dtype) for a in optional]
    return out, opt, kept, dtype


def _check_lengths(names, lengths, shape):
    for n, a in zip(names, lengths, strict=True):
        if a is not None:
            _checks.check_shape(n, jnp.asarray(a), shape, against=f"the logps {shape}")


def _smoothed_sigmoid(x, eps):
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x), in log space (stable)."""
    return -(1 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | jax.Array = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    bco_delta: float | jax.Array = 0.0,
    return_rewards: bool = False,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
):
    r"""Direct Preference Optimization and its variants, TRL's `loss_type`s.

    For preference pairs (a chosen and a rejected response per prompt) with a frozen
    reference model. With the policy's and the reference's per-sequence
    log-probabilities, `u = chosen - ref_chosen`, `v = rejected - ref_rejected`
    (the implicit rewards over beta) and the DPO margin `z = u - v`:

    .. math::
        \text{sigmoid}: &-(1-\epsilon)\log\sigma(\beta z) - \epsilon\log\sigma(-\beta z)
            \quad\text{(DPO; conservative DPO for } \epsilon > 0)\\
        \text{robust}: &\big(-(1-\epsilon)\log\sigma(\beta z)
            + \epsilon\log\sigma(-\beta z)\big) / (1 - 2\epsilon)\\
        \text{hinge}: &\max(0, 1 - \beta z) \quad\text{(SLiC)}\\
        \text{ipo}: &(z - 1/(2\beta))^2, \text{ log-probs divided by length}\\
        \text{exo\_pair}: &\sigma(\beta z)(\log\sigma(\beta z) - \log(1-\epsilon))
            + \sigma(-\beta z)(\log\sigma(-\beta z) - \log\epsilon),
            \ \epsilon = 10^{-3} \text{ if } 0\\
        \text{bco\_pair}: &-\log\sigma(\beta u - \delta)
            - \log\sigma(-(\beta v - \delta))\\
        \text{nca\_pair}: &-\log\sigma(\beta u) - \tfrac12\log\sigma(-\beta u)
            - \tfrac12\log\sigma(-\beta v)\\
        \text{sppo\_hard}: &(u - 1/(2\beta))^2 + (v + 1/(2\beta))^2\\
        \text{apo\_zero}: &1 - \sigma(\beta u) + \sigma(\beta v)\\
        \text{apo\_down}: &\sigma(\beta u) + 1 - \sigma(\beta z)

    IPO (as TRL) normalizes all four log-probabilities by their response lengths
    first: pass `chosen_lengths` and `rejected_lengths` (token counts, e.g. the
    counts of `linear_sequence_logprobs`). `bco_pair`'s `delta` is the running mean
    of the rewards that the trainer keeps (TRL's `RunningMoments`), passed in as
    `bco_delta`.

    Args:
      chosen_logps, rejected_logps: float `[batch]`, the policy's summed
        log-probabilities of the chosen and rejected responses.
      ref_chosen_logps, ref_rejected_logps: float `[batch]`, the reference model's
        (precomputed; no gradient is expected through them, but they get one).
      beta: the KL coefficient, > 0 (TRL's default 0.1); may be traced.
      loss_type: one of `DPO_LOSS_TYPES`.
      label_smoothing: epsilon in [0, 0.5] (robust: [0, 0.5)); used by sigmoid,
        robust and exo_pair; may be traced.
      chosen_lengths, rejected_lengths: `[batch]` token counts; required for "ipo",
        ignored otherwise.
      bco_delta: bco_pair's reward shift (running mean of the rewards).
      return_rewards: also return `(chosen_rewards, rejected_rewards)`, the
        trainers' logged `beta * (policy - reference)` per pair (gradient stopped,
        0 where excluded).
      where, weights, reduction, axis_name: the contract (loss shape `[batch]`).

    Returns:
      The loss ("none": `[batch]`; "sum"/"mean": scalar; "sum_and_weight": a pair);
      with `return_rewards`, `(loss, chosen_rewards, rejected_rewards)`.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.dpo_loss(jnp.array([-5.0]), jnp.array([-9.0]),
      ...                  jnp.array([-6.0]), jnp.array([-8.0]), beta=0.5)
      Array(0.3133, dtype=float32)

    References:
      Rafailov et al., Direct Preference Optimization, 2023 (sigmoid); Mitchell, A
      note on DPO with noisy preferences, 2023 (label smoothing); Chowdhury et al.,
      Provably Robust DPO, 2024 (robust); Zhao et al., SLiC-HF, 2023 (hinge); Azar
      et al., A General Theoretical Paradigm (IPO), 2023; Ji et al., Towards
      Efficient Exact Optimization (EXO), 2024; Jung et al., Binary Classifier
      Optimization (BCO), 2024; Chen et al., Noise Contrastive Alignment (NCA),
      2024; Wu et al., Self-Play Preference Optimization (SPPO), 2024; D'Oosterlinck
      et al., Anchored Preference Optimization (APO), 2024.

    See also: `linear_dpo_loss`, `simpo_loss`, `orpo_loss`, `kto_loss`.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}.")
    _checks.check_range("beta", beta, low=0, low_open=True)
    _checks.check_range("label_smoothing", label_smoothing, low=0, high=0.5,
                        high_open=loss_type == "robust")
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            'loss_type="ipo" normalizes by length: pass chosen_lengths= and '
            "rejected_lengths= (token counts, [batch]).")
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps",
             "ref_rejected_logps")
    shape = jnp.shape(chosen_logps)
    _check_lengths(("chosen_lengths", "rejected_lengths"),
                   (chosen_lengths, rejected_lengths), shape)
    (c, r, rc, rr), (lc, lr), kept, dtype = _setup(
        "dpo_loss", names, (chosen_logps, rejected_logps, ref_chosen_logps,
                            ref_rejected_logps), where,
        optional=((chosen_lengths, rejected_lengths) if loss_type == "ipo"
                  else (None, None)))
    if loss_type == "ipo":
        c, rc, r, rr = c / lc, rc / lc, r / lr, rr / lr
    b = hyperparameter(beta, dtype)
    eps = hyperparameter(label_smoothing, dtype)
    u, v = c - rc, r - rr
    z = u - v
    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(b * z, eps)
    elif loss_type == "robust":
        loss = (-(1 - eps) * jax.nn.log_sigmoid(b * z)
                + eps * jax.nn.log_sigmoid(-b * z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = jax.nn.relu(1 - b * z)
    elif loss_type == "ipo":
        loss = (z - 1 / (2 * b)) ** 2
    elif loss_type == "exo_pair":
        e = jnp.where(eps == 0, _EXO_EPSILON, eps)
        x = b * z
        loss = (jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - jnp.log1p(-e))
                + jax.nn.sigmoid(-x) * (jax.nn.log_sigmoid(-x) - jnp.log(e)))
    elif loss_type == "bco_pair":
        delta = hyperparameter(bco_delta, dtype)
        loss = (-jax.nn.log_sigmoid(b * u - delta)
                - jax.nn.log_sigmoid(-(b * v - delta)))
    elif loss_type == "nca_pair":
        loss = (-jax.nn.log_sigmoid(b * u) - 0.5 * jax.nn.log_sigmoid(-b * u)
                - 0.5 * jax.nn.log_sigmoid(-b * v))
    elif loss_type == "sppo_hard":
        loss = (u - 0.5 / b) ** 2 + (v + 0.5 / b) ** 2
    elif loss_type == "apo_zero":
        loss = 1 - jax.nn.sigmoid(b * u) + jax.nn.sigmoid(b * v)
    else:  # apo_down
        loss = jax.nn.sigmoid(b * u) + 1 - jax.nn.sigmoid(b * z)
    out = reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                      axis_name=axis_name)
    if not return_rewards:
        return out
    chosen_rewards, rejected_rewards = (
        lax.stop_gradient(x if kept is None else jnp.where(kept, x, 0))
        for x in (b * u, b * v))
    return out, chosen_rewards, rejected_rewards


def _average(logps, lengths):
    return logps if lengths is None else logps / lengths


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0: expm1 near 0, log1p far from it (Maechler 2012)."""
    return jnp.where(x > -math.log(2), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Odds-Ratio Preference Optimization: SFT on the chosen response plus an
    odds-ratio penalty, reference-free.

    With the policy's average log-probabilities `a_c = chosen / len_c`,
    `a_r = rejected / len_r`:

    .. math::
        \ell = -a_c - \beta \log\sigma\Big(\log\frac{e^{a_c}}{1 - e^{a_c}}
               - \log\frac{e^{a_r}}{1 - e^{a_r}}\Big)

    TRL's `ORPOTrainer` (default beta 0.1, its lambda) computes the same odds ratio
    from average log-probabilities; its NLL term is the cross-entropy averaged over
    all chosen tokens of the batch, where here it is the per-pair average
    (identical for equal lengths; for TRL's weighting pass `weights=chosen_lengths`
    to the NLL yourself). `log(1 - e^a)` is computed with `expm1`/`log1p` so the
    odds stay finite as `a -> 0`.

    Args:
      chosen_logps, rejected_logps: float `[batch]`, summed log-probabilities (or
        averages if no lengths are given).
      beta: weight of the odds-ratio term, >= 0; may be traced.
      chosen_lengths, rejected_lengths: `[batch]` token counts (None: the
        log-probabilities are already averages).
      where, weights, reduction, axis_name: the contract (loss shape `[batch]`).

    Returns:
      "none": `[batch]`; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.orpo_loss(jnp.array([-0.5]), jnp.array([-1.5]))
      Array(0.5171, dtype=float32)

    References:
      Hong, Lee & Thorne, ORPO: Monolithic Preference Optimization without
      Reference Model, 2024.

    See also: `simpo_loss`, `cpo_loss`, `dpo_loss`.
    """
    _checks.check_range("beta", beta, low=0)
    shape = jnp.shape(chosen_logps)
    _check_lengths(("chosen_lengths", "rejected_lengths"),
                   (chosen_lengths, rejected_lengths), shape)
    (c, r), (lc, lr), kept, dtype = _setup(
        "orpo_loss", ("chosen_logps", "rejected_logps"),
        (chosen_logps, rejected_logps), where,
        optional=(chosen_lengths, rejected_lengths))
    c, r = _average(c, lc), _average(r, lr)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    loss = -c - hyperparameter(beta, dtype) * jax.nn.log_sigmoid(log_odds)
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def simpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    gamma: float | jax.Array = 0.5,
    label_smoothing: float | jax.Array = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Simple Preference Optimization: length-normalized, reference-free DPO with a
    target margin.

    .. math::
        \ell = -(1-\epsilon)\log\sigma(\beta (a_c - a_r) - \gamma)
               - \epsilon\log\sigma(-\beta (a_c - a_r) + \gamma),
        \quad a = \text{logps} / \text{length}

    Defaults are TRL's `CPOConfig(loss_type="simpo")` (beta 0.1, simpo_gamma 0.5),
    without its `cpo_alpha` NLL term (that is `cpo_loss`); the SimPO paper itself
    tunes beta in [2, 2.5] and gamma / beta in [0.3, 0.8].

    Args:
      chosen_logps, rejected_logps: float `[batch]`, summed log-probabilities.
      beta: > 0; gamma: the target reward margin; label_smoothing: in [0, 0.5];
        each may be traced.
      chosen_lengths, rejected_lengths: `[batch]` token counts (None: the
        log-probabilities are already averages).
      where, weights, reduction, axis_name: the contract (loss shape `[batch]`).

    Returns:
      "none": `[batch]`; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.simpo_loss(jnp.array([-4.0]), jnp.array([-12.0]), beta=2.0,
      ...                    chosen_lengths=jnp.array([4]),
      ...                    rejected_lengths=jnp.array([6]))
      Array(0.2014, dtype=float32)

    References:
      Meng, Xia & Chen, SimPO: Simple Preference Optimization with a
      Reference-Free Reward, 2024.

    See also: `cpo_loss`, `orpo_loss`, `dpo_loss`.
    """
    _checks.check_range("beta", beta, low=0, low_open=True)
    _checks.check_range("label_smoothing", label_smoothing, low=0, high=0.5)
    shape = jnp.shape(chosen_logps)
    _check_lengths(("chosen_lengths", "rejected_lengths"),
                   (chosen_lengths, rejected_lengths), shape)
    (c, r), (lc, lr), kept, dtype = _setup(
        "simpo_loss", ("chosen_logps", "rejected_logps"),
        (chosen_logps, rejected_logps), where,
        optional=(chosen_lengths, rejected_lengths))
    x = (hyperparameter(beta, dtype) * (_average(c, lc) - _average(r, lr))
         - hyperparameter(gamma, dtype))
    loss = _smoothed_sigmoid(x, hyperparameter(label_smoothing, dtype))
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def cpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    alpha: float | jax.Array = 1.0,
    label_smoothing: float | jax.Array = 0.0,
    chosen_lengths: jax.Array | None = None,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Contrastive Preference Optimization: reference-free DPO plus NLL on chosen.

    .. math::
        \ell = -(1-\epsilon)\log\sigma(\beta (c - r))
               - \epsilon\log\sigma(-\beta(c - r)) - \alpha\, c / \text{len}_c

    with `c`, `r` the summed log-probabilities. Defaults are TRL's `CPOConfig`
    (beta 0.1, cpo_alpha 1.0, loss_type "sigmoid"); TRL averages the NLL over all
    chosen tokens of the batch, here it is per pair (`chosen_lengths`; None: the
    summed log-probability itself).

    Args:
      chosen_logps, rejected_logps: float `[batch]`, summed log-probabilities.
      beta: > 0; alpha: NLL weight >= 0; label_smoothing in [0, 0.5]; each may be
        traced.
      chosen_lengths: `[batch]` token counts of the chosen responses, or None.
      where, weights, reduction, axis_name: the contract (loss shape `[batch]`).

    Returns:
      "none": `[batch]`; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.cpo_loss(jnp.array([-4.0]), jnp.array([-12.0]),
      ...                  chosen_lengths=jnp.array([4]))
      Array(1.3711, dtype=float32)

    References:
      Xu et al., Contrastive Preference Optimization: Pushing the Boundaries of LLM
      Performance in Machine Translation, 2024.

    See also: `simpo_loss`, `orpo_loss`, `dpo_loss`.
    """
    _checks.check_range("beta", beta, low=0, low_open=True)
    _checks.check_range("alpha", alpha, low=0)
    _checks.check_range("label_smoothing", label_smoothing, low=0, high=0.5)
    shape = jnp.shape(chosen_logps)
    _check_lengths(("chosen_lengths",), (chosen_lengths,), shape)
    (c, r), (lc,), kept, dtype = _setup(
        "cpo_loss", ("chosen_logps", "rejected_logps"),
        (chosen_logps, rejected_logps), where, optional=(chosen_lengths,))
    x = hyperparameter(beta, dtype) * (c - r)
    loss = (_smoothed_sigmoid(x, hyperparameter(label_smoothing, dtype))
            - hyperparameter(alpha, dtype) * _average(c, lc))
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def kto_loss(
    logps: jax.Array,
    ref_logps: jax.Array,
    desirable: jax.Array,
    *,
    kl: float | jax.Array = 0.0,
    beta: float | jax.Array = 0.1,
    desirable_weight: float | jax.Array = 1.0,
    undesirable_weight: float | jax.Array = 1.0,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Kahneman-Tversky Optimization: unpaired desirable / undesirable examples.

    With the log-ratio `u = logps - ref_logps` and the reference point `z0`, the
    estimate of KL(policy || reference) clamped at 0 (gradient stopped, as TRL):

    .. math::
        \ell = \begin{cases}
        \lambda_D (1 - \sigma(\beta (u - z_0))) & \text{desirable}\\
        \lambda_U (1 - \sigma(\beta (z_0 - u))) & \text{undesirable}\end{cases}

    The KL estimate is the trainer's: TRL computes it as the batch mean of
    `policy - reference` log-probabilities of mismatched (prompt, completion)
    pairs, gathered over devices; pass it as `kl`. Defaults are TRL's `KTOConfig`
    (beta 0.1, desirable and undesirable weights 1).

    Args:
      logps, ref_logps: float `[batch]`, the policy's and reference's summed
        log-probabilities of each example's completion.
      desirable: bool `[batch]`, True for a desirable (chosen) example. ("desirable"
        is not a contract word: it is KTO's binary label.)
      kl: the scalar KL estimate (clamped at 0, no gradient).
      beta: > 0; desirable_weight, undesirable_weight: >= 0; each may be traced.
      where, weights, reduction, axis_name: the contract (loss shape `[batch]`).

    Returns:
      "none": `[batch]`; "sum"/"mean": a scalar; "sum_and_weight": a pair.

    Example:
      >>> import jax.numpy as jnp, lossjax
      >>> lossjax.kto_loss(jnp.array([-5.0, -9.0]), jnp.array([-6.0, -8.0]),
      ...                  jnp.array([True, False]), kl=0.5, reduction="none")
      Array([0.4875, 0.4626 ], dtype=float32)

    References:
      Ethayarajh et al., KTO: Model Alignment as Prospect Theoretic Optimization,
      2024.

    See also: `dpo_loss`.
    """
    _checks.check_range("beta", beta, low=0, low_open=True)
    _checks.check_range("desirable_weight", desirable_weight, low=0)
    _checks.check_range("undesirable_weight", undesirable_weight, low=0)
    desirable = jnp.asarray(desirable)
    _checks.check_bool("desirable", desirable)
    _checks.check_shape("desirable", desirable, jnp.shape(logps),
                        against=f"logps of shape {jnp.shape(logps)}")
    (p, q), _, kept, dtype = _setup("kto_loss", ("logps", "ref_logps"),
                                    (logps, ref_logps), where)
    z0 = jnp.maximum(lax.stop_gradient(jnp.asarray(kl, dtype)), 0)
    b = hyperparameter(beta, dtype)
    u = p - q
    loss = jnp.where(
        desirable,
        hyperparameter(desirable_weight, dtype) * (1 - jax.nn.sigmoid(b * (u - z0))),
        hyperparameter(undesirable_weight, dtype) * (1 - jax.nn.sigmoid(b * (z0 - u))),
    )
    return reduce_loss(loss, kept=kept, weights=weights, reduction=reduction,
                       axis_name=axis_name)


def linear_dpo_loss(
    chosen_hidden: jax.Array,
    rejected_hidden: jax.Array,
    kernel: jax.Array,
    chosen_labels: jax.Array,
    rejected_labels: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    bias: jax.Array | None = None,
    ignore_index: int = -100,
    logit_softcap: float | jax.Array | None = None,
    block_size: int | None = None,
    vocab_axis_name: AxisName = None,
    beta: float | jax.Array = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | jax.Array = 0.0,
    bco_delta: float | jax.Array = 0.0,
    return_rewards: bool = False,
    where: jax.Array | None = None,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis_name: AxisName = None,
):
    r"""The whole DPO loss from the policy's final hidden states and head, fused.

    `dpo_loss` of the policy's `linear_sequence_logprobs` of the chosen and the
    rejected responses (one fused pass over both: TRL's concatenated forward) and the
    precomputed reference log-probabilities: no `[batch, seq, vocab]` logits in the
    forward or the backward. For "ipo" the lengths are the kept-token counts.

    Args:
      chosen_hidden, rejected_hidden: float `[batch, seq, d]` (same shape; pad the
        shorter responses and mark the padding `ignore_index` in the labels).
      kernel: float `[d, vocab]` (local vocab shard with `vocab_axis_name`).
      chosen_labels, rejected_labels: integer `[batch, seq]`, aligned with the hidden
        states (shifted by the caller), `ignore_index` on prompt and padding.
      ref_chosen_logps, ref_rejected_logps: float `[batch]`.
      bias, ignore_index, logit_softcap, block_size, vocab_axis_name: as
        `linear_sequence_logprobs`.
      beta, loss_type, label_smoothing, bco_delta, return_rewards: as `dpo_loss`.
      where, weights, reduction, axis_name: the contract (loss shape `[batch]`).

    Returns:
      As `dpo_loss`.

    See also: `dpo_loss`, `linear_sequence_logprobs`.
    """
    chosen_hidden, rejected_hidden = (jnp.asarray(x) for x in (chosen_hidden,
                                                               rejected_hidden))
    chosen_labels, rejected_labels = (jnp.asarray(x) for x in (chosen_labels,
                                                               rejected_labels))
    _checks.check_rank("chosen_hidden", chosen_hidden, 3)
    _checks.check_same_shape("chosen_hidden", chosen_hidden, "rejected_hidden",
                             rejected_hidden)
    _checks.check_same_shape("chosen_labels", chosen_labels, "rejected_labels",
                             rejected_labels)
    pair_kept = kept_mask(chosen_hidden.shape[:1], where=where)
    tok_kept = None if pair_kept is None else pair_kept[:, None, None]
    _checks.assert_finite("linear_dpo_loss", "chosen_hidden", chosen_hidden, tok_kept)
    _checks.assert_finite("linear_dpo_loss", "rejected_hidden", rejected_hidden,
                          tok_kept)
    token_where = None if pair_kept is None else jnp.tile(pair_kept, 2)[:, None]
    logps, counts = linear_sequence_logprobs(
        jnp.concatenate([chosen_hidden, rejected_hidden]), kernel,
        jnp.concatenate([chosen_labels, rejected_labels]), bias=bias,
        ignore_index=ignore_index, logit_softcap=logit_softcap, where=token_where,
        block_size=block_size, vocab_axis_name=vocab_axis_name)
    n = chosen_hidden.shape[0]
    lengths = {}
    if loss_type == "ipo":
        # An excluded pair's count is 0: its logps are replaced before the division.
        lengths = dict(chosen_lengths=counts[:n], rejected_lengths=counts[n:])
    return dpo_loss(
        logps[:n], logps[n:], ref_chosen_logps, ref_rejected_logps, beta=beta,
        loss_type=loss_type, label_smoothing=label_smoothing, bco_delta=bco_delta,
        return_rewards=return_rewards, where=where, weights=weights,
        reduction=reduction, axis_name=axis_name, **lengths)
