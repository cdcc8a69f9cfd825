"""How a study sweep's members should share a CPU: one vmapped program, or in turn.

    python -m benchmarks.sweep_members                  # every task, 3 processes each
    python -m benchmarks.sweep_members --only asr digits --processes 5

For each task of the study (`configs/study.py`) and its first loss, trains the sweep's
nine members (3 seeds x 3 learning rates; the language model's 3 seeds at one rate)
for `STEPS` steps with `experiments.sweep.run` both ways:
- `vmap`: every member in one vmapped program (`sweep.Vmapped`);
- `loop`: one compiled single-member step called for each member in turn
  (`sweep.Looped`).

Reports the steps of all members per second (first step, i.e. compilation, and
evaluation excluded), the first step's seconds, and per task the speed-up of `loop`
over `vmap` (median of the per-repetition ratios: the two cases of a task run in
alternating fresh processes). The study runs each task the faster way
(`configs/study.py`, `members`).
"""

from __future__ import annotations

import statistics

from benchmarks import common

TASKS = ("digits", "text", "regression", "asr", "lm")
STRATEGIES = ("vmap", "loop")
CASES = [f"{t}/{s}" for t in TASKS for s in STRATEGIES]
STEPS = 40


def measure(case: str) -> dict:
    from configs import study as study_config
    from experiments import study, sweep

    task, strategy = case.split("/")
    config = study_config.get_config(f"tasks={task}")
    scen = config.scenarios[task]
    _, cfg = study.task_config(scen, scen.losses[0], 0, False)
    with cfg.unlocked():
        cfg.num_train_steps = STEPS
        cfg.log_every_steps = cfg.eval_every_steps = STEPS
        cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, STEPS // 2)
    members = sweep.run(cfg, config.seeds, tuple(scen.learning_rates),
                        cache_dir="runs/study/data", strategy=strategy)
    summary = members[0]["summary"]
    return {"members": len(members), "steps_per_sec": summary["steps_per_sec"],
            "first_step_s": summary["first_step_seconds"]}


if __name__ == "__main__":
    results = common.main("benchmarks.sweep_members", CASES, measure, interleave=True)
    if results:
        by_case = {r["case"]: r for r in results}
        rows = []
        for task in TASKS:
            vmap, loop = by_case.get(f"{task}/vmap"), by_case.get(f"{task}/loop")
            if not vmap or not loop or "error" in vmap or "error" in loop:
                continue
            ratios = [lo["steps_per_sec"] / vm["steps_per_sec"]
                      for vm, lo in zip(vmap["runs"], loop["runs"], strict=False)
                      if "error" not in vm and "error" not in lo]
            rows.append({"task": task, "members": vmap["members"],
                         "vmap steps/s": vmap["steps_per_sec"],
                         "loop steps/s": loop["steps_per_sec"],
                         "loop / vmap": statistics.median(ratios),
                         "vmap first step [s]": vmap["first_step_s"],
                         "loop first step [s]": loop["first_step_s"]})
        print(common.markdown_table(rows, list(rows[0]) if rows else ["task"]))
