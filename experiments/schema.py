"""The config schema: every field a config may have, its defaults and allowed values.

`validate_config(config)` turns a `ConfigDict` into flat validated fields
(`{"optimizer.learning_rate": 3e-3, ...}`); every other module reads those.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import ml_collections as mlc

import lossjax

# Every field a config may have; a field outside this schema is an error (a typo such
# as `optimizer.learnig_rate` must not be silently ignored). `None` marks a dict of
# free-form keyword arguments.
SCHEMA: dict[str, Any] = {
    "seed": int, "num_train_steps": int, "batch_size": int,
    "log_every_steps": int, "eval_every_steps": int, "checkpoint_every_steps": int,
    "keep_checkpoints": int, "parallel": str, "dtype": str, "checks": bool,
    "init_from": str, "progress_bar": bool, "beam_width": int,
    "mesh": {"data": int, "fsdp": int, "model": int},
    "data": {"name": str, "kwargs": None, "train_source": str},
    "model": {"name": str, "kwargs": None},
    "loss": {"name": str, "kwargs": None, "target": str},
    "optimizer": {"name": str, "learning_rate": float, "schedule": str,
                  "warmup_steps": int, "weight_decay": float, "momentum": float,
                  "grad_clip": float},
}
REQUIRED = ("seed", "num_train_steps", "batch_size", "log_every_steps",
            "eval_every_steps", "checkpoint_every_steps", "loss.name", "loss.kwargs",
            "optimizer.name", "optimizer.learning_rate", "parallel", "dtype",
            "checks", "data.name", "model.name")
DEFAULTS = {
    "keep_checkpoints": 3, "init_from": "", "progress_bar": True, "beam_width": 8,
    "data.kwargs": {}, "data.train_source": "", "model.kwargs": {},
    "loss.target": "labels",
    "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
    "optimizer.weight_decay": 0.0, "optimizer.momentum": 0.9,
    "optimizer.grad_clip": 0.0,
    "mesh.data": -1, "mesh.fsdp": 1, "mesh.model": 1,
}
# How model outputs meet the loss: the keys of `experiments.tasks.ADAPTERS` (a test
# keeps the two equal; this module does not import the adapters' flax and optax).
LOSS_TARGETS = ("labels", "one_hot", "value", "mean_variance", "ctc", "tokens",
                "views", "view_pairs", "view_classes")
ALLOWED = {
    "parallel": ("jit", "pmap"),
    "dtype": ("float32", "bfloat16"),
    "loss.target": LOSS_TARGETS,
    "optimizer.name": ("adam", "adamw", "sgd"),
    "optimizer.schedule": ("constant", "cosine"),
}
_POSITIVE = ("num_train_steps", "batch_size", "log_every_steps", "eval_every_steps",
             "checkpoint_every_steps", "keep_checkpoints", "beam_width")
# Keywords of every loss that belong to the trainer (masks, reduction, mesh axes),
# not to the config.
_TRAINER_KEYWORDS = ("where", "weights", "reduction", "axis_name", "vocab_axis_name")


def _flatten(d, prefix=""):
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, mlc.ConfigDict)) and not name.endswith("kwargs"):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _schema_fields(schema=SCHEMA, prefix=""):
    for key, kind in schema.items():
        if isinstance(kind, dict):
            yield from _schema_fields(kind, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def loss_keywords(name: str) -> list[str]:
    """The keywords of loss `name` a config may set (KeyError for an unknown loss)."""
    params = inspect.signature(lossjax.get(name)).parameters
    return [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY
            and n not in _TRAINER_KEYWORDS]


def validate_config(config: mlc.ConfigDict) -> dict[str, Any]:
    """Checks `config` against the schema; returns its flat fields with defaults filled.

    Raises ValueError for an unknown field (with the closest valid name), a missing
    field, a value outside its allowed set or a keyword the loss does not take (naming
    the valid ones), and KeyError (listing the valid names) for an unknown loss.
    """
    cfg = config.to_dict() if isinstance(config, mlc.ConfigDict) else dict(config)
    flat = dict(_flatten(cfg))
    valid = list(_schema_fields())
    for name in flat:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config field {name!r}{hint} Valid fields: "
                             f"{', '.join(valid)}.")
    missing = [n for n in REQUIRED if n not in flat]
    if missing:
        raise ValueError(f"config is missing required fields: {', '.join(missing)}.")
    flat = {**DEFAULTS, **flat}
    for name, allowed in ALLOWED.items():
        if flat[name] not in allowed:
            raise ValueError(f"config.{name}={flat[name]!r} is not one of "
                             f"{', '.join(map(repr, allowed))}.")
    keywords = loss_keywords(flat["loss.name"])  # KeyError listing the valid names
    for key in flat["loss.kwargs"]:
        if key not in keywords:
            raise ValueError(
                f"config.loss.kwargs.{key}: {flat['loss.name']} has no keyword "
                f"{key!r} the trainer may set; valid: {', '.join(keywords)}.")
    for name in _POSITIVE:
        if flat[name] <= 0:
            raise ValueError(f"config.{name} must be positive, got {flat[name]}.")
    return flat


def optimizer_fields(flat: dict[str, Any]) -> dict[str, Any]:
    """The `optimizer.*` fields of validated `flat`, without the prefix."""
    return {k.split(".", 1)[1]: v for k, v in flat.items()
            if k.startswith("optimizer.")}
