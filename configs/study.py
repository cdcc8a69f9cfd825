"""The "which loss?" study: every scenario x each of its losses x 3 seeds x 3 rates.

    ./launch.sh        # = python -m experiments.study --config=configs/study.py \
                       #       --workdir=runs/study
    python -m experiments.study --config=configs/study.py:smoke \
        --workdir=runs/study_smoke

Arguments (comma string after `:`): `smoke` (2 losses per task, 2 seeds x 2 rates, a few
steps: seconds, for the tests; all tasks but `lm` unless `tasks` names it),
`tasks=digits+lm` (a subset, in this order), `seeds=3`.

A scenario is one entry of `config.scenarios`: the config module that defines the task
(with its own `LOSSES` table, `METRIC` and `MODE`), the loss labels to compare,
overrides for its config (nested as the config is) and the peak learning rates each
loss is swept over; each loss's rate is chosen on a validation split of
`validation_fraction` of the training data.

Language modelling (`lm`, `configs/lm.py`) compares `cross_entropy` on materialized
logits, the fused `linear_cross_entropy`, and the fused loss with z-loss and with
label smoothing, on the plain test cross-entropy (perplexity alongside). To keep the
whole study within 10 minutes on a 2-core CPU it runs a cut-down budget: 120 steps
of 8 windows instead of 300 of 16, 64-token windows instead of 128, 64 test windows
(4k tokens) instead of 128; speech (`asr`) trains 300 steps instead of 400; the
report's caveats say so. `python -m experiments.main --config=configs/lm.py`
runs the full setting of one loss.
"""

import importlib

import ml_collections as mlc

from configs import common

# The language model's cut-down budget in the study (see the module docstring).
LM_OVERRIDES = {
    "num_train_steps": 120, "eval_every_steps": 40, "checkpoint_every_steps": 120,
    "batch_size": 8, "optimizer": {"warmup_steps": 12},
    "data": {"kwargs": {"seq_len": 64, "max_test_windows": 64}},
}

# Speech: a cut-down budget (300 steps instead of 400; see CAVEATS), test and
# validation error rates (beam search over every run of the sweep) at the middle and
# the end only.
ASR_OVERRIDES = {"num_train_steps": 300, "eval_every_steps": 150,
                 "checkpoint_every_steps": 300}

# What the report's caveats say about a scenario's study setting.
CAVEATS = {
    "lm": "the study runs a cut-down budget (120 steps of 8 windows of 64 tokens, "
          "test metrics on 64 held-out windows, 4k tokens) against `configs/lm.py`'s "
          "300 steps of 16 windows of 128 tokens and 128 test windows: the model is "
          "far from converged, and the ranking of z-loss and label smoothing may "
          "change with longer training.",
    "asr": "the study trains 300 steps against `configs/asr.py`'s 400 (error rates "
           "at the end are higher than a full run's).",
}

# name -> the config module that defines the task, the report's title, overrides of
# the full study (nested as the config is), the peak learning rates of the sweep (the
# task config's own rate and the rates a factor ~3 either side) and the `strategy`
# by which the sweep's members share the CPU (`experiments.sweep.STRATEGIES`:
# "vmap", one vmapped program, or "loop", one compiled step for each member in turn;
# the faster one, measured by `python -m benchmarks.sweep_members`). The order is
# the report's order. The language model keeps one rate: its runs compare one
# function computed two ways plus two of its options.
SCENARIOS = {
    "digits": {"config": "configs.digits",
               "title": "Image classification (digits, CNN)",
               "overrides": {}, "rates": (1e-3, 3e-3, 1e-2), "strategy": "loop"},
    "text": {"config": "configs.text",
             "title": "Text classification (stdlib docstrings)",
             "overrides": {}, "rates": (1e-2, 3e-2, 1e-1), "strategy": "loop"},
    "regression": {"config": "configs.regression",
                   "title": "Regression (diabetes, MLP)",
                   "overrides": {}, "rates": (3e-4, 1e-3, 3e-3), "strategy": "vmap"},
    "asr": {"config": "configs.asr",
            "title": "Speech recognition (espeak-ng words, conv + CTC)",
            "overrides": ASR_OVERRIDES, "rates": (1e-3, 3e-3, 1e-2),
            "strategy": "loop"},
    "lm": {"config": "configs.lm",
           "title": "Language modelling (stdlib source, transformer)",
           "overrides": LM_OVERRIDES, "rates": (3e-3,), "strategy": "vmap"},
}
# The share of each task's training data held out to choose the learning rate.
VALIDATION_FRACTION = 0.2
# Tasks of the smoke study (the tests): those that add only seconds.
SMOKE_TASKS = ("digits", "text", "regression", "asr")


def scenario(name: str, *, config: str, title: str, overrides: dict, rates: tuple,
             strategy: str, smoke: bool) -> mlc.ConfigDict:
    mod = importlib.import_module(config)
    losses = tuple(mod.LOSSES)
    return mlc.ConfigDict({
        "config": config,
        "title": title,
        # Smoke: the first two losses only.
        "losses": losses[:2] if smoke else losses,
        "metric": mod.METRIC,
        "mode": mod.MODE,
        # Fields set on the task's config, nested as the config is (a ConfigDict key
        # holds no dots); smoke runs the task's own smoke variant for a few steps.
        "overrides": {"num_train_steps": 10} if smoke else overrides,
        "caveat": "" if smoke else CAVEATS.get(name, ""),
        # Smoke: two rates, enough to exercise the choice.
        "learning_rates": rates[1:] if smoke and len(rates) > 1 else rates,
        "strategy": strategy,
    })


def get_config(arg=None):
    args = common.parse_arg(arg, ("smoke", "tasks", "seeds"))
    smoke = bool(args.get("smoke"))
    c = mlc.ConfigDict()
    c.smoke = smoke
    c.seeds = tuple(range(int(args.get("seeds", 2 if smoke else 3))))
    default = SMOKE_TASKS if smoke else tuple(SCENARIOS)
    names = str(args.get("tasks", "+".join(default))).split("+")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; valid: {', '.join(SCENARIOS)}.")
    c.validation_fraction = VALIDATION_FRACTION
    c.order = tuple(names)  # ConfigDict iterates its keys sorted; the report does not
    c.scenarios = mlc.ConfigDict(
        {n: scenario(n, **SCENARIOS[n], smoke=smoke) for n in names})
    return c
