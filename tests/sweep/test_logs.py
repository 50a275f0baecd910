"""--log mlflow: MLflow's own client finds every run of the sweep, from worker processes,
with its params and final metrics equal to runs.csv, under one parent run per folder."""
from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from bknbench.cli import app

mlflow = pytest.importorskip("mlflow")
runner = CliRunner()


def test_mlflow_holds_every_run_as_runs_csv_does(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "sweep"
    args = ["run", "--dataset", "synthetic", "--norms", "bn,gn", "--batch-sizes", "4",
            "--seeds", "0,1", "--epochs", "2", "--workers", "2", "--quiet", "--log", "mlflow",
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # grown by a seed: its run joins the same parent
    result = runner.invoke(app, args[:8] + ["0,1,2"] + args[9:])
    assert result.exit_code == 0, result.output
    with open(out / "runs.csv", newline="") as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    with open(out / "metrics.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert len(rows) == 6

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    # mlflow.set_tracking_uri would also set $MLFLOW_TRACKING_URI for the rest of the
    # session (and every child process: the Ray test's logger then wrote to this store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (out / "mlruns").as_uri())
    found = mlflow.search_runs(experiment_names=["bknbench"])
    parents = found[found["tags.bknbench.sweep"].notna()]
    children = found[found["tags.bknbench.run_id"].notna()]
    assert list(parents["tags.bknbench.sweep"]) == [str(out.resolve())]
    assert set(children["tags.mlflow.parentRunId"]) == set(parents["run_id"])
    assert json.loads(parents["tags.seeds"].iloc[0]) == [0, 1, 2]
    assert parents["params.epochs"].iloc[0] == "2" and parents["status"].iloc[0] == "FINISHED"
    assert sorted(children["tags.bknbench.run_id"]) == sorted(rows)
    for row in children.to_dict("records"):
        csv_row = rows[row["tags.bknbench.run_id"]]
        for key in ("spec", "norm_batch", "sgd_batch", "seed", "epochs", "dataset", "lr"):
            assert row[f"params.{key}"] == csv_row[key], key
        for key in ("final_val_acc", "final_test_acc", "best_val_acc", "final_train_loss"):
            assert row[f"metrics.{key}"] == pytest.approx(float(csv_row[key]), abs=1e-9), key
        assert row["status"] == "FINISHED"
        # the curve: every metrics.csv row, stepped by samples seen
        history = mlflow.MlflowClient().get_metric_history(row["run_id"], "val_acc")
        mine = [r for r in curves if r["run_id"] == csv_row["run_id"]]
        assert [(h.step, h.value) for h in history] == [
            (int(r["samples_seen"]), pytest.approx(float(r["val_acc"]))) for r in mine]
