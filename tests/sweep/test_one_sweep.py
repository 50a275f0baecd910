"""One sweep per folder: a run onto a folder whose sweep differs in anything but its grid
is refused in one line and changes nothing; growing the grid is allowed, recorded in
sweep.json's history, and the report's "Reproduce" commands rebuild every run; a folder
that mixes settings anyway (written before this rule) is split, never pooled."""
from __future__ import annotations

import csv
import json
import shlex

import pandas as pd
from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.report.reproduce import merged_grids, run_command
from bknbench.report.results import load_results, select, split_settings
from bknbench.report.summary import summarize

runner = CliRunner()
BASE = ["run", "--dataset", "synthetic", "--workers", "1", "--quiet"]


def ids(folder) -> list[str]:
    with open(folder / "runs.csv", newline="") as f:
        return sorted(r["run_id"] for r in csv.DictReader(f))


def test_another_sweep_is_refused_and_a_grown_grid_is_rebuilt(tmp_path):
    out = tmp_path / "x"
    first = runner.invoke(app, BASE + ["--norms", "bn", "--batch-sizes", "32", "--epochs", "2",
                                       "--seeds", "0", "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = {p: (out / p).read_bytes() for p in ("runs.csv", "sweep.json", "index.log")}

    # the example: another --epochs, more seeds, into the same folder
    mixed = runner.invoke(app, BASE + ["--norms", "bn", "--batch-sizes", "32", "--epochs", "1",
                                       "--seeds", "0,1", "--out", str(out)])
    assert mixed.exit_code == 2, mixed.output
    [line] = mixed.stderr.strip().splitlines()
    assert "--epochs 2 there, 1 here" in line and f"--resume {out}" in line, line
    assert "--out" in line and "Traceback" not in mixed.output
    assert {p: (out / p).read_bytes() for p in before} == before  # nothing touched

    # growing the grid: more seeds for bn, then another spec at another size
    for args in (["--norms", "bn", "--batch-sizes", "32", "--seeds", "0,1"],
                 ["--norms", "gn", "--batch-sizes", "16", "--seeds", "0"]):
        grown = runner.invoke(app, BASE + args + ["--epochs", "2", "--out", str(out)])
        assert grown.exit_code == 0, grown.output
    saved = json.loads((out / "sweep.json").read_text())
    assert [{k: g[k] for k in ("specs", "batch_sizes", "seeds")} for g in saved["history"]] == [
        {"specs": ["bn"], "batch_sizes": [32], "seeds": [0]},
        {"specs": ["bn"], "batch_sizes": [32], "seeds": [0, 1]},
        {"specs": ["gn"], "batch_sizes": [16], "seeds": [0]}]
    assert len(ids(out)) == 3

    # Reproduce: a command per grid that cannot be merged; run into a fresh folder, the
    # same runs come back
    runs = load_results(out).runs
    commands = run_command(out, runs).replace("\\\n", " ").splitlines()
    assert len(commands) == 2, commands
    again = tmp_path / "again"
    for command in commands:
        args = shlex.split(command)[1:]
        args[args.index("--out") + 1] = str(again)
        result = runner.invoke(app, args + ["--workers", "1", "--quiet"])
        assert result.exit_code == 0, result.output
    assert ids(again) == ids(out)

    # --resume continues every grid of the folder
    resumed = runner.invoke(app, ["run", "--resume", str(out), "--workers", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert "3 runs, 3 already finished, 0 to run" in resumed.stderr


def test_grids_merge_along_one_axis_only():
    g = lambda specs, sizes, seeds: {"specs": specs, "batch_sizes": sizes, "seeds": seeds}  # noqa: E731
    assert merged_grids([g(["bn"], [32], [0]), g(["bn"], [32], [1, 2])]) == [
        g(["bn"], [32], [0, 1, 2])]
    assert merged_grids([g(["bn"], [32], [0]), g(["bn"], [8], [0]), g(["gn"], [8, 32], [0])]) == [
        g(["bn", "gn"], [8, 32], [0])]
    assert merged_grids([g(["bn"], [32], [0]), g(["gn"], [8], [0])]) == [
        g(["bn"], [32], [0]), g(["gn"], [8], [0])]
    assert merged_grids([g(["bn"], [8, 32], [0, 1]), g(["bn"], [8], [1])]) == [
        g(["bn"], [8, 32], [0, 1])]


def test_a_folder_mixing_settings_is_split_not_pooled():
    def row(seed, epochs, acc, lr=0.2):
        cfg = {"spec": "bn", "norm_batch": 32, "seed": seed, "epochs": epochs, "base_lr": lr,
               "eval_batch": 1024 * (seed + 1)}  # eval_batch cannot change a result
        return {"run_id": f"{seed}-{epochs}", "dataset": "d", "model": "m", "spec": "bn",
                "norm_batch": 32, "sgd_batch": 32, "seed": seed, "status": "ok",
                "final_val_acc": acc, "final_test_acc": acc, "best_val_acc": acc,
                "config": json.dumps(cfg)}

    runs = pd.DataFrame([row(0, 2, 80.0), row(1, 2, 82.0), row(0, 1, 60.0), row(1, 1, 62.0)])
    split, keys = split_settings(runs)
    assert keys == ("epochs",)
    assert list(split["spec"]) == ["bn [epochs=2]"] * 2 + ["bn [epochs=1]"] * 2
    summary = summarize(split)
    assert sorted(zip(summary["spec"], summary["n"], summary["mean"])) == [
        ("bn [epochs=1]", 2, 61.0), ("bn [epochs=2]", 2, 81.0)]
    # one setting: nothing to split
    same, keys = split_settings(runs[runs["run_id"].str.endswith("-2")])
    assert keys == () and list(same["spec"]) == ["bn", "bn"]


def test_select_by_spec_finds_its_split_cells(tmp_path):
    from bknbench.report.results import Results

    runs = pd.DataFrame({"spec": ["bn [epochs=1]", "bn [epochs=2]", "gn"], "norm_batch": [2, 2, 2],
                         "dataset": "d", "model": "m", "run_id": ["a", "b", "c"]})
    res = Results(runs=runs, metrics=pd.DataFrame(columns=["run_id"]), path=tmp_path,
                  stats=pd.DataFrame(columns=["run_id"]), split=("epochs",))
    assert list(select(res, specs=["bn"]).runs["run_id"]) == ["a", "b"]
    assert list(select(res, specs=["bn [epochs=2]"]).runs["run_id"]) == ["b"]
