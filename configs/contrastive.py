"""Self-supervised image representations: contrastive learning on the digits.

Two augmented views of each 8x8 digit (random shifts of up to a pixel, Gaussian noise;
`experiments.models.augment`, a pure function of (seed, step)) go through one small
CNN encoder (`experiments.models.ViewEncoder`, L2-normalized 32-dim embeddings),
trained with a contrastive loss whose negatives are the whole global batch: on
several devices each device's anchors meet candidates gathered from every device
(`experiments.sharding.batch_parallel`, the losses' `axis_name`). The held-out digits
score the frozen embeddings: `test/probe_accuracy` (a logistic regression fitted with
optax on half of them, scored on the other half, both ways round) and
`test/knn_accuracy` (leave-one-out nearest neighbour).

    ./launch.sh cpu experiments.main --config=configs/contrastive.py:loss=clip_loss \
        --workdir=runs/contrastive_clip
    python -m experiments.main --config=configs/contrastive.py:smoke \
        --workdir=runs/contrastive_smoke

Arguments (comma string after `:`): `loss=<label>` (a label of LOSSES below),
`smoke` (a few steps, seconds). `supervised_contrastive_loss` uses the digit labels
(positives: every image of the same class), so it is not self-supervised: it is the
supervised reference the others are measured against.
"""

from configs import common

LOSSES = {
    "clip_loss": {"name": "clip_loss", "kwargs": {"temperature": 0.1},
                  "target": "views"},
    "sigmoid_contrastive_loss": {"name": "sigmoid_contrastive_loss",
                                 "kwargs": {"temperature": 0.1, "bias": -10.0},
                                 "target": "views"},
    "ntxent": {"name": "ntxent", "kwargs": {"temperature": 0.1},
               "target": "view_pairs"},
    "supervised_contrastive_loss": {"name": "supervised_contrastive_loss",
                                    "kwargs": {"temperature": 0.1},
                                    "target": "view_classes"},
}
METRIC, MODE = "test/probe_accuracy", "max"


def get_config(arg=None):
    args = common.parse_arg(arg, ("loss", "smoke"))
    c = common.base_config()
    c.data.name = "digits"
    c.model.name = "view_encoder"
    c.model.kwargs = {"features": (16, 32), "hidden": 64, "shift": 1, "noise": 0.1}
    c.num_train_steps = 400
    c.batch_size = 128
    c.log_every_steps = 20
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 400
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 20
    common.set_loss(c, LOSSES, args.get("loss", "clip_loss"))
    return common.finish(c, bool(args.get("smoke")), smoke_steps=20)
