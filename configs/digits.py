"""Image classification: scikit-learn's 8x8 handwritten digits, a small CNN.

Run (any loss from LOSSES below, or any registry name):

    ./launch.sh cpu experiments.main --config=configs/digits.py:loss=focal_loss \
        --workdir=runs/digits_focal
    python -m experiments.main --config=configs/digits.py:smoke \
        --workdir=runs/digits_smoke

Arguments (comma string after `:`): `loss=<label>`, `smoke` (a few steps, seconds).
Override any field with `--config.optimizer.learning_rate=3e-3`.
"""

from configs import common

# The losses the study compares on this task: label -> lossjax name, kwargs, and how
# the model's outputs meet the labels ("labels": integer ids, "one_hot": float targets).
LOSSES = {
    "cross_entropy": {"name": "cross_entropy", "kwargs": {}, "target": "labels"},
    "label_smoothing": {"name": "cross_entropy", "kwargs": {"label_smoothing": 0.1},
                        "target": "labels"},
    "focal_loss": {"name": "focal_loss", "kwargs": {"gamma": 2.0}, "target": "labels"},
    "multiclass_hinge_loss": {"name": "multiclass_hinge_loss", "kwargs": {},
                              "target": "labels"},
    "squared_error": {"name": "squared_error", "kwargs": {}, "target": "one_hot"},
}
METRIC, MODE = "test/accuracy", "max"  # what the study ranks by


def get_config(arg=None):
    args = common.parse_arg(arg, ("loss", "smoke"))
    c = common.base_config()
    c.data.name = "digits"
    c.model.name = "cnn"
    c.model.kwargs = {"features": (16, 32), "hidden": 64}
    c.num_train_steps = 600
    c.batch_size = 64
    c.log_every_steps = 20
    c.eval_every_steps = 60
    c.checkpoint_every_steps = 300
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 30
    common.set_loss(c, LOSSES, args.get("loss", "cross_entropy"))
    return common.finish(c, bool(args.get("smoke")), smoke_steps=40)
