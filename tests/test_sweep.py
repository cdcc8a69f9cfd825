"""Tests of the study's learning-rate sweeps: the validation split they choose on,
the two ways members share the machine, the choice of rate, and resuming a sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import data as data_lib
from experiments import dataset as dataset_lib
from experiments import steps, study, sweep


def _rows(x):
    return {row.tobytes() for row in np.asarray(x)}


def test_validation_split_is_carved_from_train_and_disjoint_from_test():
    ds = data_lib.digits()
    val = dataset_lib.validation_split(ds, 0.2)
    train_rows, test_rows = _rows(ds.x_train), _rows(ds.x_test)
    fit_rows, val_rows = _rows(val.x_train), _rows(val.x_test)
    # Every validation and remaining training example is a training example of the
    # full set; none is a test example; the two parts do not overlap.
    assert val_rows <= train_rows and fit_rows <= train_rows
    assert not val_rows & test_rows and not fit_rows & test_rows
    assert not val_rows & fit_rows
    assert val.num_test == round(0.2 * ds.num_train)
    assert val.num_train + val.num_test == ds.num_train
    # Labels travel with their examples.
    label_of = {row.tobytes(): y for row, y in zip(ds.x_train, ds.y_train, strict=True)}
    assert all(label_of[row.tobytes()] == y
               for row, y in zip(val.x_test, val.y_test, strict=True))
    # The carve is fixed: every seed and rate sees the same split.
    again = dataset_lib.validation_split(ds, 0.2)
    np.testing.assert_array_equal(again.x_test, val.x_test)
    with pytest.raises(ValueError, match="validation fraction"):
        dataset_lib.validation_split(ds, 1.0)


@pytest.mark.parametrize("module", ["digits", "asr"])
def test_looped_members_train_as_the_vmapped_ones(module):
    """The two strategies run the same members: same training losses, same metrics
    (up to summation order), on the validation and the test split."""
    from tests.test_experiments import smoke_config

    config = smoke_config(module, num_train_steps=6, log_every_steps=2,
                          eval_every_steps=3)
    runs = {strategy: sweep.run(config, (0, 1), (1e-3, 1e-2), validation_fraction=0.25,
                                strategy=strategy)
            for strategy in sweep.STRATEGIES}
    for vmapped, looped in zip(runs["vmap"], runs["loop"], strict=True):
        assert (vmapped["seed"], vmapped["learning_rate"]) == (
            looped["seed"], looped["learning_rate"])
        np.testing.assert_allclose(np.array(looped["train_curve"]),
                                   np.array(vmapped["train_curve"]), rtol=2e-4)
        keys = [k for k in vmapped["summary"] if k.startswith(("val/", "test/"))]
        assert any(k.startswith("val/") for k in keys)
        np.testing.assert_allclose([looped["summary"][k] for k in keys],
                                   [vmapped["summary"][k] for k in keys],
                                   rtol=2e-3, atol=2e-3)
        assert looped["summary"]["memory/xla_temp_mib"] > 0
    # Members differ from each other: the seed and the rate reach each one.
    losses = [tuple(v for _, v in r["train_curve"]) for r in runs["loop"]]
    assert len(set(losses)) == 4
    with pytest.raises(ValueError, match="vmap, loop"):
        sweep.run(config, (0,), (1e-3,), strategy="pmap")
    # What a sweep does not do, it refuses rather than ignores.
    for field, value in (("checks", True), ("parallel", "pmap")):
        with pytest.raises(ValueError, match="plain step on one device"):
            sweep.run(smoke_config(module, **{field: value}), (0,), (1e-3,))


def _member(rate, seed, value, diverged_at=None):
    return {"learning_rate": rate, "seed": seed, "diverged_at": diverged_at,
            "summary": {"val/accuracy": value, "test/accuracy": 1.0 - value}}


def test_choose_rate_never_picks_a_rate_with_a_diverged_seed():
    members = [_member(1e-3, 0, 0.80), _member(1e-3, 1, 0.82),
               # The best mean, but one seed diverged (its metric still finite).
               _member(1e-2, 0, 0.95), _member(1e-2, 1, 0.90, diverged_at=40),
               _member(3e-3, 0, 0.85), _member(3e-3, 1, 0.86)]
    assert study.choose_rate(members, "test/accuracy", "max") == 3e-3
    # The test metric never chooses: it prefers 1e-3 here.
    assert study.choose_rate(members, "test/accuracy", "min") == 1e-3
    # Every rate with a diverged seed: the best finite mean of them.
    everywhere = [dict(m, diverged_at=m["diverged_at"] or 7) for m in members]
    assert study.choose_rate(everywhere, "test/accuracy", "max") == 1e-2
    nan = [_member(1e-3, 0, float("nan"), 3), _member(1e-2, 0, 0.1, 5)]
    assert study.choose_rate(nan, "test/accuracy", "max") == 1e-2


def test_a_sweep_is_reused_only_for_the_same_plan(tmp_path):
    from configs import study as study_config

    config = study_config.get_config("smoke,tasks=regression")
    scen = config.scenarios.regression
    label = scen.losses[0]
    where = tmp_path / "regression" / label

    def swept(config):
        scen = config.scenarios.regression
        _, cfg = study.task_config(scen, label, 0, config.smoke)
        return study._sweep(config, scen, cfg, where)

    before = steps.TRACE_COUNT["train_step"]
    first = swept(config)
    assert steps.TRACE_COUNT["train_step"] == before + 1
    assert json.loads((where / "sweep.json").read_text())["members"] == first
    # The same plan: read back, no training.
    assert swept(config) == first
    assert steps.TRACE_COUNT["train_step"] == before + 1
    # Other rates, seeds or task settings: swept again.
    changes = [("learning_rates", (1e-4, 1e-3)), ("seeds", (0, 1, 2))]
    for field, value in changes:
        changed = study_config.get_config("smoke,tasks=regression")
        target = changed if field == "seeds" else changed.scenarios.regression
        target[field] = value
        members = swept(changed)
        got = {"seeds": {m["seed"] for m in members},
               "learning_rates": {m["learning_rate"] for m in members}}[field]
        assert got == set(value)
    changed = study_config.get_config("smoke,tasks=regression")
    changed.scenarios.regression.overrides.num_train_steps = 4
    members = swept(changed)
    assert members[0]["train_curve"][-1][0] == 4
    assert steps.TRACE_COUNT["train_step"] > before + 1
