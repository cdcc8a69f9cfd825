"""What a run trains: the model, the optimizer, the loss and its adapter.

Each scenario meets its loss in its own way (integer labels, one-hot targets, a value,
a mean and a variance, CTC label sequences, next tokens). That way is one small
`Adapter` in the `ADAPTERS` table, keyed by `config.loss.target`: how the model's
outputs and the batch become the loss's arguments, the model's number of outputs, the
extra training metrics and the test metrics. A new scenario adds one adapter and a
config; `experiments.steps` and the loop in `experiments.train` stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

import lossjax
from experiments import models, schema, scoring, sharding
from experiments.dataset import Dataset

# Losses that take the model's final hidden states and head kernel instead of logits
# (with target "tokens": the model is called with `return_hidden=True`).
FUSED_HEAD_LOSSES = ("linear_cross_entropy",)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """Everything `train_step` needs besides its state and batch; static."""

    model: nn.Module
    tx: optax.GradientTransformation
    loss_fn: Callable[..., jax.Array]  # the configured loss, its kwargs bound
    loss_target: str  # a key of ADAPTERS
    num_classes: int  # 0 for regression
    axis_name: str | None = None  # set on the pmap path
    beam_width: int = 8  # CTC beam search at evaluation
    return_hidden: bool = False  # model gives (hidden, kernel), not logits
    target_scale: tuple[float, float] = (0.0, 1.0)  # regression metrics' units

    def apply(self, params, x, **kwargs):
        """The model's outputs: logits, or (hidden, kernel) for a fused-head loss."""
        if self.return_hidden:
            kwargs["return_hidden"] = True
        return self.model.apply({"params": params}, x, **kwargs)

    @property
    def adapter(self) -> Adapter:
        return ADAPTERS[self.loss_target]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How one kind of target meets its loss.

    loss(task, outputs, batch, where): the configured loss of the model's outputs
      against the batch; `where` (bool `[batch]` or None) keeps examples.
    metrics(task, outputs, batch): test metrics over a padded batch whose
      `batch["mask"]` marks the real examples (on device).
    num_outputs(num_classes): the model's output width.
    train_metrics(task, outputs, batch): extra training metrics (None: loss and
      gradient norm only).
    host_metrics(metrics, arrays): the test metrics finished on the host from the
      device metrics and the unpadded test arrays (None: as they are).
    """

    loss: Callable[..., jax.Array]
    metrics: Callable[..., dict]
    num_outputs: Callable[[int], int]
    train_metrics: Callable[..., dict] | None = None
    host_metrics: Callable[[dict, dict], dict] | None = None


def loss(task: Task, outputs, batch: dict, where=None) -> jax.Array:
    """The configured loss of `outputs` against `batch`, as its adapter feeds it."""
    return task.adapter.loss(task, outputs, batch, where)


def _per_example(where):
    """An example mask broadcast over a loss shape with one more axis (classes of an
    elementwise loss, tokens of a sequence)."""
    return None if where is None else where[:, None]


def _masked_mean(values, mask):
    return jnp.sum(jnp.where(mask, values, 0)) / jnp.sum(mask)


# --- classification: integer labels, or float one-hot targets ------------------------


def _labels_loss(task, outputs, batch, where):
    return task.loss_fn(outputs, batch["y"], where=where)


def _one_hot_loss(task, outputs, batch, where):
    # An elementwise loss (e.g. squared error on classes): its loss shape has the
    # class axis too.
    targets = jax.nn.one_hot(batch["y"], task.num_classes)
    return task.loss_fn(outputs, targets, where=_per_example(where))


def _train_accuracy(task, outputs, batch):
    return {"accuracy": jnp.mean(jnp.argmax(outputs, axis=-1) == batch["y"])}


def _class_metrics(task, outputs, batch):
    mask = batch["mask"]
    hits = jnp.where(mask, jnp.argmax(outputs, axis=-1) == batch["y"], False)
    return {"loss": loss(task, outputs, batch, mask),
            "accuracy": jnp.sum(hits) / jnp.sum(mask)}


# --- regression: a value, or a mean and a variance -----------------------------------


def _value_loss(task, outputs, batch, where):
    return task.loss_fn(outputs[:, 0], batch["y"], where=where)


def _mean_variance_loss(task, outputs, batch, where):
    mean, raw = outputs[:, 0], outputs[:, 1].astype(jnp.float32)
    # softplus keeps the variance positive with a linear, not exponential, tail.
    return task.loss_fn(mean, batch["y"], jax.nn.softplus(raw), where=where)


def _regression_metrics(task, outputs, batch):
    mask = batch["mask"]
    # In the target's original units (the data were standardized for training).
    err = (outputs[:, 0].astype(jnp.float32) - batch["y"]) * task.target_scale[1]
    return {"loss": loss(task, outputs, batch, mask),
            "mae": _masked_mean(jnp.abs(err), mask),
            "rmse": jnp.sqrt(_masked_mean(err**2, mask))}


# --- speech: CTC over per-frame logits ------------------------------------------------


def _ctc_loss(task, outputs, batch, where):
    # Per-frame logits [batch, frames', classes]; the model maps input frame lengths
    # to logit lengths.
    return task.loss_fn(outputs, task.model.output_lengths(batch["x_lengths"]),
                        batch["y"], batch["y_lengths"], where=where)


def _ctc_metrics(task, outputs, batch):
    """The test loss and the greedy and beam-search decodings ((labels, lengths)
    pairs), scored on the host by `_ctc_error_rates`."""
    lengths = task.model.output_lengths(batch["x_lengths"])
    return {"loss": loss(task, outputs, batch, batch["mask"]),
            "greedy": lossjax.ctc_greedy_decode(outputs, lengths),
            "beam": lossjax.ctc_beam_search(outputs, lengths,
                                            beam_width=task.beam_width)}


def _ctc_error_rates(metrics: dict, arrays: dict) -> dict:
    n = len(arrays["y"])
    for name in ("greedy", "beam"):
        decoded = [x[:n] for x in metrics.pop(name)]
        rates = scoring.error_rates(decoded, arrays["y"], arrays["y_lengths"])
        metrics |= {f"{k}_{name}": v for k, v in rates.items()}
    return metrics


# --- language modelling: next tokens ------------------------------------------------


def _tokens_loss(task, outputs, batch, where):
    # Labels [batch, seq]; the per-example mask covers every token of its sequence.
    if task.return_hidden:  # (hidden [batch, seq, d], kernel [d, vocab])
        return task.loss_fn(*outputs, batch["y"], where=_per_example(where))
    return task.loss_fn(outputs, batch["y"], where=_per_example(where))


def _token_metrics(task, outputs, batch):
    """Language-model test metrics over the real sequences.

    The loss is plain next-token cross-entropy whatever the training loss (z-loss and
    label smoothing change training, not what is measured), so every run of the task
    is compared in the same units; perplexity is its exp; accuracy counts arg-max
    hits over every position. With a fused head loss both come from (hidden, kernel)
    without building `[batch, seq, vocab]` logits: `linear_cross_entropy` for the
    loss, an arg-max over vocab blocks for the accuracy; with `cross_entropy` from
    the materialized logits. Both paths give the same numbers for the same params.
    """
    labels, mask = batch["y"], batch["mask"]
    where = mask[:, None]  # every token of a real sequence
    if task.return_hidden:
        value = lossjax.linear_cross_entropy(*outputs, labels, where=where)
        predicted = models.head_argmax(*outputs)  # no [..., vocab] logits
    else:
        value = lossjax.cross_entropy(outputs, labels, where=where)
        predicted = jnp.argmax(outputs, axis=-1)
    hits = jnp.where(where, predicted == labels, False)
    return {"loss": value, "perplexity": jnp.exp(value),
            "accuracy": jnp.sum(hits) / (jnp.sum(mask) * labels.shape[1])}


# --- contrastive learning: embeddings of two views of each image ---------------------

# The width of the contrastive embeddings (the encoder's output).
EMBEDDING_DIM = 32
# Targets whose loss takes view embeddings (the two towers, or the views stacked with
# labels that pair them); with several batch shards their negatives are gathered from
# every device (`sharding.batch_parallel`).
CONTRASTIVE_TARGETS = ("views", "view_pairs", "view_classes")


def _views_loss(task, outputs, batch, where):
    # outputs [2, batch, dim]: view 1 is row i's "image", view 2 its "text".
    return task.loss_fn(outputs[0], outputs[1], where=where)


def _stacked_views_loss(labels_of):
    """A labelled contrastive loss on both views stacked `[2 * batch, dim]`: the
    labels of one view repeated for the other, `labels_of(batch, n)`."""

    def loss(task, outputs, batch, where):
        n = outputs.shape[1]
        labels = labels_of(batch, n)
        return task.loss_fn(outputs.reshape(2 * n, -1),
                            jnp.concatenate([labels, labels]),
                            where=None if where is None
                            else jnp.concatenate([where, where]))

    return loss


def _probe_metrics(task, outputs, batch, *, probe_steps: int = 200):
    """Frozen embeddings `[n, dim]` of the held-out images, scored two ways:
    `knn_accuracy` (leave-one-out nearest neighbour by cosine similarity) and
    `probe_accuracy` (a logistic regression fitted with optax on one half of the
    held-out images, by example parity, and scored on the other, both ways round)."""
    mask, labels = batch["mask"], batch["y"]
    e = jax.lax.stop_gradient(outputs.astype(jnp.float32))
    n = e.shape[0]
    others = mask[None, :] & ~jnp.eye(n, dtype=bool)
    nearest = jnp.argmax(jnp.where(others, e @ e.T, -jnp.inf), axis=1)
    knn = jnp.sum(mask & (labels[nearest] == labels)) / jnp.sum(mask)

    def probe(fit, score):
        tx = optax.adam(0.05)
        w = {"w": jnp.zeros((e.shape[1], task.num_classes)),
             "b": jnp.zeros(task.num_classes)}

        def fit_loss(w):
            return lossjax.cross_entropy(e @ w["w"] + w["b"], labels, where=fit)

        def step(_, carry):
            w, opt = carry
            updates, opt = tx.update(jax.grad(fit_loss)(w), opt)
            return optax.apply_updates(w, updates), opt

        w, _ = jax.lax.fori_loop(0, probe_steps, step, (w, tx.init(w)))
        hits = jnp.argmax(e @ w["w"] + w["b"], axis=-1) == labels
        return jnp.sum(score & hits), jnp.sum(score)

    even = jnp.arange(n) % 2 == 0
    (h1, c1), (h2, c2) = probe(mask & even, mask & ~even), probe(mask & ~even,
                                                                  mask & even)
    return {"knn_accuracy": knn, "probe_accuracy": (h1 + h2) / (c1 + c2)}


_classes = lambda num_classes: num_classes
_embedding = lambda _: EMBEDDING_DIM
ADAPTERS: dict[str, Adapter] = {
    "labels": Adapter(_labels_loss, _class_metrics, _classes, _train_accuracy),
    "one_hot": Adapter(_one_hot_loss, _class_metrics, _classes, _train_accuracy),
    "value": Adapter(_value_loss, _regression_metrics, lambda _: 1),
    "mean_variance": Adapter(_mean_variance_loss, _regression_metrics, lambda _: 2),
    "ctc": Adapter(_ctc_loss, _ctc_metrics, _classes,
                   host_metrics=_ctc_error_rates),
    # No training accuracy: it would build the [batch, seq, vocab] logits that
    # `linear_cross_entropy` avoids (the test accuracy is reported).
    "tokens": Adapter(_tokens_loss, _token_metrics, _classes),
    # Two-tower losses (clip_loss, sigmoid_contrastive_loss, info_nce) on the views.
    "views": Adapter(_views_loss, _probe_metrics, _embedding),
    # Labelled losses on the stacked views: each example its own label (ntxent), or
    # its class (supervised_contrastive_loss).
    "view_pairs": Adapter(_stacked_views_loss(lambda b, n: jnp.arange(n)),
                          _probe_metrics, _embedding),
    "view_classes": Adapter(_stacked_views_loss(lambda b, n: b["y"]),
                            _probe_metrics, _embedding),
}


# --- building a task ------------------------------------------------------------------


def make_optimizer(opt: dict[str, Any], num_train_steps: int, learning_rate=None):
    """The optax optimizer of the `optimizer.*` fields (`schema.optimizer_fields`).

    `learning_rate` (default: `opt["learning_rate"]`) is the peak rate; it may be a
    traced scalar, as `optax.inject_hyperparams` passes it in a sweep.
    """
    lr = opt["learning_rate"] if learning_rate is None else learning_rate
    if opt["schedule"] == "cosine" and num_train_steps > 1:
        # Linear warmup, then cosine decay to 0 at the last step.
        warmup = max(1, min(opt["warmup_steps"], num_train_steps - 1))
        if learning_rate is None:
            lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, num_train_steps)
        else:  # optax branches on a Python peak value: scale a unit schedule
            unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup,
                                                      num_train_steps)
            lr = lambda count, unit=unit, peak=lr: peak * unit(count)
    if opt["name"] == "adam":
        tx = optax.adam(lr)
    elif opt["name"] == "adamw":
        tx = optax.adamw(lr, weight_decay=opt["weight_decay"])
    else:
        tx = optax.sgd(lr, momentum=opt["momentum"] or None)
    if opt["grad_clip"]:
        tx = optax.chain(optax.clip_by_global_norm(opt["grad_clip"]), tx)
    return tx


def build_task(config: mlc.ConfigDict | None, dataset: Dataset, flat=None,
               mesh=None) -> Task:
    """Model, optimizer and loss of `config` (or of its validated fields `flat`).

    On a `mesh` with a "model" axis of size > 1, a fused-head loss is computed
    vocabulary-parallel (`sharding.vocab_parallel`); with several batch shards a
    contrastive loss gathers its negatives over them (`sharding.batch_parallel`).
    """
    flat = schema.validate_config(config) if flat is None else flat
    target = flat["loss.target"]
    model = models.create(flat["model.name"],
                          num_outputs=ADAPTERS[target].num_outputs(dataset.num_classes),
                          dtype=flat["dtype"], **dict(flat["model.kwargs"]))
    return_hidden = target == "tokens" and flat["loss.name"] in FUSED_HEAD_LOSSES
    loss_fn = functools.partial(lossjax.get(flat["loss.name"]),
                                **dict(flat["loss.kwargs"]))
    if return_hidden and mesh is not None and mesh.shape.get("model", 1) > 1:
        loss_fn = sharding.vocab_parallel(loss_fn, mesh)
    if (target in CONTRASTIVE_TARGETS and mesh is not None
            and sharding.batch_shards(mesh) > 1):
        loss_fn = sharding.batch_parallel(loss_fn, mesh)
    return Task(model=model,
                tx=make_optimizer(schema.optimizer_fields(flat),
                                  flat["num_train_steps"]),
                loss_fn=loss_fn, loss_target=target, num_classes=dataset.num_classes,
                beam_width=flat["beam_width"],
                return_hidden=return_hidden,
                target_scale=tuple(dataset.target_scale))


def init_state(task: Task, seed: int, sample_x: np.ndarray) -> dict:
    """A fresh state: {"params", "opt_state", "step", "rng"}; `seed` int or int32."""
    init_key, state_key = jax.random.split(jax.random.key(seed))
    # Plain arrays: the logical axis names are read apart (`logical_axes`).
    params = nn.unbox(task.model.init(init_key, jnp.asarray(sample_x))["params"])
    return {"params": params, "opt_state": task.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            # Raw key data: checkpoints hold plain uint32 arrays.
            "rng": jax.random.key_data(state_key)}


def logical_axes(task: Task, sample_x: np.ndarray):
    """The params tree of the model's logical axis names (`PartitionSpec`s of names;
    empty where a parameter has none), for `experiments.sharding`."""
    boxed = jax.eval_shape(task.model.init, jax.random.key(0), jnp.asarray(sample_x))
    return nn.get_partition_spec(boxed)["params"]
