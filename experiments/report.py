"""Tables, learning-curve plots and the generated report of a study.

Input: a list of run records, one per (task, loss, seed), as written by
`experiments.study` to `results.json`:

    {"task", "loss", "seed", "metric", "mode", "summary": {...train_and_evaluate...},
     "curve": [[step, test metric], ...], "train_curve": [[step, train loss], ...]}

and per task a description (`tasks`: title, metric, mode, setup lines, command and
an optional caveat).
"""

from __future__ import annotations

import math
import pathlib
import statistics
from collections.abc import Sequence

# Two-sided 5% critical values of Student's t. With 3 seeds per loss the Welch
# degrees of freedom lie between 2 and 4.
_T_CRIT_DF2, _T_CRIT_DF4 = 4.303, 2.776

METRIC_NAMES = {
    "test/accuracy": "test accuracy",
    "test/rmse": "test RMSE",
    "test/mae": "test MAE",
    "test/loss": "test loss",
    "test/perplexity": "test perplexity",
}
# The fused head loss and its materialized counterpart, compared in words where a
# task has both (the language model).
_FUSED, _MATERIALIZED = "linear_cross_entropy", "cross_entropy"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def welch_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch's t statistic of mean(a) - mean(b) (inf when both spreads are 0)."""
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    diff = ma - mb
    if se == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / se


def summarize(records: list[dict]) -> dict[str, list[dict]]:
    """Per task, one row per loss: metric mean/std and costs, best first."""
    by_task: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        by_task.setdefault(r["task"], {}).setdefault(r["loss"], []).append(r)
    out = {}
    for task, losses in by_task.items():
        rows = []
        for loss, runs in losses.items():
            metric, mode = runs[0]["metric"], runs[0]["mode"]
            values = [r["summary"].get(metric) for r in runs]
            row = {"loss": loss, "lossjax": runs[0].get("lossjax", loss),
                   "learning_rate": runs[0].get("learning_rate"),
                   "kwargs": runs[0].get("kwargs", {}), "metric": metric,
                   "mode": mode, "values": values, "seeds": [r["seed"] for r in runs]}
            row["mean"], row["std"] = _mean_std(values)
            extra = sorted({k for r in runs for k in r["summary"]
                            if k.startswith("test/") and k != metric})
            row["extra"] = {k: _mean_std([r["summary"].get(k) for r in runs])
                            for k in extra}
            cost = lambda key, runs=runs: _mean_std([r["summary"][key] for r in runs])
            row["wall_seconds"] = cost("wall_seconds")
            row["first_step_seconds"] = cost("first_step_seconds")
            row["steps_per_sec"] = cost("steps_per_sec")
            # Per-step XLA scratch memory (the same for every seed of a loss).
            row["xla_temp_mib"] = _mean_std(
                [r["summary"].get("memory/xla_temp_mib") for r in runs])
            rows.append(row)
        sign = -1 if rows[0]["mode"] == "max" else 1
        rows.sort(key=lambda r: (math.isnan(r["mean"]), sign * r["mean"]))
        out[task] = rows
    return out


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    metric = rows[0]["metric"]
    extra = list(rows[0]["extra"])
    head = ["rank", "loss", "learning rate", METRIC_NAMES.get(metric, metric)]
    head += [METRIC_NAMES.get(k, k) for k in extra]
    head += ["train time [s]", "first step [s]", "steps/s", "step memory [MiB]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        lr = r.get("learning_rate")
        cells = [str(i), f"`{r['loss']}`", "n/a" if lr is None else f"{lr:g}",
                 _fmt(r["mean"], r["std"])]
        cells += [_fmt(*r["extra"][k]) for k in extra]
        sps = r["steps_per_sec"][0]
        cells += [f"{r['wall_seconds'][0]:.1f}", f"{r['first_step_seconds'][0]:.1f}",
                  f"{sps:.0f}" if sps >= 10 else f"{sps:.2f}",
                  _mib(r.get("xla_temp_mib", (math.nan,))[0])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(sweeps: list[dict], task: str, metric: str) -> str:
    """Loss x learning rate: the validation metric (mean ± std over seeds; the
    chosen rate in bold) and the test metric's mean, from the study's sweep rows."""
    rows = [r for r in sweeps if r["task"] == task]
    rates = sorted({r["learning_rate"] for r in rows})
    val = metric.replace("test/", "val/", 1)
    name = METRIC_NAMES.get(metric, metric).removeprefix("test ")
    lines = ["| loss | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
             "|" + "---|" * (len(rates) + 1)]
    for loss in dict.fromkeys(r["loss"] for r in rows):
        cells = []
        for lr in rates:
            runs = [r for r in rows if r["loss"] == loss and r["learning_rate"] == lr]
            v = _mean_std([r["summary"].get(val, math.nan) for r in runs])
            t = _mean_std([r["summary"].get(metric, math.nan) for r in runs])
            diverged = sum(r["diverged_at"] is not None for r in runs)
            cell = f"{_fmt(*v)} (test {_fmt(t[0], 0.0).split(' ±')[0]})"
            cell += f", {diverged} diverged" if diverged else ""
            cells.append(f"**{cell}**" if runs and runs[0].get("chosen") else cell)
        lines.append(f"| `{loss}` | " + " | ".join(cells) + " |")
    return (f"Validation {name} (test {name} in brackets), mean ± std over seeds; "
            "bold: the rate chosen for the tables.\n\n" + "\n".join(lines))


def _mib(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def memory_comparison(rows: list[dict]) -> str | None:
    """The fused head loss vs cross-entropy on materialized logits, in words, or None
    when the task lacks either (or a backend reported no memory analysis)."""
    by_loss = {r["loss"]: r for r in rows}
    if _FUSED not in by_loss or _MATERIALIZED not in by_loss:
        return None
    fused, full = by_loss[_FUSED], by_loss[_MATERIALIZED]
    mem_f, mem_m = fused["xla_temp_mib"][0], full["xla_temp_mib"][0]
    if math.isnan(mem_f) or math.isnan(mem_m) or mem_f <= 0:
        return None
    sps_f, sps_m = fused["steps_per_sec"][0], full["steps_per_sec"][0]
    diff = abs(fused["mean"] - full["mean"])
    ratio = mem_m / mem_f
    saving = (f"{ratio:.1f}x less" if ratio >= 1.05 else
              "no saving at this size (the vocabulary fits a block or two)")
    return (f"Memory: `{_FUSED}` needs {_mib(mem_f)} MiB of XLA scratch memory per "
            f"training step vs {_mib(mem_m)} MiB for `{_MATERIALIZED}` on "
            f"materialized logits, {saving}, at {sps_f:.2f} vs "
            f"{sps_m:.2f} steps/s ({sps_f / sps_m:.2f}x); their test metrics differ "
            f"by {diff:.4f} (the same function, computed in another order).")


def verdict(rows: list[dict]) -> str:
    """One sentence: who won, by how much, and whether 3 seeds can tell."""
    metric = METRIC_NAMES.get(rows[0]["metric"], rows[0]["metric"])
    best = rows[0]
    if len(rows) < 2:
        return f"`{best['loss']}` ({metric} {_fmt(best['mean'], best['std'])})."
    second = rows[1]
    diff = abs(best["mean"] - second["mean"])
    t = abs(welch_t(best["values"], second["values"]))
    if t >= _T_CRIT_DF2:
        strength = "a clear win"
    elif t >= _T_CRIT_DF4:
        strength = "a likely win"
    else:
        strength = "not separable from it with these seeds"
    if round(diff, 4) == 0:
        # Equal at the reported precision (e.g. a loss and its fused form): no winner.
        out = (f"`{best['loss']}` and `{second['loss']}` tie on {metric} at "
               f"{_fmt(best['mean'], best['std'])} (equal to 4 decimals)")
    else:
        out = (f"`{best['loss']}` wins on {metric} with "
               f"{_fmt(best['mean'], best['std'])}, ahead of `{second['loss']}` by "
               f"{diff:.4f} (Welch t = {t:.2f}: {strength})")
    if len(rows) > 2:
        worst = rows[-1]
        out += (f"; last is `{worst['loss']}` ({_fmt(worst['mean'], worst['std'])}, "
                f"{abs(best['mean'] - worst['mean']):.4f} behind)")
    return out + "."


def plot_task(task: str, title: str, records: list[dict], path: pathlib.Path) -> None:
    """Learning curves: test metric (mean ± std over seeds) and training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in records if r["task"] == task]
    losses = list(dict.fromkeys(r["loss"] for r in runs))
    metric = runs[0]["metric"]
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for i, loss in enumerate(losses):
        color = f"C{i}"
        seeds = [r for r in runs if r["loss"] == loss]
        for ax, key in ((ax_m, "curve"), (ax_l, "train_curve")):
            curves = [np.asarray(r[key], float) for r in seeds if r[key]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = curves[0][:n, 0]
            values = np.stack([c[:n, 1] for c in curves])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, color=color, label=loss)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    positive = all(v > 0 for r in runs for _, v in r["train_curve"])
    fig.suptitle(f"{title}: mean ± std over seeds")
    ax_m.set(xlabel="step", ylabel=METRIC_NAMES.get(metric, metric),
             title=METRIC_NAMES.get(metric, metric))
    # Log scale unless a loss goes to or below 0 (a Gaussian NLL can be negative).
    ax_l.set(xlabel="step", ylabel="training loss (each in its own units)",
             yscale="log" if positive else "linear", title="training loss")
    ax_m.legend(fontsize=8)
    ax_m.grid(alpha=0.3)
    ax_l.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(workdir: pathlib.Path, records: list[dict], tasks: dict[str, dict],
                 environment: dict, skipped: list[str],
                 sweeps: list[dict] | None = None) -> str:
    """Writes report.md (plus one PNG per task) into `workdir`; returns the tables
    and the study's wall time. `sweeps`: one row per (task, loss, seed, rate)."""
    summary = summarize(records)
    sweeps = sweeps or []
    chosen = {(r["task"], r["loss"], r["learning_rate"]) for r in records}
    for r in sweeps:
        r["chosen"] = (r["task"], r["loss"], r["learning_rate"]) in chosen
    seeds = sorted({r["seed"] for r in records})
    lines = [f"# Which loss? A small study on {len(summary)} tasks", ""]
    seed_list = ", ".join(map(str, seeds))
    lines += [f"Each task trains one model with each candidate loss, same optimizer, "
              f"schedule and budget, over {len(seeds)} seeds ({seed_list}) and a "
              "small sweep of peak learning rates; each loss's rate is the one with "
              "the best mean validation metric (a split carved from the training "
              "data, never the test set). The tables give the final test metric at "
              "that rate as mean ± sample std over seeds, the sweep is in the "
              "appendix. Generated by `python -m experiments.study`.", "",
              "## Verdict", ""]
    for task, rows in summary.items():
        lines.append(f"- **{tasks[task]['title']}**: {verdict(rows)}")
    tables = []
    for task, rows in summary.items():
        info = tasks[task]
        png = f"{task}.png"
        plot_task(task, info["title"], records, workdir / png)
        table = markdown_table(rows)
        tables.append(f"{info['title']}\n{table}")
        lines += ["", f"## {info['title']}", "", table, "", f"![{task}]({png})"]
        comparison = memory_comparison(rows)
        if comparison:
            lines += ["", comparison]
            tables[-1] += "\n" + comparison
    lines += ["", "## Appendix", "", "### Learning-rate sweep", ""]
    for task, info in tasks.items():
        rates = {r["learning_rate"] for r in sweeps if r["task"] == task}
        if len(rates) > 1:
            lines += [f"**{info['title']}**", "",
                      sweep_table(sweeps, task, info["metric"]), ""]
        elif rates:
            (rate,) = rates
            lines += [f"**{info['title']}**: one learning rate ({rate:g}), "
                      "no sweep and no validation split (see the caveats).", ""]
    lines += ["### Metrics", ""]
    lines += [
        "- *test accuracy*: fraction of held-out examples whose arg-max output is the "
        "label (for `multiclass_hinge_loss` and `squared_error` the outputs are "
        "scores, not logits; the arg-max is still the prediction).",
        "- *test RMSE* / *test MAE*: root mean squared / mean absolute error of the "
        "point prediction on held-out patients, in the target's original units "
        "(disease progression score). The point prediction is the model's first "
        "output: the mean for `gaussian_nll`, the median for `quantile_loss` at "
        "tau = 0.5.",
        "- *test loss*: the training loss itself on the test set; it is in each "
        "loss's own units and only compares runs of the same loss. Language "
        "modelling is the exception: its test loss is plain next-token cross-entropy "
        "(nats per token) for every training loss (z-loss and label smoothing "
        "change the training objective, not the metric), and *test perplexity* is "
        "its exp per seed; *test accuracy* there is next-token arg-max accuracy.",
        "- *step memory*: XLA's compiled memory analysis of the train step: its "
        "temporary buffers (activations kept for the backward pass, logits and "
        "their gradient, optimizer scratch) per device, without parameters, "
        "optimizer state and batch. It is what a fused loss changes; the process's "
        "peak RSS is in each run's `summary.json` (`memory/peak_rss_mib`) but is "
        "not comparable across the runs of one study process.",
        "- *train time*: a loss's sweep (every seed and rate trained at once as "
        "one vmapped program, `experiments.sweep`) wall time divided by its runs, "
        "including the compile, evaluations on the validation and test splits and "
        "data loading. *first step*: the sweep's first step, which compiles it. "
        "*steps/s*: the sweep's training steps (each advances every run) per "
        "second, without the first step and evaluations. *step memory*: of the "
        "vmapped step, divided by its runs.",
        "- A win is *clear* when Welch's t between the best two losses is at least "
        f"{_T_CRIT_DF2} (two-sided 5% at the smallest Welch degrees of freedom, 2, "
        f"possible with 3 + 3 seeds), *likely* when at least {_T_CRIT_DF4} (df = 4).",
        "", "### Setup", ""]
    for task, info in tasks.items():
        lines.append(f"**{info['title']}** (`{info['command']}`)")
        lines.append("")
        lines += [f"- {line}" for line in info["setup"]]
        rows = summary.get(task, [])
        for r in rows:
            kw = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items())
            lines.append(f"- loss `{r['loss']}`: `lossjax.{r['lossjax']}({kw})`")
        lines.append("")
    lines += ["### Seeds and environment", "",
              f"- Seeds {', '.join(map(str, seeds))}: each seed changes the "
              "initialisation and the batch order (batches are a pure function of "
              "(seed, step)); the train/test split is fixed (seed 0) for every run.",
              *[f"- {k}: {v}" for k, v in environment.items()], ""]
    lines += ["### Caveats", "",
              "- Each loss gets its own peak learning rate, from a sweep of three "
              "(a factor ~3 apart) chosen on a validation split of 20% of the "
              "training data; the models in the tables trained on the other 80%. "
              "The schedule, warmup, budget and other hyper-parameters are shared. "
              "A loss whose best rate is at the edge of its sweep (see the "
              "appendix) might do better still outside it. The speech task's "
              "validation utterances come from training voices, so its validation "
              "error is lower than its test error (test voices are unseen). The "
              "language model keeps one rate (3e-3) for every loss: its runs "
              "compare one function computed two ways plus two of its options.",
              "- Small data sets (hundreds of test examples): one test example is "
              "0.3% of digits' and 0.3% of the text task's accuracy, and 3 seeds give "
              "a rough spread only. Treat differences below two standard deviations "
              "as ties.",
              "- Training budgets are small (minutes on a laptop CPU); rankings can "
              "change with longer training, larger models or augmentation.",
              "- The shared hyper-parameters other than the rate (budget, schedule, "
              "model size) were set earlier by looking at test metrics of the "
              "default loss: absolute numbers may be slightly optimistic and the "
              "default loss (cross-entropy, squared error) slightly favoured.",
              "- `quantile_loss` at tau = 0.5 is half of `absolute_error`, and Adam "
              "is invariant to a constant scale of the loss (up to its epsilon): "
              "when both are in a table their metrics should (and do) coincide, a "
              "sanity check of the harness rather than two independent results."]
    # Scenario-specific caveats (e.g. a budget cut), from the study config.
    lines += [f"- {info['title']}: {info['caveat']}" for info in tasks.values()
              if info.get("caveat")]
    if skipped:
        lines += ["", "### Runs not in the tables", "", *[f"- {s}" for s in skipped]]
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
    wall = environment.get("study wall time")
    return "\n\n".join(tables) + (f"\n\nstudy wall time: {wall}" if wall else "")
