"""The "which loss?" study: every scenario x each of its losses x 3 seeds.

    ./launch.sh        # = python -m experiments.study --config=configs/study.py \
                       #       --workdir=runs/study
    python -m experiments.study --config=configs/study.py:smoke --workdir=runs/study_smoke

Arguments (comma string after `:`): `smoke` (2 losses per task, 2 seeds, a few
steps: seconds, for the tests), `tasks=digits+text` (a subset), `seeds=3`.

A scenario is one entry of `config.scenarios`: the config module that defines the task
(with its own `LOSSES` table, `METRIC` and `MODE`), the loss labels to compare, and
overrides for its config. Language modelling with the fused cross-entropy plugs in as
a new entry once its config module exists.
"""

import importlib

import ml_collections as mlc

from configs import common

# name -> (config module, title); the order is the report's order.
SCENARIOS = {
    "digits": ("configs.digits", "Image classification (digits, CNN)"),
    "text": ("configs.text", "Text classification (stdlib docstrings)"),
    "regression": ("configs.regression", "Regression (diabetes, MLP)"),
    "asr": ("configs.asr", "Speech recognition (espeak-ng words, conv + CTC)"),
}


def scenario(module: str, title: str, *, smoke: bool) -> mlc.ConfigDict:
    mod = importlib.import_module(module)
    losses = tuple(mod.LOSSES)
    return mlc.ConfigDict({
        "config": module,
        "title": title,
        # Smoke: the first two losses only.
        "losses": losses[:2] if smoke else losses,
        "metric": mod.METRIC,
        "mode": mod.MODE,
        # Fields set on the task's config (dotted names), e.g. {"num_train_steps": 300}.
        "overrides": {"num_train_steps": 10} if smoke else {},
    })


def get_config(arg=None):
    args = common.parse_arg(arg, ("smoke", "tasks", "seeds"))
    smoke = bool(args.get("smoke"))
    c = mlc.ConfigDict()
    c.smoke = smoke
    c.seeds = tuple(range(int(args.get("seeds", 2 if smoke else 3))))
    names = str(args.get("tasks", "+".join(SCENARIOS))).split("+")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; valid: {', '.join(SCENARIOS)}.")
    c.order = tuple(names)  # ConfigDict iterates its keys sorted; the report does not
    c.scenarios = mlc.ConfigDict(
        {n: scenario(*SCENARIOS[n], smoke=smoke) for n in names})
    return c
