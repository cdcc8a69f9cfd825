"""The "which loss?" study: trains each scenario with each of its losses over seeds.

    python -m experiments.study --config=configs/study.py --workdir=runs/study

Writes into the workdir: one run directory per (task, loss, seed) (each a normal
`train_and_evaluate` workdir, so an interrupted study resumes where it stopped),
`results.json`, one learning-curve PNG per task and `report.md`; prints the tables.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import pathlib
import platform
import sys
import time

import jax
import ml_collections as mlc

import lossjax
from experiments import data as data_lib
from experiments import models, report, tasks, train


def _read_curves(workdir: pathlib.Path, metric: str):
    curve, train_curve = [], []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if metric in m:
            curve.append([m["step"], m[metric]])
        if "train/loss" in m:
            train_curve.append([m["step"], m["train/loss"]])
    return curve, train_curve


def _task_config(scen: mlc.ConfigDict, label: str, seed: int, smoke: bool):
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


def run_study(config: mlc.ConfigDict, workdir: str) -> str:
    """Runs every scenario x loss x seed, then writes the report; returns the tables."""
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    plan, skipped, tasks = [], [], {}
    order = list(config.get("order", ())) or list(config.scenarios)
    for name in order:
        scen = config.scenarios[name]
        for label in scen.losses:
            module, cfg = _task_config(scen, label, 0, config.smoke)
            if cfg.loss.name not in lossjax.LOSSES:
                skipped.append(f"{name}/{label}: `lossjax.{cfg.loss.name}` is not "
                               "registered in this version of lossjax.")
                continue
            plan += [(name, scen, label, seed) for seed in config.seeds]
        if any(p[0] == name for p in plan):
            _, cfg0 = _task_config(scen, scen.losses[0], 0, config.smoke)
            arg = f"loss=<label>{',smoke' if config.smoke else ''}"
            tasks[name] = {"title": scen.title, "metric": scen.metric,
                           "mode": scen.mode, "setup": _setup_lines(cfg0, workdir / "data"),
                           "command": f"--config={scen.config.replace('.', '/')}"
                                      f".py:{arg}",
                           "caveat": scen.get("caveat", "")}
    records, failed = [], []
    bar = None
    if is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan), desc="study", unit="run", dynamic_ncols=True)
    start = time.perf_counter()
    for name, scen, label, seed in plan:
        _, cfg = _task_config(scen, label, seed, config.smoke)
        if bar is not None:
            bar.set_postfix_str(f"{name} / {label} / seed {seed}")
        run_dir = workdir / name / label / f"seed{seed}"
        try:
            summary = train.train_and_evaluate(cfg, str(run_dir))
        except FloatingPointError as e:
            # A diverging loss is a result, not a crash: report it and go on.
            failed.append(f"{name}/{label} seed {seed} diverged: {e}")
            if bar is not None:
                bar.update(1)
            continue
        curve, train_curve = _read_curves(run_dir, scen.metric) if is_main else ([], [])
        records.append({
            "task": name, "loss": label, "seed": seed, "metric": scen.metric,
            "mode": scen.mode, "lossjax": cfg.loss.name,
            "kwargs": cfg.loss.kwargs.to_dict(), "summary": summary,
            "curve": curve, "train_curve": train_curve})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not is_main:
        return ""
    total = time.perf_counter() - start
    (workdir / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    environment = {
        "hardware": f"{jax.device_count()} x {jax.devices()[0].device_kind} "
                    f"({jax.default_backend()}), {platform.machine()}",
        "software": f"python {platform.python_version()}, jax {jax.__version__}, "
                    f"lossjax {getattr(lossjax, '__version__', 'dev')}",
        "study wall time": f"{total:.0f} s for {len(records)} runs",
    }
    return report.write_report(workdir, records, tasks, environment,
                               skipped + failed)


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
