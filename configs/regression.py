"""Regression: scikit-learn's diabetes data (disease progression after one year), MLP.

Targets are standardized with training statistics; test MAE and RMSE are reported in
the original units. `gaussian_nll` uses a two-output head (mean, softplus variance).

    ./launch.sh cpu experiments.main --config=configs/regression.py:loss=huber_loss \
        --workdir=runs/diabetes_huber
    python -m experiments.main --config=configs/regression.py:smoke \
        --workdir=runs/regression_smoke

Arguments (comma string after `:`): `loss=<label>`, `smoke`.
"""

from configs import common

LOSSES = {
    "squared_error": {"name": "squared_error", "kwargs": {}, "target": "value"},
    "absolute_error": {"name": "absolute_error", "kwargs": {}, "target": "value"},
    "huber_loss": {"name": "huber_loss", "kwargs": {"delta": 1.0}, "target": "value"},
    "gaussian_nll": {"name": "gaussian_nll", "kwargs": {}, "target": "mean_variance"},
    # The median (tau = 0.5): the point prediction is comparable with the others.
    "quantile_loss": {"name": "quantile_loss", "kwargs": {"quantile": 0.5},
                      "target": "value"},
}
METRIC, MODE = "test/rmse", "min"


def get_config(arg=None):
    args = common.parse_arg(arg, ("loss", "smoke"))
    c = common.base_config()
    c.data.name = "diabetes"
    c.model.name = "mlp"
    c.model.kwargs = {"hidden": (64, 64)}
    c.num_train_steps = 150
    c.batch_size = 32
    c.log_every_steps = 5
    c.eval_every_steps = 15
    c.checkpoint_every_steps = 150
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 7
    common.set_loss(c, LOSSES, args.get("loss", "squared_error"))
    return common.finish(c, bool(args.get("smoke")), smoke_steps=40)
