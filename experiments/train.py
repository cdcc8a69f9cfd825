"""The trainer: `train_and_evaluate(config, workdir)` and its pure `train_step`.

Reads top to bottom: validate the config, build the data, model, optimizer and loss
(`lossjax.get(config.loss.name)`), create the state from `jax.eval_shape` and
initialise it already sharded, restore (workdir, else `config.init_from`, else from
scratch), then loop: batch of step s (a pure function of `(seed, s)`), step, and every
`log_every_steps` one host fetch of the metrics, which are checked for non-finite
values before anything is written or saved.

Mesh choice (conventions, section 5). `jax.make_mesh` builds Explicit-axes meshes by
default in jax 0.10; lossjax's experiments build theirs with
`axis_types=(AxisType.Auto,)` everywhere (`make_mesh` below) and never install a global
mesh with `jax.set_mesh`: shardings are stated on `jax.jit`'s inputs and outputs and
GSPMD propagates them through flax layers and losses, which need no `out_sharding`
annotations. `train_and_evaluate` thus changes no process-wide state, so tests can run
several trainers in one process.

Parallelism. `config.parallel="jit"` (the default): one `jax.jit` over a 1-D mesh
("data"), parameters and optimizer state replicated `P()`, batch split `P("data")`.
`config.parallel="pmap"`: the same `train_step` under `jax.pmap` with `lax.pmean` of
loss and gradients over the local devices, for code bases still on pmap.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import inspect
import json
import logging
import pathlib
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lossjax
from lossjax import _checks
from experiments import data as data_lib
from experiments import memory, models

log = logging.getLogger("experiments.train")

# How many times `train_step` has been traced in this process (tests assert that a run
# compiles its step once).
TRACE_COUNT: collections.Counter = collections.Counter()

# --- configuration ------------------------------------------------------------------

# Every field a config may have; a field outside this schema is an error (a typo such
# as `optimizer.learnig_rate` must not be silently ignored). `None` marks a dict of
# free-form keyword arguments.
_SCHEMA: dict[str, Any] = {
    "seed": int, "num_train_steps": int, "batch_size": int,
    "log_every_steps": int, "eval_every_steps": int, "checkpoint_every_steps": int,
    "keep_checkpoints": int, "parallel": str, "dtype": str, "checks": bool,
    "init_from": str, "progress_bar": bool, "beam_width": int,
    "data": {"name": str, "kwargs": None},
    "model": {"name": str, "kwargs": None},
    "loss": {"name": str, "kwargs": None, "target": str},
    "optimizer": {"name": str, "learning_rate": float, "schedule": str,
                  "warmup_steps": int, "weight_decay": float, "momentum": float,
                  "grad_clip": float},
}
_REQUIRED = ("seed", "num_train_steps", "batch_size", "log_every_steps",
             "eval_every_steps", "checkpoint_every_steps", "loss.name", "loss.kwargs",
             "optimizer.name", "optimizer.learning_rate", "parallel", "dtype",
             "checks", "data.name", "model.name")
_DEFAULTS = {
    "keep_checkpoints": 3, "init_from": "", "progress_bar": True, "beam_width": 8,
    "data.kwargs": {}, "model.kwargs": {}, "loss.target": "labels",
    "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
    "optimizer.weight_decay": 0.0, "optimizer.momentum": 0.9,
    "optimizer.grad_clip": 0.0,
}
# How model outputs and data labels are fed to the loss (see `apply_loss`).
LOSS_TARGETS = ("labels", "one_hot", "value", "mean_variance", "ctc", "tokens")
# Losses that take the model's final hidden states and head kernel instead of logits
# (with target "tokens": the model is called with `return_hidden=True`).
_FUSED_HEAD_LOSSES = ("linear_cross_entropy",)
_PARALLEL = ("jit", "pmap")
_DTYPES = ("float32", "bfloat16")
_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("constant", "cosine")


def _flatten(d, prefix=""):
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, mlc.ConfigDict)) and not name.endswith("kwargs"):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _schema_fields(schema=_SCHEMA, prefix=""):
    for key, kind in schema.items():
        if isinstance(kind, dict):
            yield from _schema_fields(kind, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def validate_config(config: mlc.ConfigDict) -> dict[str, Any]:
    """Checks `config` against the schema; returns its flat fields with defaults filled.

    Raises ValueError for an unknown field (with the closest valid name), a missing
    field, or a value outside its allowed set, and KeyError (listing the valid names)
    for an unknown loss.
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
    missing = [n for n in _REQUIRED if n not in flat]
    if missing:
        raise ValueError(f"config is missing required fields: {', '.join(missing)}.")
    flat = {**_DEFAULTS, **flat}
    for name, allowed in (("parallel", _PARALLEL), ("dtype", _DTYPES),
                          ("loss.target", LOSS_TARGETS),
                          ("optimizer.name", _OPTIMIZERS),
                          ("optimizer.schedule", _SCHEDULES)):
        if flat[name] not in allowed:
            raise ValueError(f"config.{name}={flat[name]!r} is not one of "
                             f"{', '.join(map(repr, allowed))}.")
    loss_fn = lossjax.get(flat["loss.name"])  # KeyError listing the valid names
    params = inspect.signature(loss_fn).parameters
    # where / weights / reduction belong to the trainer, not to the config.
    keywords = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY
                and n not in ("where", "weights", "reduction")]
    for key in flat["loss.kwargs"]:
        if key not in keywords:
            raise ValueError(
                f"config.loss.kwargs.{key}: {flat['loss.name']} has no keyword "
                f"{key!r} the trainer may set; valid: {', '.join(keywords)}.")
    for name in ("num_train_steps", "batch_size", "log_every_steps",
                 "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                 "beam_width"):
        if flat[name] <= 0:
            raise ValueError(f"config.{name} must be positive, got {flat[name]}.")
    return flat


# --- the task: model, optimizer and loss, fixed for a run -----------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """Everything `train_step` needs besides its state and batch; static."""

    model: nn.Module
    tx: optax.GradientTransformation
    loss_fn: Callable[..., jax.Array]
    loss_target: str
    num_classes: int  # 0 for regression
    axis_name: str | None = None  # set on the pmap path
    beam_width: int = 8  # CTC beam search at evaluation
    return_hidden: bool = False  # model gives (hidden, kernel), not logits

    def apply(self, params, x, **kwargs):
        """The model's outputs: logits, or (hidden, kernel) for a fused-head loss."""
        if self.return_hidden:
            kwargs["return_hidden"] = True
        return self.model.apply({"params": params}, x, **kwargs)

    @property
    def is_sequence(self) -> bool:
        """Sequence transcription (CTC): per-frame outputs, no per-example class."""
        return self.loss_target == "ctc"


def make_optimizer(opt: dict[str, Any], num_train_steps: int):
    lr = opt["learning_rate"]
    if opt["schedule"] == "cosine" and num_train_steps > 1:
        # Linear warmup, then cosine decay to 0 at the last step.
        warmup = max(1, min(opt["warmup_steps"], num_train_steps - 1))
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, num_train_steps)
    if opt["name"] == "adam":
        tx = optax.adam(lr)
    elif opt["name"] == "adamw":
        tx = optax.adamw(lr, weight_decay=opt["weight_decay"])
    else:
        tx = optax.sgd(lr, momentum=opt["momentum"] or None)
    if opt["grad_clip"]:
        tx = optax.chain(optax.clip_by_global_norm(opt["grad_clip"]), tx)
    return tx


def targets(batch: dict):
    """What the loss compares the outputs with: `batch["y"]`, or for sequence data
    the tuple (input frame lengths, labels, label lengths)."""
    if "y_lengths" in batch:
        return batch["x_lengths"], batch["y"], batch["y_lengths"]
    return batch["y"]


def apply_loss(task: Task, outputs: jax.Array, y, **kwargs) -> jax.Array:
    """The configured loss of model `outputs` against the batch's `targets(batch)`.

    `loss.target` says how: "labels" (integer class ids), "one_hot" (float one-hot
    targets, e.g. squared error on classes), "value" (outputs[:, 0] against float
    targets), "mean_variance" (outputs[:, 0] is the mean, softplus(outputs[:, 1]) the
    variance, for a Gaussian negative log-likelihood), "ctc" (per-frame logits
    `[batch, frames', classes]` against padded label sequences; the model's
    `output_lengths` maps input frame lengths to logit lengths), "tokens" (labels
    `[batch, seq]`: logits `[batch, seq, vocab]`, or with `task.return_hidden` the
    pair (hidden `[batch, seq, d]`, kernel `[d, vocab]`) for `linear_cross_entropy`).
    """
    if task.loss_target == "tokens":
        if kwargs.get("where") is not None:
            # The per-example mask covers every token of its sequence.
            kwargs["where"] = kwargs["where"][:, None]
        if task.return_hidden:
            hidden, kernel = outputs
            return task.loss_fn(hidden, kernel, y, **kwargs)
        return task.loss_fn(outputs, y, **kwargs)
    if task.loss_target == "ctc":
        frame_lengths, labels, label_lengths = y
        return task.loss_fn(outputs, task.model.output_lengths(frame_lengths), labels,
                            label_lengths, **kwargs)
    if task.loss_target == "labels":
        return task.loss_fn(outputs, y, **kwargs)
    if task.loss_target == "one_hot":
        if kwargs.get("where") is not None:
            # An elementwise loss: its loss shape has the class axis too.
            kwargs["where"] = kwargs["where"][:, None]
        return task.loss_fn(outputs, jax.nn.one_hot(y, task.num_classes), **kwargs)
    if task.loss_target == "value":
        return task.loss_fn(outputs[:, 0], y, **kwargs)
    mean, raw = outputs[:, 0], outputs[:, 1].astype(jnp.float32)
    # softplus keeps the variance positive with a linear, not exponential, tail.
    return task.loss_fn(mean, y, jax.nn.softplus(raw), **kwargs)


def predictions(task: Task, outputs: jax.Array) -> jax.Array:
    """Class ids (classification, per token for "tokens") or the predicted value."""
    if task.return_hidden:
        return models.head_argmax(*outputs)  # no [..., vocab] logits
    if task.num_classes:
        return jnp.argmax(outputs, axis=-1)
    return outputs[:, 0].astype(jnp.float32)


def train_step(state: dict, batch: dict, *, task: Task) -> tuple[dict, dict]:
    """One optimizer step: a pure function of the state and the batch.

    Args:
      state: {"params", "opt_state", "step" (int32 scalar), "rng" (uint32 key data)}.
      batch: {"x": inputs [batch, ...], "y": labels or targets [batch]}.
      task: model, optimizer and loss (bound with functools.partial before jit).

    Returns:
      The new state and this step's metrics: loss and gradient norm (f32 scalars,
      taken before the update) and, for classification, the batch accuracy.
    """
    TRACE_COUNT["train_step"] += 1
    # A fresh key per step from (rng, step): reproducible after a resume.
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

    def loss_of(params):
        outputs = task.apply(params, batch["x"], rngs={"dropout": step_key})
        return apply_loss(task, outputs, targets(batch)), outputs

    (loss, outputs), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state["params"])
    if task.axis_name is not None:
        # pmap: each device differentiates the mean loss of its own equal-sized slice;
        # the global batch's mean loss and gradient are the means over devices.
        loss, grads = lax.pmean((loss, grads), task.axis_name)
    updates, opt_state = task.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss.astype(jnp.float32),
               "grad_norm": optax.global_norm(grads).astype(jnp.float32)}
    # No training accuracy for "tokens": it would build the [batch, seq, vocab]
    # logits that `linear_cross_entropy` avoids (the test accuracy is reported).
    if task.num_classes and not task.is_sequence and task.loss_target != "tokens":
        acc = jnp.mean(predictions(task, outputs) == batch["y"])
        if task.axis_name is not None:
            acc = lax.pmean(acc, task.axis_name)
        metrics["accuracy"] = acc
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    return new_state, metrics


def eval_step(params, batch: dict, *, task: Task, target_scale) -> dict:
    """Test metrics over a padded batch; `batch["mask"]` marks the real examples.

    Language models ("tokens") get `token_metrics`.

    For CTC also the greedy and beam-search decodings (`(labels, lengths)` pairs),
    scored on the host by `error_rates`.
    """
    outputs = task.apply(params, batch["x"])
    mask = batch["mask"]
    if task.loss_target == "tokens":
        return token_metrics(task, outputs, batch["y"], mask)
    n = jnp.sum(mask)
    metrics = {"loss": apply_loss(task, outputs, targets(batch), where=mask)}
    if task.is_sequence:
        lengths = task.model.output_lengths(batch["x_lengths"])
        metrics["greedy"] = lossjax.ctc_greedy_decode(outputs, lengths)
        metrics["beam"] = lossjax.ctc_beam_search(outputs, lengths,
                                                  beam_width=task.beam_width)
        return metrics
    pred = predictions(task, outputs)
    if task.num_classes:
        metrics["accuracy"] = jnp.sum(jnp.where(mask, pred == batch["y"], False)) / n
    else:
        # In the target's original units (the data were standardized for training).
        err = (pred - batch["y"]) * target_scale[1]
        metrics["mae"] = jnp.sum(jnp.where(mask, jnp.abs(err), 0)) / n
        metrics["rmse"] = jnp.sqrt(jnp.sum(jnp.where(mask, err**2, 0)) / n)
    return metrics


def token_metrics(task: Task, outputs, labels: jax.Array, mask: jax.Array) -> dict:
    """Language-model test metrics over the real sequences (`mask` [batch]).

    The loss is plain next-token cross-entropy whatever the training loss (z-loss and
    label smoothing change training, not what is measured), so every run of the task
    is compared in the same units; perplexity is its exp; accuracy counts arg-max
    hits over every position. With a fused head loss both come from (hidden, kernel)
    without building `[batch, seq, vocab]` logits: `linear_cross_entropy` for the
    loss, an arg-max over vocab blocks for the accuracy; with `cross_entropy` from
    the materialized logits. Both paths give the same numbers for the same params.
    """
    where = mask[:, None]  # every token of a real sequence
    if task.return_hidden:
        hidden, kernel = outputs
        loss = lossjax.linear_cross_entropy(hidden, kernel, labels, where=where)
    else:
        loss = lossjax.cross_entropy(outputs, labels, where=where)
    hits = jnp.where(where, predictions(task, outputs) == labels, False)
    return {"loss": loss, "perplexity": jnp.exp(loss),
            "accuracy": jnp.sum(hits) / (jnp.sum(mask) * labels.shape[1])}


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (one DP row, on the host)."""
    row = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (x != y))
    return int(row[-1])


def error_rates(decoded, labels, label_lengths, space_id: int = 1) -> dict:
    """Character and word error rates of CTC decodings (host NumPy).

    Total edits over total reference characters (or words, split at `space_id`),
    corpus-level as speech toolkits report them; can exceed 1 (insertions).
    """
    def words(ids):
        return [w for w in bytes(np.asarray(ids, np.uint8)).split(bytes([space_id]))
                if w]

    edits = {"cer": 0, "wer": 0}
    totals = {"cer": 0, "wer": 0}
    for h, hl, r, rl in zip(*decoded, labels, label_lengths):
        hyp, ref = h[:hl], r[:rl]
        edits["cer"] += edit_distance(hyp, ref)
        totals["cer"] += len(ref)
        edits["wer"] += edit_distance(words(hyp), words(ref))
        totals["wer"] += len(words(ref))
    return {k: edits[k] / max(totals[k], 1) for k in edits}


# --- state and sharding -------------------------------------------------------------


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """The 1-D "data" mesh over all devices, with Auto axes (see module docstring)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def init_state(task: Task, seed: int, sample_x: np.ndarray) -> dict:
    init_key, state_key = jax.random.split(jax.random.key(seed))  # seed: int or int32
    params = task.model.init(init_key, jnp.asarray(sample_x))["params"]
    return {"params": params, "opt_state": task.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            # Raw key data: checkpoints hold plain uint32 arrays.
            "rng": jax.random.key_data(state_key)}


def global_batch(arrays: dict, sharding: NamedSharding) -> dict:
    """Global arrays from the full batch, each process contributing the rows it owns.

    Every process computes the same global batch indices (they depend on (seed, step)
    only) and hands `jax.make_array_from_process_local_data` the rows that land on its
    own devices.
    """
    out = {}
    for key, value in arrays.items():
        n = value.shape[0]
        index_map = sharding.addressable_devices_indices_map((n,))
        spans = sorted({(s[0].start or 0, n if s[0].stop is None else s[0].stop)
                        for s in index_map.values()})
        local = np.concatenate([value[a:b] for a, b in spans])
        out[key] = jax.make_array_from_process_local_data(sharding, local, value.shape)
    return out


# --- checkpoints --------------------------------------------------------------------


def _abstract_like(tree, sharding_tree):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree, sharding_tree)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, quarantine=None):
    """The newest checkpoint that restores, or None.

    A checkpoint that fails to restore (corrupt or partial) is skipped with a warning
    and moved to `quarantine` (so a later save of the same step is not refused by
    orbax), and the previous one is tried.
    """
    skipped = False
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            if skipped:
                manager.reload()  # forget the quarantined steps
            return step, state
        except Exception as e:  # orbax raises many kinds for a damaged checkpoint
            warnings.warn(
                f"checkpoint at step {step} in {manager.directory} could not be "
                f"restored ({type(e).__name__}: {str(e)[:200]}); skipping it and "
                "trying the previous one.", RuntimeWarning, stacklevel=2)
            if quarantine is not None and jax.process_index() == 0:
                src = pathlib.Path(manager.directory) / str(step)
                if src.exists():
                    dst = pathlib.Path(quarantine) / f"{step}-{time.time_ns()}"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(src), str(dst))
            skipped = True
    manager.reload()
    return None


def _read_init_from(path: str, abstract_params, sharding):
    """Parameters of the newest checkpoint under `path` (a workdir or checkpoints dir).

    Only the parameters are read (the optimizer there may differ); their tree
    structure, shapes and dtypes must match this run's model.
    """
    root = pathlib.Path(path).absolute()
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    with ocp.CheckpointManager(root, item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True)) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"config.init_from={path!r}: no checkpoint there.")
        params = restore_placed(manager, step, sharding)["params"]
    want = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), abstract_params)
    got = jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), params)
    if want != got:
        raise ValueError(f"config.init_from={path!r}: its parameters (step {step}) do "
                         f"not fit this model: {got} vs {want}.")
    return params


def restore_placed(manager: ocp.CheckpointManager, step: int, sharding) -> dict:
    """The whole saved state of `step`, every array placed with `sharding`.

    Works whatever mesh or process count saved it (orbax refuses to restore onto
    other devices without a target). `manager` needs a StandardCheckpointHandler.
    """
    meta = manager.item_metadata(step)
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    return manager.restore(step, args=ocp.args.StandardRestore(target))


# --- host-side metrics ----------------------------------------------------------------


class _MetricWriter:
    """JSONL metrics in the workdir, written by process 0 only."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled and path.exists():
            # Drop what a killed run logged after its last checkpoint: those steps
            # run again now.
            lines = path.read_text().splitlines()
            kept = [ln for ln in lines if ln.strip()
                    and _json_step(ln) is not None and _json_step(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, step: int, values: dict):
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": int(step), **values}) + "\n")


def _json_step(line: str):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# --- the entry point ----------------------------------------------------------------


def build_task(config: mlc.ConfigDict | None, dataset: data_lib.Dataset,
               flat=None) -> Task:
    """Model, optimizer and loss of `config` (or of its validated fields `flat`)."""
    flat = validate_config(config) if flat is None else flat
    if flat["loss.target"] == "mean_variance":
        num_outputs = 2
    elif dataset.num_classes:
        num_outputs = dataset.num_classes
    else:
        num_outputs = 1
    model = models.create(flat["model.name"], num_outputs=num_outputs,
                          dtype=flat["dtype"], **dict(flat["model.kwargs"]))
    opt = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("optimizer.")}
    loss_fn = functools.partial(lossjax.get(flat["loss.name"]),
                                **dict(flat["loss.kwargs"]))
    return Task(model=model, tx=make_optimizer(opt, flat["num_train_steps"]),
                loss_fn=loss_fn, loss_target=flat["loss.target"],
                num_classes=dataset.num_classes, beam_width=flat["beam_width"],
                return_hidden=(flat["loss.target"] == "tokens"
                               and flat["loss.name"] in _FUSED_HEAD_LOSSES))


@dataclasses.dataclass(frozen=True)
class _Programs:
    """What a run compiles: shared by runs that differ only in seed and bookkeeping."""

    task: Task
    mesh: jax.sharding.Mesh
    abstract: Any
    state_sharding: Any
    init: Callable  # seed (int32) -> state, initialised already sharded
    step: CompiledStep
    eval: Callable  # (params, test batch) -> metrics


# Fields that do not change the compiled programs: runs differing only in these (the
# seeds of a study) reuse one compilation.
_RUN_ONLY = ("seed", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
             "keep_checkpoints", "init_from", "progress_bar")
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_PROGRAMS_KEEP = 4


def _programs(flat: dict, dataset: data_lib.Dataset) -> _Programs:
    key = json.dumps({k: v for k, v in flat.items() if k not in _RUN_ONLY},
                     sort_keys=True, default=str) + repr(jax.devices())
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    task = build_task(None, dataset, flat)
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    sample = dataset.x_train[:1]
    # The seed is an argument, not a constant, so all seeds share one compilation.
    init = lambda seed: init_state(task, seed, sample)
    abstract = jax.eval_shape(init, np.int32(0))
    state_sharding = jax.tree.map(lambda _: replicated, abstract)
    programs = _Programs(
        task=task, mesh=mesh, abstract=abstract, state_sharding=state_sharding,
        init=jax.jit(init, out_shardings=state_sharding),
        step=make_train_step(task, mesh, parallel=flat["parallel"],
                             checks=flat["checks"]),
        eval=jax.jit(functools.partial(eval_step, task=task,
                                       target_scale=dataset.target_scale),
                     in_shardings=(replicated, data_sharding),
                     out_shardings=replicated))
    _PROGRAMS[key] = programs
    while len(_PROGRAMS) > _PROGRAMS_KEEP:
        _PROGRAMS.popitem(last=False)
    return programs


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> dict:
    """Trains and evaluates `config`, checkpointing into `workdir`; resumes if possible.

    Returns a summary: final test metrics, the step reached, `first_step_seconds` (the
    compile), `wall_seconds` (the whole loop, with evaluations and saves),
    `steps_per_sec` (training steps only), `preempted` (True if SIGTERM stopped
    the run after saving), and memory in MiB (`experiments.memory`):
    `memory/xla_temp_mib`, `memory/xla_argument_mib`, `memory/xla_output_mib` (XLA's
    analysis of the compiled step, per device; absent where the backend or the
    checked mode gives none) and `memory/peak_rss_mib` (the process's peak so far).

    Raises:
      FloatingPointError: a non-finite training loss or gradient norm, naming the first
        bad step; nothing from that step on is saved or logged.
      ValueError / KeyError: a bad config (see `validate_config`).
    """
    flat = validate_config(config)
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")

    # Data sets generated on first use (speech) are cached in the workdir.
    dataset = data_lib.load(flat["data.name"], cache_dir=workdir / "data",
                            **dict(flat["data.kwargs"]))
    seed, num_steps = flat["seed"], flat["num_train_steps"]
    batch_size = flat["batch_size"]
    num_devices = jax.device_count()
    if batch_size % num_devices:
        raise ValueError(f"batch_size={batch_size} is not divisible by the "
                         f"{num_devices} devices.")
    programs = _programs(flat, dataset)
    task, mesh, compiled = programs.task, programs.mesh, programs.step
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    abstract, state_sharding = programs.abstract, programs.state_sharding
    abstract_target = _abstract_like(abstract, state_sharding)

    # Restore: this workdir first, then config.init_from, else from scratch.
    manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=flat["keep_checkpoints"], create=True,
            # Synchronous saves: the state is donated to the next step right after.
            enable_async_checkpointing=False))
    found = restore_latest(manager, abstract_target,
                           quarantine=workdir / "checkpoints_corrupt")
    if found is not None:
        start_step, state = found
        log.info("resuming from %s at step %d", workdir / "checkpoints", start_step)
    else:
        start_step = 0
        state = programs.init(np.int32(seed))
        if flat["init_from"]:
            params = _read_init_from(flat["init_from"], abstract["params"],
                                     replicated)
            state = {**state, "params": params,
                     "opt_state": jax.jit(task.tx.init,
                                          out_shardings=state_sharding["opt_state"])(
                                              params)}
            log.info("initialised parameters from %s", flat["init_from"])
    state = compiled.from_saved(state)
    eval_fn = programs.eval
    pad = -dataset.num_test % num_devices
    test = global_batch({
        **{k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
           for k, v in dataset.arrays("test").items()},
        "mask": np.arange(dataset.num_test + pad) < dataset.num_test,
    }, data_sharding)

    def evaluate(state):
        params = compiled.to_saved(state)["params"]
        metrics = _to_host(eval_fn(params, test))
        for name in ("greedy", "beam"):  # CTC decodings: error rates on the host
            if name in metrics:
                decoded = [x[:dataset.num_test] for x in metrics.pop(name)]
                rates = error_rates(decoded, dataset.y_test, dataset.y_test_lengths)
                metrics |= {f"{k}_{name}": v for k, v in rates.items()}
        return {f"test/{k}": float(v) for k, v in metrics.items()}

    def batch_of(step):
        idx = data_lib.batch_indices(seed, step, dataset.num_train, batch_size)
        return compiled.put_batch({k: v[idx]
                                   for k, v in dataset.arrays("train").items()})

    writer = _MetricWriter(workdir / "metrics.jsonl", start_step)
    log_every, eval_every = flat["log_every_steps"], flat["eval_every_steps"]
    ckpt_every = flat["checkpoint_every_steps"]
    pending: list[tuple[int, dict]] = []
    window_start, window_steps = time.perf_counter(), 0
    # Throughput counts the steps between host fetches, not the first (compiling)
    # step, evaluations or checkpoint saves.
    first_step_seconds, train_seconds, timed_steps = 0.0, 0.0, 0
    step_memory = None  # XLA's memory analysis of the compiled step (MiB per device)
    last_eval: dict[str, float] = {}
    preempted = False

    def flush(step):
        """One host fetch of the pending metrics; raises on the first non-finite one."""
        nonlocal pending, window_start, window_steps, train_seconds, timed_steps
        if not pending:
            return
        host = _to_host([(s, compiled.first(m)) for s, m in pending])
        for s, m in host:
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                raise FloatingPointError(
                    f"non-finite training loss ({m['loss']}) or gradient norm "
                    f"({m['grad_norm']}) at step {s} of {workdir}; nothing from this "
                    f"step on was saved (last checkpoint: "
                    f"{manager.latest_step()}).")
        elapsed = time.perf_counter() - window_start
        train_seconds += elapsed
        timed_steps += window_steps
        mean = {f"train/{k}": float(np.mean([m[k] for _, m in host]))
                for k in host[0][1]}
        sps = window_steps / elapsed if elapsed > 0 else float("nan")
        writer.write(step, {**mean, "steps_per_sec": sps})
        if bar is not None:
            bar.set_postfix(loss=f"{mean['train/loss']:.4f}", steps_s=f"{sps:.0f}")
        pending = []
        window_start, window_steps = time.perf_counter(), 0

    def save(done):
        if manager.latest_step() != done:
            manager.save(done, args=ocp.args.StandardSave(compiled.to_saved(state)))

    bar = None
    if is_main and flat["progress_bar"]:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_steps, initial=start_step, desc=str(workdir.name),
                   unit="step", dynamic_ncols=True, leave=False)
    done, train_start, wall_seconds = start_step, time.perf_counter(), 0.0
    try:
        with _Preemption() as preemption:
            for i in range(start_step, num_steps):
                t0 = time.perf_counter()
                batch = batch_of(i)
                if i == start_step:  # the step's input types, before donation
                    step_inputs = memory.abstract((state, batch))
                state, metrics = compiled.fn(state, batch)
                done = i + 1
                pending.append((done, metrics))
                window_steps += 1
                if i == start_step:
                    jax.block_until_ready(metrics)  # the compile, timed apart
                    first_step_seconds = time.perf_counter() - t0
                    # The step just compiled: this reuses it (no trace, no compile).
                    step_memory = memory.step_memory(compiled.fn, *step_inputs)
                    window_start, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                stop = preemption.requested
                if jax.process_count() > 1:
                    # All processes must stop at the same step (saving is collective):
                    # agree on the flag at log steps only, where a host sync happens
                    # anyway.
                    stop = done % log_every == 0 and bool(np.any(
                        multihost_utils.process_allgather(np.array(stop))))
                if done % log_every == 0 or done % ckpt_every == 0 or stop \
                        or done == num_steps:
                    flush(done)
                if done % eval_every == 0 or done == num_steps:
                    last_eval = evaluate(state)
                    writer.write(done, last_eval)
                if done % ckpt_every == 0 or done == num_steps or stop:
                    save(done)
                if not pending:  # throughput windows exclude evals and saves
                    window_start, window_steps = time.perf_counter(), 0
                if stop:
                    preempted = True
                    log.warning("SIGTERM: saved step %d in %s; stopping.", done,
                                workdir)
                    break
            wall_seconds = time.perf_counter() - train_start
    finally:
        if flat["checks"]:
            chex.block_until_chexify_assertions_complete()
        if bar is not None:
            bar.close()
        manager.wait_until_finished()
        manager.close()
    summary_path = workdir / "summary.json"
    if not last_eval:  # resumed at the end: evaluate the restored state
        last_eval = evaluate(state)
    summary = {
        "step": int(num_steps if not preempted else done), "preempted": preempted,
        "first_step_seconds": first_step_seconds,
        "wall_seconds": wall_seconds,
        "steps_per_sec": timed_steps / train_seconds if train_seconds > 0 else
        float("nan"),
        "num_params": models.param_count(abstract["params"]),
        **{f"memory/{k}": v for k, v in (step_memory or {}).items()},
        "memory/peak_rss_mib": memory.peak_rss_mib(),
        **last_eval,
    }
    if start_step == num_steps and summary_path.exists():
        # Nothing ran now: keep the timings and memory of the run that did the
        # training.
        previous = json.loads(summary_path.read_text())
        for key in ("first_step_seconds", "wall_seconds", "steps_per_sec",
                    *(k for k in previous if k.startswith("memory/"))):
            if key in previous:
                summary[key] = previous[key]
    if is_main and not preempted:
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The compiled step and how host data and checkpoints meet its layout.

    fn(state, batch) -> (state, metrics); put_batch(numpy dict) -> its device batch;
    to_saved / from_saved convert between the step's state layout and the checkpoint
    layout (replicated over the mesh); first(metrics) picks one replica's metrics.
    """

    fn: Callable
    put_batch: Callable
    to_saved: Callable
    from_saved: Callable
    first: Callable


def make_train_step(task: Task, mesh, *, parallel: str = "jit",
                    checks: bool = False) -> CompiledStep:
    """`train_step` compiled for `mesh`: jit over the mesh, or pmap over its devices.

    With `checks=True` the step is traced with lossjax's value assertions on and
    wrapped in `chex.chexify` (synchronous), so a bad value (a label out of range, a
    non-finite input) raises an error naming the loss and the rule.
    """
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    num_devices = mesh.devices.size
    if parallel == "jit":
        step_impl = functools.partial(train_step, task=task)
        if checks:
            step_impl = _with_value_checks(step_impl)
        fn = jax.jit(step_impl, in_shardings=(replicated, data_sharding),
                     out_shardings=(replicated, replicated), donate_argnums=0)
        if checks:
            fn = chex.chexify(fn, async_check=False)
        identity = lambda s: s
        return CompiledStep(fn, functools.partial(global_batch, sharding=data_sharding),
                            identity, identity, identity)
    if checks:
        raise ValueError("config.checks=True needs config.parallel='jit' "
                         "(chex.chexify wraps jit-compiled functions).")
    if jax.process_count() > 1:
        raise ValueError("config.parallel='pmap' runs on one host; use 'jit'.")
    pmap_task = dataclasses.replace(task, axis_name="batch")
    fn = jax.pmap(functools.partial(train_step, task=pmap_task), axis_name="batch",
                  devices=list(mesh.devices.flat), donate_argnums=0)
    # Inputs laid out as pmap lays out its outputs (a leading axis split over the
    # devices), so the second call does not compile again for a new input layout.
    stacked = NamedSharding(
        jax.sharding.Mesh(mesh.devices, ("batch",),
                          axis_types=(jax.sharding.AxisType.Auto,)), P("batch"))
    return CompiledStep(
        fn,
        put_batch=lambda b: jax.device_put(
            {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in b.items()},
            stacked),
        to_saved=lambda s: jax.device_put(jax.tree.map(lambda x: x[0], s), replicated),
        from_saved=lambda s: jax.device_put(jax.tree.map(
            lambda x: np.broadcast_to(np.asarray(x), (num_devices,) + x.shape), s),
            stacked),
        first=lambda m: jax.tree.map(lambda x: x[0], m),
    )


def _with_value_checks(step_impl):
    """Traces `step_impl` with lossjax's chex value assertions switched on."""

    @functools.wraps(step_impl)
    def checked_step(state, batch):
        with _checks.value_checks():
            return step_impl(state, batch)

    return checked_step
