"""The contrastive experiment on the harness (`configs/contrastive.py`): view
augmentation, the frozen-embedding probes, and training with negatives gathered
over the batch shards equal to the single-program loss on the global batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_experiments import read_metrics, smoke_config

from configs import contrastive
from experiments import data as data_lib
from experiments import models, tasks, train


def test_views_are_a_pure_function_of_the_key():
    x = jnp.asarray(data_lib.digits().x_train[:16])
    key = jax.random.key(3)
    a = models.augment(key, x)
    np.testing.assert_array_equal(a, models.augment(key, x))
    assert not np.array_equal(a, models.augment(jax.random.key(4), x))
    # Without noise a view is the image shifted: the same pixels, wrapped around.
    shifted = models.augment(key, x, noise=0.0)
    np.testing.assert_allclose(np.sort(shifted.reshape(16, -1), axis=1),
                               np.sort(np.asarray(x).reshape(16, -1), axis=1))
    assert not np.array_equal(shifted, x)


def _probe(embeddings, labels, mask):
    task = tasks.Task(model=None, tx=None, loss_fn=None, loss_target="views",
                      num_classes=10)
    out = jax.jit(lambda e, y, m: tasks._probe_metrics(
        task, e, {"y": y, "mask": m}))(embeddings, labels, mask)
    return {k: float(v) for k, v in out.items()}


def test_probe_scores_separable_embeddings_perfectly_and_noise_near_chance():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400).astype(np.int32)
    mask = np.arange(400) < 380  # the padding rows are never scored
    labels_padded = np.where(mask, labels, 0)
    separable = np.eye(10, 32, dtype=np.float32)[labels] + 0.01 * rng.normal(
        size=(400, 32)).astype(np.float32)
    good = _probe(separable, labels_padded, mask)
    assert good["probe_accuracy"] == 1.0 and good["knn_accuracy"] == 1.0
    noise = _probe(rng.normal(size=(400, 32)).astype(np.float32), labels_padded, mask)
    assert noise["probe_accuracy"] < 0.3 and noise["knn_accuracy"] < 0.3


@pytest.mark.parametrize("loss", list(contrastive.LOSSES))
def test_negatives_gathered_over_devices_train_as_one_program(tmp_path, loss):
    """data=8: the loss in shard_map with axis_name (the ring for SigLIP); model=8:
    one batch shard, the plain loss on the global batch (the CNN has no logical axes,
    so everything is replicated). Same training losses step by step."""
    def losses(mesh, name):
        config = smoke_config("contrastive", f"loss={loss},smoke", num_train_steps=8,
                              log_every_steps=1,
                              **{f"mesh.{k}": v for k, v in mesh.items()})
        train.train_and_evaluate(config, str(tmp_path / name))
        return [v for _, v in read_metrics(tmp_path / name)]

    sharded = losses({"data": 8, "fsdp": 1, "model": 1}, "sharded")
    single = losses({"data": 1, "fsdp": 1, "model": 8}, "single")
    assert len(sharded) == 8 and sharded[-1] < sharded[0]
    np.testing.assert_allclose(sharded, single, rtol=2e-4)
