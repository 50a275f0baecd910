"""--log: where else a sweep's runs go, besides the results folder. `open_logs` is the
registry (LOGS); MlflowLog is the one there is.

--log mlflow: every run of a sweep as an MLflow run, the sweep as their parent run.

The driver logs each record as it commits it, so runs trained in worker processes or Ray
tasks are logged the same way, from the one process that writes results; nothing is
logged from inside a run. A run: its resolved configuration as params (RunConfig fields,
and its bknbench run id), one metric per metrics.csv column with the row's samples seen
as the step, its final numbers (runs.csv) as metrics, status FINISHED or FAILED. The
parent: the sweep's settings and grid as params, one per results folder (a resumed or
grown sweep logs its new runs under the same parent). MLflow is imported here only.

Where: $MLFLOW_TRACKING_URI, else MLflow's local file store in OUT/mlruns (no server;
`mlflow ui --backend-store-uri OUT/mlruns` shows it). MLflow 3 keeps that store in
maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is set for it; experiment
$MLFLOW_EXPERIMENT_NAME, else "bknbench".
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..config import GRID_AXES
from ..errors import ConfigError, did_you_mean

INSTALL_HINT = "pip install '.[mlflow]' in a bknbench checkout (or: pip install mlflow-skinny)"
SWEEP_TAG = "bknbench.sweep"  # the parent run's results folder, to find it on resume
RUN_TAG = "bknbench.run_id"
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")  # metrics.csv columns
GRID = (*GRID_AXES, "history")
FINAL = ("final_val_acc", "final_test_acc", "final_val_acc_population", "best_val_acc",
         "final_train_loss", "train_time_s", "samples_per_s", "peak_mem_mb")  # runs.csv columns


def tracking_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(out).resolve() / "mlruns").as_uri()


class MlflowLog:
    """Opened before the sweep (an uninstalled MLflow is a ConfigError then, not mid-sweep);
    `log(record)` after each commit; `close(ok)` ends the parent run."""

    def __init__(self, out: Path, sweep: dict):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(f"--log mlflow needs MLflow, which is not installed: "
                              f"{INSTALL_HINT}") from None
        uri = tracking_uri(out)
        if uri.startswith("file:") and "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "bknbench")
        found = self.client.get_experiment_by_name(name)
        self.experiment = found.experiment_id if found else self.client.create_experiment(name)
        folder = str(Path(out).resolve())
        earlier = self.client.search_runs([self.experiment], max_results=1,
                                          filter_string=f"tags.`{SWEEP_TAG}` = '{folder}'")
        grid = {k: _text(v) for k, v in sweep.items() if k in GRID}  # it may grow: tags
        if earlier:
            self.parent = earlier[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
            self._log(self.parent, params={}, metrics=[], tags=grid)
            return
        self.parent = self.client.create_run(
            self.experiment, run_name=Path(out).name, tags={SWEEP_TAG: folder}).info.run_id
        params = {k: v for k, v in sweep.items() if k not in GRID and k not in ("base", "history")}
        params.update({k: v for k, v in sweep.get("base", {}).items() if k != "spec"})
        self._log(self.parent, params=params, metrics=[], tags=grid)

    def _log(self, run: str, params: dict, metrics: list, tags: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.client.log_batch(
            run, metrics=[Metric(k, float(v), ms, int(step)) for k, v, ms, step in metrics],
            params=[Param(k, _text(v)) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def log(self, record: dict) -> None:
        """One finished run (a record of sweep/run.py) as a child of the sweep's run."""
        row = record["row"]
        config = json.loads(row.get("config") or "{}")
        name = f"{row['spec']}@{row['norm_batch']} seed {row['seed']}"
        run = self.client.create_run(
            self.experiment, run_name=name,
            tags={"mlflow.parentRunId": self.parent, RUN_TAG: row["run_id"],
                  "status": row["status"]}).info.run_id
        ms = int(record.get("finished_at", time.time()) * 1000)
        metrics = [(k, m[k], ms, m.get("samples_seen") or i)
                   for i, m in enumerate(record.get("metrics", ())) for k in CURVES
                   if _number(m.get(k))]
        metrics += [(k, row[k], ms, 0) for k in FINAL if _number(row.get(k))]
        params = {**config, "run_id": row["run_id"], "sgd_batch": row["sgd_batch"],
                  "lr": row["lr"]}  # lr: the peak after the linear scaling rule
        for i in range(0, len(metrics), 1000):  # log_batch takes 1000 metrics at most
            self._log(run, params if i == 0 else {}, metrics[i:i + 1000])
        if not metrics:
            self._log(run, params, [])
        if row["reason"]:
            self.client.set_tag(run, "reason", row["reason"])
        self.client.set_terminated(run, status="FINISHED" if row["status"] == "ok" else "FAILED")

    def close(self, interrupted: bool = False) -> None:
        self.client.set_terminated(self.parent, status="KILLED" if interrupted else "FINISHED")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


LOGS = {"mlflow": (MlflowLog, "mlflow")}  # --log name -> (its class, the module it needs)


def check_logs(names: list[str]) -> None:
    """Every --log name known and its library installed; ConfigError otherwise."""
    import importlib.util

    for name in names:
        if name not in LOGS:
            raise ConfigError(f"--log {name!r}{did_you_mean(name, LOGS)}: known: "
                              f"{', '.join(LOGS)}")
        if importlib.util.find_spec(LOGS[name][1]) is None:
            raise ConfigError(f"--log {name} needs {LOGS[name][1]}, which is not installed: "
                              f"{INSTALL_HINT}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--log names {', '.join(names)}: one repeats")


def open_logs(names, out: Path, sweep: dict) -> list:
    """The loggers of --log, opened on the sweep (sweep.json's fields) in `out`."""
    check_logs(list(names))
    return [LOGS[name][0](out, sweep) for name in names]
