"""The pure steps: `train_step(state, batch, *, task)` and `eval_step(params, batch,
*, task)`. Neither knows how its task meets its loss (`task.adapter` does) nor how it
is compiled (`experiments.parallel` does).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import optax
from jax import lax

from experiments import tasks
from experiments.tasks import Task

# How many times `train_step` has been traced in this process (tests assert that a run
# compiles its step once).
TRACE_COUNT: collections.Counter = collections.Counter()


def train_step(state: dict, batch: dict, *, task: Task) -> tuple[dict, dict]:
    """One optimizer step: a pure function of the state and the batch.

    Args:
      state: {"params", "opt_state", "step" (int32 scalar), "rng" (uint32 key data)}.
      batch: {"x": inputs [batch, ...], "y": labels or targets [batch], ...}.
      task: model, optimizer and loss (bound with functools.partial before jit).

    Returns:
      The new state and this step's metrics: loss and gradient norm (f32 scalars,
      taken before the update) and the adapter's training metrics (the batch
      accuracy for classification).
    """
    TRACE_COUNT["train_step"] += 1
    # A fresh key per step from (rng, step): reproducible after a resume.
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

    def loss_of(params):
        outputs = task.apply(params, batch["x"], rngs={"dropout": step_key})
        return tasks.loss(task, outputs, batch), outputs

    (loss, outputs), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state["params"])
    extra = ({} if task.adapter.train_metrics is None
             else task.adapter.train_metrics(task, outputs, batch))
    if task.axis_name is not None:
        # pmap: each device differentiates the mean loss of its own equal-sized slice;
        # the global batch's mean loss and gradient are the means over devices.
        loss, grads, extra = lax.pmean((loss, grads, extra), task.axis_name)
    updates, opt_state = task.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss.astype(jnp.float32),
               "grad_norm": optax.global_norm(grads).astype(jnp.float32), **extra}
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    return new_state, metrics


def eval_step(params, batch: dict, *, task: Task) -> dict:
    """Test metrics over a padded batch; `batch["mask"]` marks the real examples.

    What they are is the adapter's choice: loss and accuracy (classification), loss,
    MAE and RMSE in the target's units (regression), next-token loss, perplexity and
    accuracy (language models), loss and decodings (CTC; scored on the host by the
    adapter's `host_metrics`).
    """
    return task.adapter.metrics(task, task.apply(params, batch["x"]), batch)
