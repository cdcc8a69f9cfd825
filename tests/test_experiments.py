"""Tests of the experiment harness: trainer, configs, checkpoints, parallel paths.

Runs on the 8 fake CPU devices of conftest.py; subprocess tests pin the same device
count so in-process and subprocess runs compile the same programs.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lossjax
from experiments import (
    checkpoints,
    parallel,
    programs,
    schema,
    scoring,
    sharding,
    steps,
    tasks,
    train,
)
from experiments import data as data_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(module="digits", arg="smoke", **overrides):
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    with config.unlocked():
        config.progress_bar = False
        for key, value in overrides.items():
            target = config
            *path, last = key.split(".")
            for part in path:
                target = target[part]
            target[last] = value
    return config


def read_metrics(workdir, key="train/loss"):
    lines = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl")
             .read_text().splitlines()]
    return [(m["step"], m[key]) for m in lines if key in m]


def final_state(workdir):
    """The newest checkpoint of a workdir as NumPy arrays."""
    with ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                               item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True)) as manager:
        step = manager.latest_step()
        restored = checkpoints.restore_placed(
            manager, step, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return step, jax.tree.map(np.asarray, restored)


def subprocess_env(num_devices=8, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_devices),
               PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def main_command(workdir, arg="smoke", module="digits", *flags):
    return [sys.executable, "-m", "experiments.main",
            f"--config=configs/{module}.py:{arg}", f"--workdir={workdir}",
            "--config.progress_bar=False", *flags]


# --- configs and data ---------------------------------------------------------------


@pytest.mark.parametrize("module", ["digits", "text", "regression"])
def test_smoke_run_loss_falls(module, tmp_path):
    summary = train.train_and_evaluate(smoke_config(module), str(tmp_path))
    losses = [v for _, v in read_metrics(tmp_path)]
    assert summary["step"] == 40 and len(losses) == 8
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
    metric = "test/accuracy" if module != "regression" else "test/rmse"
    assert np.isfinite(summary[metric])
    assert (tmp_path / "checkpoints" / "40").is_dir()


def test_data_is_explicitly_typed_and_batches_depend_on_seed_and_step():
    with jax.enable_x64(True):
        for ds in (data_lib.digits(), data_lib.diabetes(), data_lib.stdlib_docs()):
            assert ds.x_train.dtype in (np.float32, np.int32)
            assert ds.y_train.dtype == (np.int32 if ds.num_classes else np.float32)
            assert ds.num_test > 50 and ds.num_train > 3 * ds.num_test
    a = data_lib.batch_indices(0, 7, 100, 16)
    np.testing.assert_array_equal(a, data_lib.batch_indices(0, 7, 100, 16))
    assert not np.array_equal(a, data_lib.batch_indices(1, 7, 100, 16))
    # One epoch (6 full batches of 16 from 100) has no repeats.
    epoch = np.concatenate([data_lib.batch_indices(0, s, 100, 16) for s in range(6)])
    assert len(np.unique(epoch)) == 96
    assert len(set(data_lib.stdlib_docs().class_names)) == 8


def test_config_args_and_docstrings():
    from configs import digits, regression, text

    for module in (digits, text, regression):
        assert "experiments.main" in module.__doc__ and ":smoke" in module.__doc__
        c = module.get_config("smoke")
        schema.validate_config(c)
        for label in module.LOSSES:
            assert module.get_config(f"loss={label},smoke").loss.name == \
                module.LOSSES[label]["name"]
    c = digits.get_config("loss=label_smoothing")
    assert c.loss.kwargs.label_smoothing == 0.1 and c.num_train_steps > 40
    with pytest.raises(ValueError, match="unknown config argument 'los'"):
        digits.get_config("los=focal_loss")


def test_bad_config_values_raise_clearly(tmp_path):
    config = smoke_config(**{"loss.name": "cross_entropyy"})
    with pytest.raises(KeyError, match="unknown loss 'cross_entropyy'; valid names"):
        train.train_and_evaluate(config, str(tmp_path))
    config = smoke_config()
    with config.unlocked():
        config.optimizer.learnig_rate = 1.0
    with pytest.raises(ValueError, match="'optimizer.learnig_rate'; did you mean "
                                         "'optimizer.learning_rate'"):
        train.train_and_evaluate(config, str(tmp_path))
    with pytest.raises(ValueError, match="cross_entropy has no keyword 'gama'"):
        schema.validate_config(smoke_config(**{"loss.kwargs": {"gama": 2.0}}))
    with pytest.raises(ValueError, match="config.parallel='pjit' is not one of"):
        schema.validate_config(smoke_config(parallel="pjit"))
    # Configs are locked: a typo in a field name fails where it is written.
    with pytest.raises(AttributeError, match="learnig_rate"):
        importlib.import_module("configs.digits").get_config(
            "smoke").optimizer.learnig_rate = 1.0
    assert not (tmp_path / "checkpoints").exists()


def test_any_loss_keyword_can_be_set_from_the_command_line(monkeypatch):
    from absl import flags

    from experiments import main

    def parse(*overrides):
        argv = ["main", "--config=configs/digits.py:smoke", "--workdir=unused",
                *overrides]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides here
        flag_values = flags.FlagValues()
        main.define_flags(flag_values)
        flag_values(argv)
        return flag_values.config

    config = parse("--config.loss.kwargs.label_smoothing=0.2")
    assert schema.validate_config(config)["loss.kwargs"] == {"label_smoothing": 0.2}
    # A keyword the loss does not take fails with the valid ones named.
    with pytest.raises(ValueError, match="cross_entropy has no keyword "
                                         "'label_smothing'.*valid: .*label_smoothing"):
        schema.validate_config(parse("--config.loss.kwargs.label_smothing=0.2"))
    # Elsewhere the config stays locked: a typo fails as the flags are parsed.
    with pytest.raises(Exception, match="learnig_rate"):
        parse("--config.optimizer.learnig_rate=0.1")


def test_experiments_modules_stay_small_and_import_no_cycle():
    import ast

    sources = {p.stem: p for p in (ROOT / "experiments").glob("*.py")}
    graph = {}
    for name, path in sources.items():
        lines = path.read_text().splitlines()
        assert len(lines) <= 400, (path, len(lines))
        deps = set()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.ImportFrom) and node.module == "experiments":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("experiments."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names
                         if a.name.startswith("experiments.")}
        graph[name] = deps & set(sources)
    assert len((ROOT / "experiments" / "train.py").read_text().splitlines()) < 300

    def visit(name, path):  # depth-first: a module met again on its own path is a cycle
        assert name not in path, " -> ".join([*path, name])
        for dep in graph[name]:
            visit(dep, (*path, name))

    for name in graph:
        visit(name, ())


def test_every_loss_target_has_one_adapter():
    assert tuple(tasks.ADAPTERS) == schema.LOSS_TARGETS


# --- the step -----------------------------------------------------------------------


def test_known_answer_constant_logits_give_log_num_classes(tmp_path):
    config = smoke_config(num_train_steps=1, log_every_steps=1, eval_every_steps=1,
                          checkpoint_every_steps=1, **{"model.name": "constant",
                                                       "model.kwargs": {}})
    summary = train.train_and_evaluate(config, str(tmp_path))
    [(step, loss)] = read_metrics(tmp_path)
    assert step == 1
    # Each entry is log(10) in float32; the batch mean of 64 equal entries may round
    # by an ulp or two (float32 ulp at 2.3 is 2.4e-7), nothing more.
    np.testing.assert_allclose(loss, math.log(10), rtol=5e-7, atol=0)
    # The test loss is taken after one update, so it is no longer exactly log(10).
    assert abs(summary["test/loss"] - math.log(10)) < 0.05


def test_step_compiles_once_and_its_memory_is_recorded(tmp_path):
    before = steps.TRACE_COUNT["train_step"]
    summary = train.train_and_evaluate(smoke_config(num_train_steps=12), str(tmp_path))
    # Reading the compiled step's memory analysis does not trace it again.
    assert steps.TRACE_COUNT["train_step"] - before == 1
    for key in ("xla_temp_mib", "xla_argument_mib", "xla_output_mib", "peak_rss_mib"):
        assert summary[f"memory/{key}"] > 0, summary
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["memory/xla_temp_mib"] == summary["memory/xla_temp_mib"]
    # The arguments hold at least the parameters and Adam's two moments.
    num_params = summary["num_params"]
    assert summary["memory/xla_argument_mib"] * 2**20 > 3 * 4 * num_params / 8


def test_jit_and_pmap_give_the_same_losses_step_by_step(tmp_path):
    curves, params = {}, {}
    for mode in ("jit", "pmap"):
        workdir = tmp_path / mode
        train.train_and_evaluate(
            smoke_config(parallel=mode, num_train_steps=12, log_every_steps=1),
            str(workdir))
        curves[mode] = read_metrics(workdir)
        params[mode] = final_state(workdir)[1]["params"]
    assert [s for s, _ in curves["jit"]] == list(range(1, 13))
    # Same math, different summation order across devices: agree to float32 rounding.
    np.testing.assert_allclose([v for _, v in curves["pmap"]],
                               [v for _, v in curves["jit"]], rtol=2e-6)
    chex.assert_trees_all_close(params["pmap"], params["jit"], rtol=1e-4, atol=1e-5)


def test_bfloat16_computes_in_bf16_with_f32_params_and_loss(tmp_path):
    dataset = data_lib.digits()
    task = tasks.build_task(smoke_config(dtype="bfloat16"), dataset)
    state = tasks.init_state(task, 0, dataset.x_train[:4])
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
    outputs = task.model.apply({"params": state["params"]}, dataset.x_train[:4])
    assert outputs.dtype == jnp.bfloat16
    assert tasks.loss(task, outputs, {"y": dataset.y_train[:4]}).dtype == jnp.float32
    # Training end to end in bf16 (the MLP task: bf16 convolutions are slow on CPU).
    train.train_and_evaluate(smoke_config("regression", dtype="bfloat16"),
                             str(tmp_path))
    losses = [v for _, v in read_metrics(tmp_path)]
    assert losses[-1] < 0.8 * losses[0]


def test_checked_mode_reports_bad_labels(tmp_path):
    dataset = data_lib.digits()
    task = tasks.build_task(smoke_config(), dataset)
    mesh = sharding.make_mesh()
    batch = {"x": dataset.x_train[:16], "y": dataset.y_train[:16].copy()}
    batch["y"][3] = 12  # out of range for 10 classes
    state = lambda: tasks.init_state(task, 0, dataset.x_train[:1])
    checked = parallel.make_train_step(task, mesh, checks=True)
    with pytest.raises(AssertionError, match=r"cross_entropy: labels must lie in "
                                             r"\[0, 10\)"):
        checked.fn(state(), checked.put_batch(batch))
    # On clean data checked mode trains normally.
    summary = train.train_and_evaluate(smoke_config(checks=True, num_train_steps=5),
                                       str(tmp_path))
    assert summary["step"] == 5


def test_non_finite_loss_stops_the_run_and_saves_nothing_broken(tmp_path):
    config = smoke_config(num_train_steps=40, checkpoint_every_steps=2,
                          log_every_steps=10, **{"optimizer.learning_rate": 1e30,
                                                 "optimizer.schedule": "constant"})
    with pytest.raises(FloatingPointError, match=r"at step (\d+)") as err:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(err.value.args[0].split("at step ")[1].split()[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert all(s < bad_step for s in saved)
    if saved:
        state = final_state(tmp_path)[1]
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    if (tmp_path / "metrics.jsonl").exists():
        assert all(s < bad_step for s, _ in read_metrics(tmp_path))


# --- checkpoints --------------------------------------------------------------------


def test_corrupt_latest_checkpoint_is_skipped(tmp_path):
    config = smoke_config(num_train_steps=40, checkpoint_every_steps=20)
    train.train_and_evaluate(config, str(tmp_path / "a"))
    _, reference = final_state(tmp_path / "a")
    # Damage every file of the latest checkpoint.
    for f in (tmp_path / "a" / "checkpoints" / "40").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.warns(RuntimeWarning, match="step 40 .* could not be restored"):
        summary = train.train_and_evaluate(config, str(tmp_path / "a"))
    assert summary["step"] == 40
    step, state = final_state(tmp_path / "a")
    assert step == 40
    # Retrained from step 20: bitwise the parameters of the uninterrupted run.
    chex.assert_trees_all_equal(state["params"], reference["params"])
    assert list((tmp_path / "a" / "checkpoints_corrupt").iterdir())


def test_init_from_starts_a_fresh_run_from_other_parameters(tmp_path):
    train.train_and_evaluate(smoke_config(num_train_steps=20), str(tmp_path / "a"))
    config = smoke_config(num_train_steps=1, log_every_steps=1,
                          init_from=str(tmp_path / "a"),
                          **{"optimizer.learning_rate": 0.0})
    train.train_and_evaluate(config, str(tmp_path / "b"))
    [(_, loss)] = read_metrics(tmp_path / "b")
    # A trained network, not a fresh one (log 10 = 2.30).
    assert loss < 2.0
    chex.assert_trees_all_equal(final_state(tmp_path / "b")[1]["params"],
                                final_state(tmp_path / "a")[1]["params"])


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigkill_then_resume_gives_bitwise_the_same_parameters(tmp_path):
    steps = 150
    flags = [f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=25",
             "--config.log_every_steps=25", "--config.eval_every_steps=1000"]
    reference = tmp_path / "reference"
    train.train_and_evaluate(
        smoke_config(num_train_steps=steps, checkpoint_every_steps=25,
                     log_every_steps=25, eval_every_steps=1000), str(reference))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(main_command(killed, "smoke", "digits", *flags), cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # Kill at a random moment after training has started (seeded, so reproducible).
    _wait_for(lambda: (killed / "metrics.jsonl").exists(), proc)
    time.sleep(np.random.default_rng(0).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / str(steps)).exists(), "killed too late"
    resumed = subprocess.run(main_command(killed, "smoke", "digits", *flags), cwd=ROOT,
                             env=subprocess_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    chex.assert_trees_all_equal(final_state(killed), final_state(reference))
    # The resumed log has each step once, and the same losses.
    assert read_metrics(killed) == read_metrics(reference)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    flags = ["--config.num_train_steps=100000",
             "--config.checkpoint_every_steps=100000",
             "--config.log_every_steps=10", "--config.eval_every_steps=100000"]
    proc = subprocess.Popen(main_command(tmp_path, "smoke", "digits", *flags),
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    step, state = final_state(tmp_path)
    assert 10 <= step < 100000
    assert int(state["step"]) == step


# --- multi-process ------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    flags = ["--config.num_train_steps=10", "--config.log_every_steps=1",
             "--config.checkpoint_every_steps=5"]
    port = _free_port()
    procs = [subprocess.Popen(
        main_command(tmp_path / "multi", "smoke", "digits", *flags), cwd=ROOT,
        env=subprocess_env(4, LOSSJAX_DISTRIBUTED="1",
                           JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
    train.train_and_evaluate(
        smoke_config(num_train_steps=10, log_every_steps=1, checkpoint_every_steps=5),
        str(tmp_path / "single"))
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert [s for s, _ in multi] == list(range(1, 11))
    np.testing.assert_allclose([v for _, v in multi], [v for _, v in single],
                               rtol=2e-6)
    chex.assert_trees_all_close(final_state(tmp_path / "multi")[1]["params"],
                                final_state(tmp_path / "single")[1]["params"],
                                rtol=1e-4, atol=1e-5)


def test_configs_name_registered_losses():
    """The study's losses must exist in the registry (a rename would break it)."""
    from configs import digits, regression, text

    for module in (digits, text, regression):
        for spec in module.LOSSES.values():
            assert spec["name"] in lossjax.LOSSES, spec["name"]


# --- the study ----------------------------------------------------------------------


def test_study_smoke_writes_report_tables_and_plots(tmp_path):
    from configs import study as study_config
    from experiments import study

    config = study_config.get_config("smoke")
    programs.clear()
    before = steps.TRACE_COUNT["train_step"]
    tables = study.run_study(config, str(tmp_path))
    # 3 tasks x 2 losses x 2 seeds + asr's one loss x 2 seeds at each loss's chosen
    # rate; the seeds and rates of a loss share one compilation (one vmapped step).
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == 14
    assert steps.TRACE_COUNT["train_step"] - before == 7
    # Each loss's rate is its best mean validation metric among the swept rates.
    sweep = json.loads((tmp_path / "digits" / "cross_entropy" / "sweep.json")
                       .read_text())["members"]
    assert {m["learning_rate"] for m in sweep} == set(
        config.scenarios.digits.learning_rates) and len(sweep) == 4
    val = {lr: np.mean([m["summary"]["val/accuracy"] for m in sweep
                        if m["learning_rate"] == lr]) for lr in (3e-3, 1e-2)}
    chosen = {r["learning_rate"] for r in records
              if r["task"] == "digits" and r["loss"] == "cross_entropy"}
    assert chosen == {max(val, key=val.get)}, (chosen, val)
    report = (tmp_path / "report.md").read_text()
    for task in ("digits", "text", "regression", "asr"):
        png = (tmp_path / f"{task}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert f"![{task}]({task}.png)" in report
    assert report.count(" wins on ") == 3  # asr has one loss: no contest
    assert "## Appendix" in report and "### Caveats" in report
    assert "### Learning-rate sweep" in report and "| learning rate |" in tables
    assert "Validation accuracy (test accuracy in brackets)" in report
    assert "study wall time" in tables and "study wall time" in report
    for label in ("cross_entropy", "label_smoothing", "squared_error",
                  "absolute_error"):
        assert f"`{label}`" in tables
    assert "step memory [MiB]" in tables and "*step memory*" in report
    assert all(r["summary"]["memory/xla_temp_mib"] > 0 for r in records)
    # Each row's mean is the mean of its seeds' final test metric.
    digits_ce = [r["summary"]["test/accuracy"] for r in records
                 if r["task"] == "digits" and r["loss"] == "cross_entropy"]
    assert f"{np.mean(digits_ce):.4f} ± {np.std(digits_ce, ddof=1):.4f}" in report
    # Re-running the study resumes every finished run: same numbers, no training.
    before = steps.TRACE_COUNT["train_step"]
    study.run_study(config, str(tmp_path))
    again = json.loads((tmp_path / "results.json").read_text())
    assert steps.TRACE_COUNT["train_step"] == before
    assert [r["summary"] for r in again] == [r["summary"] for r in records]


def test_sweep_member_trains_as_its_own_run(tmp_path):
    """A vmapped sweep member (seed 1, the second rate) logs the training losses of
    `train_and_evaluate` at that seed and rate: the injected rate and the stacked
    members change nothing but summation order."""
    from experiments import sweep

    config = smoke_config(num_train_steps=10, log_every_steps=1)
    members = sweep.run(config, (0, 1), (1e-3, 3e-3))
    assert [(m["seed"], m["learning_rate"]) for m in members] == [
        (0, 1e-3), (1, 1e-3), (0, 3e-3), (1, 3e-3)]
    train.train_and_evaluate(smoke_config(num_train_steps=10, log_every_steps=1,
                                          seed=1, **{"optimizer.learning_rate": 3e-3}),
                             str(tmp_path))
    np.testing.assert_allclose([v for _, v in members[3]["train_curve"]],
                               [v for _, v in read_metrics(tmp_path)], rtol=1e-4)
    assert members[3]["summary"]["test/accuracy"] == pytest.approx(
        json.loads((tmp_path / "summary.json").read_text())["test/accuracy"], abs=0.01)
    assert all(m["diverged_at"] is None for m in members)
    # A rate that diverges is marked, and the other members go on.
    members = sweep.run(smoke_config(num_train_steps=6, log_every_steps=2,
                                     **{"optimizer.schedule": "constant"}),
                        (0,), (1e-3, 1e30))
    assert members[0]["diverged_at"] is None and members[1]["diverged_at"] >= 1
    assert np.isfinite(members[0]["summary"]["test/accuracy"])


def test_report_states_fused_vs_materialized_memory():
    from experiments import report

    def record(loss, seed, value, temp, sps):
        return {"task": "lm", "loss": loss, "seed": seed, "metric": "test/loss",
                "mode": "min", "summary": {
                    "test/loss": value, "test/perplexity": math.exp(value),
                    "wall_seconds": 10.0, "first_step_seconds": 1.0,
                    "steps_per_sec": sps, "memory/xla_temp_mib": temp}}

    records = [record("cross_entropy", s, 4.0 + s / 100, 300.0, 1.5) for s in range(3)]
    records += [record("linear_cross_entropy", s, 4.0 + s / 100, 60.0, 3.0)
                for s in range(3)]
    rows = report.summarize(records)["lm"]
    table = report.markdown_table(rows)
    assert "| test perplexity |" in table and "step memory [MiB]" in table
    assert "| 300 |" in table and "| 60 |" in table
    text = report.memory_comparison(rows)
    assert "60 MiB" in text and "300 MiB" in text and "5.0x less" in text, text
    assert "2.00x" in text  # the speed ratio
    assert report.memory_comparison(rows[:1]) is None
    # The same function computed two ways: a tie, not a win by 0.0000.
    assert report.verdict(rows).startswith(
        "`cross_entropy` and `linear_cross_entropy` tie on"), report.verdict(rows)


def test_study_config_has_the_lm_scenario_with_a_cut_budget():
    from configs import study as study_config

    full = study_config.get_config()
    assert "lm" in full.order and "lm" not in study_config.get_config("smoke").order
    lm = full.scenarios.lm
    assert set(lm.losses) == {"cross_entropy", "linear_cross_entropy", "z_loss",
                              "label_smoothing"}
    assert lm.metric == "test/loss" and lm.caveat
    from experiments import study

    _, config = study.task_config(lm, "z_loss", 1, False)
    assert config.num_train_steps == 120 and config.seed == 1
    assert config.data.kwargs.seq_len == 64 and config.loss.kwargs.z_loss > 0
    schema.validate_config(config)


# --- speech recognition (CTC) ---------------------------------------------------------


def test_error_rates_known_answers():
    enc = lambda s: np.array([" abcdefghijklmnopqrstuvwxyz".index(c) + 1 for c in s],
                             np.int32)
    refs = ["one two", "go", "up"]
    hyps = ["one too", "", "up up"]  # a substitution, a deletion, an insertion
    pad = lambda xs: np.stack([np.pad(x, (0, 8 - len(x)), constant_values=-1)
                               for x in xs])
    rates = scoring.error_rates(
        (pad([enc(h) for h in hyps]), np.array([len(h) for h in hyps])),
        pad([enc(r) for r in refs]), np.array([len(r) for r in refs]))
    # Characters: 1 + 2 + 3 edits over 7 + 2 + 2; words: 1 + 1 + 1 over 2 + 1 + 1.
    assert rates == {"cer": 6 / 11, "wer": 3 / 4}
    assert scoring.edit_distance("kitten", "sitting") == 3


def test_asr_smoke_run_loss_falls_and_reports_error_rates(tmp_path):
    from configs import asr
    from experiments import models

    assert "experiments.main" in asr.__doc__ and ":smoke" in asr.__doc__
    for label, spec in asr.LOSSES.items():
        assert spec["name"] in lossjax.LOSSES
        schema.validate_config(asr.get_config(f"loss={label}"))
    data_lib._SPOKEN.clear()  # generate it now, into this workdir
    summary = train.train_and_evaluate(smoke_config("asr"), str(tmp_path))
    assert list((tmp_path / "data").glob("asr_*.npz"))
    ds = data_lib.load("spoken_words", **asr.get_config("smoke").data.kwargs)
    assert ds.x_train.dtype == np.float32 and ds.x_train.ndim == 3
    assert ds.y_train.dtype == np.int32 and np.all(ds.y_train[:, 0] > 0)
    assert np.all(ds.y_train_lengths == np.sum(ds.y_train >= 0, axis=1))
    # The model's logit lengths match its output frames (stride 2: ceil(T / 2)).
    model = models.create("speech_conv", num_outputs=ds.num_classes,
                          dtype="float32", features=8, num_layers=2, stride=2)
    x = ds.x_train[:2, :41]
    logits = model.apply(model.init(jax.random.key(0), x), x)
    assert logits.shape == (2, 21, ds.num_classes)
    np.testing.assert_array_equal(model.output_lengths(np.array([41, 40, 1])),
                                  [21, 20, 1])
    losses = [v for _, v in read_metrics(tmp_path)]
    assert summary["step"] == 40 and np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.5 * losses[0], losses
    for key in ("cer_greedy", "wer_greedy", "cer_beam", "wer_beam"):
        assert 0.0 <= summary[f"test/{key}"] <= 2.0, (key, summary)
    assert "test/accuracy" not in summary


def test_lm_smoke_fused_loss_runs_and_matches_materialized_logits(tmp_path):
    """`linear_cross_entropy` on (hidden, kernel) trains, its first logged loss equals
    `cross_entropy` on the materialized logits (same seed, params and batch), and its
    compiled step needs less scratch memory. Batch 64 and vocab blocks of 128 (of
    1024) make the logits the step's largest buffers, as in a real language model."""
    from configs import lm

    assert "experiments.main" in lm.__doc__ and ":smoke" in lm.__doc__
    for label, spec in lm.LOSSES.items():
        assert spec["name"] in lossjax.LOSSES
        schema.validate_config(lm.get_config(f"loss={label}"))
    first, temp = {}, {}
    for label in ("linear_cross_entropy", "cross_entropy"):
        workdir = tmp_path / label
        block = {"loss.kwargs": {"block_size": 128}} if label != "cross_entropy" else {}
        summary = train.train_and_evaluate(
            smoke_config("lm", f"loss={label},smoke", log_every_steps=1,
                         batch_size=64, **block),
            str(workdir))
        losses = read_metrics(workdir)
        assert summary["step"] == 20 and len(losses) == 20
        assert losses[0][0] == 1 and np.all(np.isfinite([v for _, v in losses]))
        first[label] = losses[0][1]
        temp[label] = summary["memory/xla_temp_mib"]
        assert summary["memory/peak_rss_mib"] > 100, summary
        if label == "linear_cross_entropy":
            values = [v for _, v in losses]
            assert np.mean(values[-3:]) < values[0] - 0.5, values
            ds = data_lib.load("stdlib_lm", **lm.get_config("smoke").data.kwargs)
            assert ds.x_train.dtype == np.int32 and ds.x_train.ndim == 2
            # The initial loss is about log(vocab) (near-zero initial logits).
            assert abs(values[0] - math.log(ds.num_classes)) < 0.1
            assert 0.0 < summary["test/accuracy"] < 1.0
            np.testing.assert_allclose(summary["test/perplexity"],
                                       math.exp(summary["test/loss"]), rtol=1e-5)
    np.testing.assert_allclose(first["linear_cross_entropy"], first["cross_entropy"],
                               rtol=1e-4)
    # The materialized step holds [tokens, 1024] logits and their gradient; the fused
    # one only [tokens, 128] blocks (measured: 1.5 vs 3.3 MiB per device).
    assert 0 < temp["linear_cross_entropy"] < 0.6 * temp["cross_entropy"], temp


def test_lm_eval_fused_and_materialized_paths_agree(tmp_path):
    """Same parameters -> the same test loss, perplexity and token accuracy whether
    evaluation builds the logits (`cross_entropy`) or not (fused loss + blockwise
    arg-max), and the test loss is plain cross-entropy whatever the training loss."""
    from experiments import models

    ds = data_lib.load("stdlib_lm", **smoke_config("lm").data.kwargs.to_dict())
    metrics = {}
    # z_loss and label_smoothing evaluate on the fused path, as linear_cross_entropy.
    for label in ("cross_entropy", "z_loss", "label_smoothing"):
        task = tasks.build_task(smoke_config("lm", f"loss={label},smoke"), ds)
        if label == "cross_entropy":
            # Trained-looking parameters: random, with larger head logits than at init.
            params = tasks.init_state(task, 0, ds.x_train[:1])["params"]
            params = jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, params)
            logits = np.asarray(task.model.apply({"params": params}, ds.x_test[:16]),
                                np.float64)
            # Untrained parameters predict no real next token: make every other
            # label the reference arg-max, so the accuracy tests the predictions.
            y = ds.y_test[:16].copy()
            y[:, ::2] = np.argmax(logits, -1)[:, ::2]
        n = 12  # padded to 16: the mask must drop the last 4
        batch = {"x": ds.x_test[:16], "y": y, "mask": np.arange(16) < n}
        metrics[label] = jax.jit(functools.partial(
            steps.eval_step, task=task))(params, batch)
    logits, y = logits[:n], y[:n]
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + \
        logits.max(-1)
    want_loss = np.mean(lse - np.take_along_axis(logits, y[..., None], -1)[..., 0])
    want_acc = np.mean(np.argmax(logits, -1) == y)
    assert 0.45 < want_acc < 0.9
    for label, m in metrics.items():
        np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5, err_msg=label)
        np.testing.assert_allclose(m["perplexity"], np.exp(want_loss), rtol=1e-5)
        assert float(m["accuracy"]) == pytest.approx(want_acc, abs=1e-7), label
    # The blockwise arg-max: a remainder block, and ties go to the lowest id.
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(5, 7, 8)).astype(np.float32)
    kernel = rng.normal(size=(8, 300)).astype(np.float32)
    kernel[:, 40] *= 5  # column 40 wins for hidden[0, 0] below ...
    kernel[:, 250] = kernel[:, 40]  # ... tied with column 250, in another block
    hidden[0, 0] = kernel[:, 40] * 10
    got = jax.jit(functools.partial(models.head_argmax, block_size=64))(hidden, kernel)
    np.testing.assert_array_equal(got, np.argmax(hidden @ kernel, -1))
    assert got[0, 0] == 40
