"""Tuning with an equal budget (sweep/tune.py): the choice by hand, and a tuned sweep end
to end: trials as runs, tuning.csv, the final runs at the chosen points, resume."""
import csv
import dataclasses

import pytest

from bknbench.config import RunConfig, SweepConfig
from bknbench.grids import parse_tune
from bknbench.sweep.plan import run_sweep, sweep_from_dict, sweep_to_dict
from bknbench.sweep.tune import choose

BASE = RunConfig(spec="", dataset="synthetic", model="mlp", epochs=1, evals_per_epoch=1)


def _sweep(**kw):
    return SweepConfig(**{"specs": ("bn",), "batch_sizes": (8,), "seeds": (0, 1, 2),
                          "base": BASE, **kw})


def _rows(sweep, accs):
    """runs.csv rows of the trials: accs[(lr, seed)] -> final_val_acc, None: diverged."""
    rows = {}
    for point, cfg in sweep.trials():
        acc = accs[(point["lr"], cfg.seed)]
        rows[cfg.run_id] = {"status": "ok" if acc is not None else "diverged",
                            "final_val_acc": acc}
    return rows


def test_choose_by_hand():
    sweep = _sweep(tune=(("lr", (0.05, 0.2, 0.8)),), tune_seeds=(0, 1))
    # means: 0.05 -> 60, 0.2 -> 70, 0.8 -> (100 + 0) / 2 = 50: a diverged trial counts 0%
    accs = {(0.05, 0): 50.0, (0.05, 1): 70.0, (0.2, 0): 69.0, (0.2, 1): 71.0,
            (0.8, 0): 100.0, (0.8, 1): None}
    chosen, table = choose(sweep, _rows(sweep, accs))
    assert chosen == {("bn", 8): {"lr": 0.2}}
    assert len(table) == 6 and [r["chosen"] for r in table] == [0, 0, 1, 1, 0, 0]
    assert all(r["at_edge"] == 0 for r in table)
    # a tie goes to the smaller learning rate, and a chosen end of the grid is flagged
    accs.update({(0.05, 0): 69.0, (0.05, 1): 71.0})
    chosen, table = choose(sweep, _rows(sweep, accs))
    assert chosen[("bn", 8)] == {"lr": 0.05} and all(r["at_edge"] == 1 for r in table)


def test_choose_two_keys_and_the_runs_at_the_chosen_point():
    sweep = _sweep(tune=(("weight_decay", (0.0, 5e-4)), ("lr", (0.1, 0.4))))
    assert sweep.points() == [{"weight_decay": 0.0, "lr": 0.1}, {"weight_decay": 0.0, "lr": 0.4},
                              {"weight_decay": 5e-4, "lr": 0.1}, {"weight_decay": 5e-4, "lr": 0.4}]
    rows = {}
    for point, cfg in sweep.trials():  # one tuning seed (the first of seeds): 4 trials
        assert cfg.seed == 0 and (cfg.base_lr, cfg.weight_decay) == (point["lr"],
                                                                    point["weight_decay"])
        rows[cfg.run_id] = {"status": "ok", "final_val_acc": 50.0}  # all tie: smaller lr,
    chosen, _ = choose(sweep, rows)  # then the smaller weight decay
    assert chosen == {("bn", 8): {"weight_decay": 0.0, "lr": 0.1}}
    finals = sweep.expand(chosen)
    assert [(c.seed, c.base_lr, c.weight_decay) for c in finals] == [(0, 0.1, 0.0),
                                                                    (1, 0.1, 0.0), (2, 0.1, 0.0)]
    assert finals[0].run_id in rows  # the tuning seed's trial is a final run
    assert sweep_from_dict(sweep_to_dict(sweep)) == sweep


def test_parse_tune_forms():
    assert parse_tune(["lr=0.0125:0.8:log4"]) == (("lr", (0.0125, 0.05, 0.2, 0.8)),)
    assert parse_tune(["lr=0.1, 0.2", "momentum=0:0.9:lin4"]) == (
        ("lr", (0.1, 0.2)), ("momentum", (0.0, 0.3, 0.6, 0.9)))


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tuned_sweep_end_to_end(tmp_path):
    """Trials in trials/, tuning.csv, runs.csv at the chosen point with both accuracies,
    the tuning seed's trial copied (not trained again), and a resume that has nothing to do."""
    sweep = _sweep(specs=("gn",), batch_sizes=(32,), seeds=(0, 1),
                   tune=(("lr", (0.05, 0.8)),))
    report = run_sweep(sweep, tmp_path)
    assert len(report.finished) == 3 and not report.failed  # 2 trials + seed 1
    tuning = _read(tmp_path / "tuning.csv")
    assert [r["lr"] for r in tuning] == ["0.05", "0.8"]
    best = max(tuning, key=lambda r: (float(r["final_val_acc"]), -float(r["lr"])))
    assert [r["chosen"] for r in tuning] == ["1" if r is best else "0" for r in tuning]
    runs = _read(tmp_path / "runs.csv")
    assert sorted(r["seed"] for r in runs) == ["0", "1"]
    lr = float(best["lr"]) * 32 / 128  # runs.csv lr: after linear scaling
    assert all(float(r["lr"]) == pytest.approx(lr) for r in runs)
    assert all(r["final_val_acc"] and r["final_test_acc"] for r in runs)
    assert {r["run_id"] for r in runs if r["seed"] == "0"} == {best["run_id"]}
    trials = _read(tmp_path / "trials" / "runs.csv")
    assert {r["run_id"] for r in trials} == {r["run_id"] for r in tuning}
    again = run_sweep(sweep, tmp_path)
    assert again.finished == [] and again.skipped == 4


def test_a_grown_tuned_sweep_keeps_every_grids_trials(tmp_path):
    """A tuned folder grown by another spec: tuning.csv holds the first spec's trials as
    well as the new one's, each trial once, and runs.csv both cells at their chosen rate."""
    first = _sweep(specs=("gn",), batch_sizes=(32,), seeds=(0,), tune=(("lr", (0.05, 0.8)),))
    run_sweep(first, tmp_path)
    grown = dataclasses.replace(first, specs=("bn",))
    report = run_sweep(grown, tmp_path)
    assert len(report.finished) == 2  # bn's two trials; gn's are found done
    tuning = _read(tmp_path / "tuning.csv")
    assert sorted((r["spec"], r["lr"]) for r in tuning) == [
        ("bn", "0.05"), ("bn", "0.8"), ("gn", "0.05"), ("gn", "0.8")]
    assert sorted(r["spec"] for r in tuning if r["chosen"] == "1") == ["bn", "gn"]
    assert sorted(r["spec"] for r in _read(tmp_path / "runs.csv")) == ["bn", "gn"]
