"""The "which loss?" study: each scenario with each of its losses, over seeds and
learning rates.

    python -m experiments.study --config=configs/study.py --workdir=runs/study

Each (task, loss) is one sweep (`experiments.sweep`): every (seed, learning rate)
trained at once as one vmapped program, on the training data minus a validation
split carved from it. The rate of each loss is chosen on the validation split (mean
over seeds, `choose_rate`); the tables report the test metric at that rate.
Writes into the workdir: `<task>/<loss>/sweep.json` per sweep (so an interrupted
study resumes at the next sweep), `results.json` (the chosen rate's runs), one
learning-curve PNG per task and `report.md`; prints the tables and the wall time.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import ml_collections as mlc

import lossjax
from experiments import data as data_lib
from experiments import models, report, sweep, tasks


def task_config(scen: mlc.ConfigDict, label: str, seed: int, smoke: bool):
    module = importlib.import_module(scen.config)
    config = module.get_config(f"loss={label}" + (",smoke" if smoke else ""))
    with config.unlocked():
        config.seed = seed
        config.progress_bar = False
        _override(config, scen.overrides)
    return module, config


def _override(config: mlc.ConfigDict, overrides) -> None:
    """Sets the fields of the nested `overrides` on `config`, leaving the others."""
    for key, value in overrides.items():
        if isinstance(value, (dict, mlc.ConfigDict)) and key in config:
            _override(config[key], value)
        else:
            config[key] = value


def _setup_lines(config: mlc.ConfigDict, cache_dir: pathlib.Path) -> list[str]:
    ds = data_lib.load(config.data.name, cache_dir=cache_dir,
                       **config.data.kwargs.to_dict())
    task = tasks.build_task(config, ds)
    abstract = jax.eval_shape(functools.partial(tasks.init_state, task, 0,
                                                  ds.x_train[:1]))
    o = config.optimizer
    lines = [
        f"data: {ds.description}; {ds.num_train} train / {ds.num_test} test "
        "examples (fixed split)",
        f"model: `{config.model.name}` {config.model.kwargs.to_dict()}, "
        f"{models.param_count(abstract['params']):,} parameters, compute dtype "
        f"{config.dtype}",
        f"optimizer: {o.name}, peak learning rate {o.learning_rate}, {o.schedule} "
        f"schedule with {o.warmup_steps} warmup steps"
        + (f", weight decay {o.weight_decay}" if o.name == "adamw" else ""),
        f"{config.num_train_steps} steps of batch {config.batch_size}; test metrics "
        f"every {config.eval_every_steps} steps",
    ]
    return lines


def choose_rate(members: list[dict], metric: str, mode: str) -> float:
    """The learning rate with the best mean validation `metric` over seeds. A rate at
    which any seed diverged is never chosen unless every rate had a diverged seed;
    among those, the best finite mean wins."""
    key = metric.replace("test/", "val/", 1)
    rates = list(dict.fromkeys(m["learning_rate"] for m in members))
    if len(rates) == 1:
        return rates[0]
    sign = 1 if mode == "min" else -1

    def badness(rate):
        runs = [m for m in members if m["learning_rate"] == rate]
        diverged = any(m["diverged_at"] is not None for m in runs)
        mean = statistics.fmean(m["summary"].get(key, math.nan) for m in runs)
        finite = math.isfinite(mean)
        return (diverged, not finite, sign * mean if finite else 0.0)

    return min(rates, key=badness)


def _sweep(config, scen, cfg, workdir: pathlib.Path) -> list[dict]:
    """The sweep of one (task, loss) whose run config is `cfg`, from its
    `sweep.json` if an earlier study ran the same plan (that config, the seeds, the
    rates and the validation split)."""
    path = workdir / "sweep.json"
    rates = tuple(scen.learning_rates)
    fraction = config.validation_fraction if len(rates) > 1 else None
    # JSON values throughout, so that it compares equal to the stored one.
    plan = {"config": json.loads(cfg.to_json()), "seeds": list(config.seeds),
            "learning_rates": list(rates), "validation_fraction": fraction}
    if path.exists():
        stored = json.loads(path.read_text())
        if isinstance(stored, dict) and stored.get("plan") == plan:
            return stored["members"]
        logging.getLogger("experiments").warning(
            "%s was written for another plan; sweeping again.", path)
    members = sweep.run(cfg, config.seeds, rates, cache_dir=workdir.parents[1] / "data",
                        validation_fraction=fraction, strategy=scen.strategy)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"plan": plan, "members": members}) + "\n")
    return members


def run_study(config: mlc.ConfigDict, workdir: str) -> str:
    """Sweeps every scenario x loss over seeds and rates, then writes the report;
    returns the tables."""
    start = time.perf_counter()
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    plan, skipped, tasks = [], [], {}
    order = list(config.get("order", ())) or list(config.scenarios)
    for name in order:
        scen = config.scenarios[name]
        for label in scen.losses:
            _, cfg = task_config(scen, label, 0, config.smoke)
            if cfg.loss.name not in lossjax.LOSSES:
                skipped.append(f"{name}/{label}: `lossjax.{cfg.loss.name}` is not "
                               "registered in this version of lossjax.")
                continue
            plan.append((name, scen, label))
        if any(p[0] == name for p in plan):
            _, cfg0 = task_config(scen, scen.losses[0], 0, config.smoke)
            arg = f"loss=<label>{',smoke' if config.smoke else ''}"
            tasks[name] = {"title": scen.title, "metric": scen.metric,
                           "mode": scen.mode,
                           "setup": _setup_lines(cfg0, workdir / "data"),
                           "command": f"--config={scen.config.replace('.', '/')}"
                                      f".py:{arg}",
                           "rates": tuple(scen.learning_rates),
                           "caveat": scen.get("caveat", "")}
    records, sweeps, failed = [], [], []
    bar = None
    if is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan), desc="study", unit="sweep", dynamic_ncols=True)
    for name, scen, label in plan:
        if bar is not None:
            bar.set_postfix_str(f"{name} / {label}")
        _, cfg = task_config(scen, label, 0, config.smoke)
        members = _sweep(config, scen, cfg, workdir / name / label)
        rate = choose_rate(members, scen.metric, scen.mode)
        common = {"task": name, "loss": label, "metric": scen.metric,
                  "mode": scen.mode}
        for m in members:
            sweeps.append({**common, "seed": m["seed"],
                           "learning_rate": m["learning_rate"],
                           "diverged_at": m["diverged_at"], "summary": m["summary"]})
            if m["learning_rate"] != rate:
                continue
            if m["diverged_at"] is not None:
                # A diverging loss is a result, not a crash: report it and go on.
                failed.append(f"{name}/{label} seed {m['seed']} at learning rate "
                              f"{rate:g} diverged at step {m['diverged_at']}.")
                continue
            records.append({
                **common, "seed": m["seed"], "learning_rate": rate,
                "lossjax": cfg.loss.name, "kwargs": cfg.loss.kwargs.to_dict(),
                "summary": m["summary"],
                "curve": [[s, v[scen.metric]] for s, v in m["curve"]],
                "train_curve": m["train_curve"]})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not is_main:
        return ""
    (workdir / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    total = time.perf_counter() - start
    environment = {
        "hardware": f"{jax.device_count()} x {jax.devices()[0].device_kind} "
                    f"({jax.default_backend()}), {platform.machine()}, "
                    f"{os.cpu_count()} CPU cores",
        "software": f"python {platform.python_version()}, jax {jax.__version__}, "
                    f"lossjax {getattr(lossjax, '__version__', 'dev')}",
        "study wall time": f"{total:.0f} s ({total / 60:.1f} min) for {len(sweeps)} "
                           f"runs in {len(plan)} sweeps, measured by the study "
                           "itself (sweeps an earlier study finished are read back)",
    }
    return report.write_report(workdir, records, tasks, environment,
                               skipped + failed, sweeps)


def main(argv):
    from absl import flags
    from absl import logging as absl_logging

    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("experiments").setLevel(logging.WARNING)
    tables = run_study(flags.FLAGS.config, flags.FLAGS.workdir)
    if tables:
        print("\n" + tables)
        print(f"\nreport: {pathlib.Path(flags.FLAGS.workdir) / 'report.md'}",
              file=sys.stderr)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "study config file")
    flags.DEFINE_string("workdir", None, "directory for runs, plots and report.md")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
