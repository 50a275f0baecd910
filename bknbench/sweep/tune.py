"""Tuning with an equal budget: every (spec, micro-batch) cell trains every point of the
grid on the tuning seeds; the point with the best mean validation accuracy is chosen.

A trial that is not ok (failed, diverged, out of memory) counts as 0%, the worst accuracy.
Ties go to the smaller learning rate, then to the smaller value of each other key in the
order the keys were given. A chosen value is at the edge when it is the smallest or largest
of a grid of two or more values (the grid may have been too narrow).

The trials are ordinary runs in their own results folder, ``<out>/trials`` (so resume,
retry, workers and Ray treat them as any run); ``<out>/tuning.csv`` holds a row per trial
(report/schema.py TUNING_REQUIRED, a column per tuned key between norm_batch and seed).
"""
from __future__ import annotations

from pathlib import Path

from ..config import SweepConfig
from ..report.schema import TUNING_FILE, TUNING_REQUIRED
from .index import atomic_write, to_csv

TRIALS = "trials"  # the trials' results folder inside the sweep's


def trial_score(row: dict | None) -> float:
    """A trial's validation accuracy, %; 0 (the worst) when it is not ok or has none."""
    if row is None or row["status"] != "ok" or row.get("final_val_acc") is None:
        return 0.0
    return float(row["final_val_acc"])


def choose(sweep: SweepConfig, rows: dict[str, dict]
           ) -> tuple[dict[tuple[str, int], dict[str, float]], list[dict]]:
    """({(spec, norm_batch): chosen point}, tuning.csv's rows) from the trials' runs.csv
    rows by run id (every trial finished)."""
    keys = [k for k, _ in sweep.tune]
    grids = dict(sweep.tune)
    order = sorted(keys, key=lambda k: k != "lr")  # ties: the smaller lr first
    cells: dict[tuple[str, int], list] = {}
    for point, cfg in sweep.trials():
        cells.setdefault((cfg.spec, cfg.norm_batch), []).append((point, cfg))
    chosen, table = {}, []
    for cell, trials in cells.items():
        scores: dict[tuple, list[float]] = {}
        for point, cfg in trials:
            scores.setdefault(tuple(point[k] for k in keys), []).append(
                trial_score(rows.get(cfg.run_id)))
        mean = {p: sum(v) / len(v) for p, v in scores.items()}
        best = min(mean, key=lambda p: (-mean[p], *(p[keys.index(k)] for k in order)))
        point = dict(zip(keys, best))
        edge = any(len(grids[k]) > 1 and point[k] in (min(grids[k]), max(grids[k]))
                   for k in keys)
        chosen[cell] = point
        for trial_point, cfg in trials:
            row = rows.get(cfg.run_id) or {}
            table.append({"spec": cfg.spec, "norm_batch": cfg.norm_batch, **trial_point,
                          "seed": cfg.seed, "final_val_acc": row.get("final_val_acc"),
                          "status": row.get("status"), "run_id": cfg.run_id,
                          "chosen": int(trial_point == point), "at_edge": int(edge)})
    return chosen, table


def write_tuning(out: Path, tables: list[tuple[SweepConfig, list[dict]]]) -> None:
    """tuning.csv, written whole (atomically) once every trial has finished: the rows of
    every tuned grid of the folder (a grown sweep: the grids of its history), each trial
    once, the last grid's row where two grids ran the same trial."""
    keys = tuple(dict.fromkeys(k for sweep, _ in tables for k, _ in sweep.tune))
    rows = {row["run_id"]: row for _, table in tables for row in table}
    columns = TUNING_REQUIRED[:2] + keys + TUNING_REQUIRED[2:]
    atomic_write(Path(out) / TUNING_FILE, to_csv(columns, list(rows.values())))
