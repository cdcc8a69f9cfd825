"""lossjax: loss functions as pure functions of JAX arrays, under one contract.

Every loss takes its data positionally and everything else by keyword, accepts
`where=`, `weights=`, `reduction=` ("none" | "sum" | "mean" | "sum_and_weight") and
`axis_name=` (the batch axis inside `shard_map` / `pmap`), runs in at least float32,
and works under jit, vmap, grad, pmap and shard_map. See README.md.
"""

from __future__ import annotations

from lossjax import (
    classification,
    contrastive,
    distillation,
    divergence,
    large_vocab,
    pairwise,
    preference,
    regression,
    sequence,
)
from lossjax._checks import checked
from lossjax._reduce import global_sum, reduce_loss, sanitize
from lossjax.classification import (
    binary_cross_entropy,
    cross_entropy,
    focal_loss,
    hinge_loss,
    multiclass_hinge_loss,
    nll_loss,
    poly1_cross_entropy,
    sigmoid_focal_loss,
    soft_margin_loss,
    squared_hinge_loss,
)
from lossjax.contrastive import (
    batch_triplet_loss,
    circle_loss,
    clip_loss,
    info_nce,
    ntxent,
    sigmoid_contrastive_loss,
    supervised_contrastive_loss,
)
from lossjax.distillation import (
    distillation_loss,
    generalized_jsd_loss,
    linear_distillation_loss,
    linear_generalized_jsd_loss,
    linear_topk_distillation_loss,
)
from lossjax.divergence import js_divergence, kl_divergence, kl_divergence_with_logits
from lossjax.large_vocab import (
    linear_cross_entropy,
    linear_sequence_logprobs,
    linear_token_logprobs,
)
from lossjax.pairwise import (
    cosine_embedding_loss,
    hinge_embedding_loss,
    margin_ranking_loss,
    multilabel_margin_loss,
    multilabel_soft_margin_loss,
    triplet_margin_loss,
)
from lossjax.preference import (
    cpo_loss,
    dpo_loss,
    kto_loss,
    linear_dpo_loss,
    orpo_loss,
    simpo_loss,
)
from lossjax.regression import (
    absolute_error,
    cosine_similarity_loss,
    gaussian_nll,
    huber_loss,
    log_cosh,
    mean_absolute_percentage_error,
    poisson_nll,
    quantile_loss,
    smooth_l1_loss,
    squared_error,
    squared_log_error,
)
from lossjax.sequence import (
    ctc_beam_search,
    ctc_greedy_decode,
    ctc_loss,
    lengths_to_padding_mask,
    padding_mask_to_lengths,
)

_FAMILIES = (classification, regression, divergence, sequence, large_vocab,
             preference, distillation,
             contrastive, pairwise)

# The registry stays generated from each family's LOSS_NAMES: a new loss joins it (and
# the test matrix driven by it) by being listed there.
LOSSES = {
    name: getattr(family, name) for family in _FAMILIES for name in family.LOSS_NAMES
}


def get(name: str):
    """Returns the loss registered as `name`; KeyError lists the valid names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(
            f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}"
        ) from None


def family_of(name: str) -> str:
    """The family (module) a registered loss belongs to, e.g. "classification"."""
    return get(name).__module__.rsplit(".", 1)[-1]


def print_table() -> None:
    """Prints every registered loss with its family and summary line."""
    width = max(len(n) for n in LOSSES)
    for name in sorted(LOSSES, key=lambda n: (family_of(n), n)):
        summary = (LOSSES[name].__doc__ or "").strip().splitlines()[0]
        print(f"{name:<{width}}  {family_of(name):<15} {summary}")


__all__ = [
    "LOSSES",
    "batch_triplet_loss",
    "circle_loss",
    "clip_loss",
    "cosine_embedding_loss",
    "hinge_embedding_loss",
    "info_nce",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "ntxent",
    "sigmoid_contrastive_loss",
    "supervised_contrastive_loss",
    "triplet_margin_loss",
    "absolute_error",
    "binary_cross_entropy",
    "checked",
    "cosine_similarity_loss",
    "cpo_loss",
    "cross_entropy",
    "ctc_beam_search",
    "ctc_greedy_decode",
    "ctc_loss",
    "distillation_loss",
    "dpo_loss",
    "family_of",
    "focal_loss",
    "gaussian_nll",
    "generalized_jsd_loss",
    "get",
    "global_sum",
    "hinge_loss",
    "huber_loss",
    "js_divergence",
    "kl_divergence",
    "kl_divergence_with_logits",
    "kto_loss",
    "lengths_to_padding_mask",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_dpo_loss",
    "linear_generalized_jsd_loss",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
    "linear_topk_distillation_loss",
    "log_cosh",
    "mean_absolute_percentage_error",
    "multiclass_hinge_loss",
    "nll_loss",
    "orpo_loss",
    "padding_mask_to_lengths",
    "poisson_nll",
    "poly1_cross_entropy",
    "print_table",
    "quantile_loss",
    "reduce_loss",
    "sanitize",
    "sigmoid_focal_loss",
    "simpo_loss",
    "smooth_l1_loss",
    "soft_margin_loss",
    "squared_error",
    "squared_hinge_loss",
    "squared_log_error",
]
