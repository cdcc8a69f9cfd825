"""lossjax: loss functions as pure functions of JAX arrays, under one contract.

Every loss takes its data positionally and everything else by keyword, accepts
`where=`, `weights=` and `reduction=` ("none" | "sum" | "mean"), runs in at least
float32, and works under jit, vmap, grad, pmap and shard_map. See README.md.
"""

from __future__ import annotations

from lossjax import classification, divergence, large_vocab, regression, sequence
from lossjax._checks import checked

_FAMILIES = (classification, regression, divergence, sequence, large_vocab)

# The flat public namespace: every family's public names, e.g. lossjax.cross_entropy.
for _family in _FAMILIES:
    for _name in _family.__all__:
        globals()[_name] = getattr(_family, _name)

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


__all__ = [n for f in _FAMILIES for n in f.__all__] + [
    "LOSSES",
    "checked",
    "family_of",
    "get",
    "print_table",
]
