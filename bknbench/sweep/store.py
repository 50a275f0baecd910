"""The results folder: each run's record committed atomically, the CSVs rebuilt from them.

Layout of an output folder:
    sweep.json              the sweep that was asked for (for --resume)
    runs/<run_id>/record.json   one finished run: its runs.csv row and metrics rows
    runs/<run_id>/checkpoint.pt the last epoch of an unfinished run
    runs.csv, metrics.csv   the index: every finished record, rebuilt after each finish
    stats.csv               the same for the diagnostics' rows (only when a run has some)

A record is written to a temporary file and renamed, so a kill at any instant leaves
either no record or a whole one; the CSVs are rebuilt the same way, from records only,
so they never hold a partial or a duplicate row. A kill can leave a temporary file
behind or the index one record behind; `prepare` removes the first and rebuilds the second.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..report.schema import METRIC_COLUMNS, RUN_COLUMNS, STATS_COLUMNS


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    def prepare(self) -> None:
        """Create the folder, or fail with one line when it cannot be written; then
        clear what a killed sweep may have left (temporary files, a stale index)."""
        try:
            (self.root / "runs").mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_text("")
            probe.unlink()
            for tmp in [*self.root.glob("*.tmp"), *self.root.glob("runs/*/*.tmp")]:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot write to output folder {self.root}: {e.strerror}") from None
        if any(self.root.glob("runs/*/record.json")):
            self.rebuild_index()

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def checkpoint(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "checkpoint.pt"

    def record_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "record.json"

    def load_record(self, run_id: str) -> dict | None:
        try:
            return json.loads(self.record_path(run_id).read_text())
        except (OSError, ValueError):
            return None

    def records(self) -> list[dict]:
        """Every committed record, in the order runs finished."""
        found = []
        for p in (self.root / "runs").glob("*/record.json"):
            try:
                found.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue  # cannot happen with atomic writes; never let one file stop a sweep
        return sorted(found, key=lambda r: (r.get("finished_at", 0), r["row"]["run_id"]))

    def commit(self, record: dict) -> None:
        """Write one run's record, drop its checkpoint, rebuild the CSV index."""
        run_id = record["row"]["run_id"]
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        atomic_write(self.record_path(run_id), json.dumps(record, indent=1))
        self.checkpoint(run_id).unlink(missing_ok=True)
        self.rebuild_index()

    def rebuild_index(self) -> None:
        records = self.records()
        atomic_write(self.root / "runs.csv",
                     to_csv(RUN_COLUMNS, [r["row"] for r in records]))
        atomic_write(self.root / "metrics.csv", to_csv(
            METRIC_COLUMNS,
            [{"run_id": r["row"]["run_id"], **m} for r in records for m in r["metrics"]]))
        stats = [{"run_id": r["row"]["run_id"], **s} for r in records for s in r.get("stats", [])]
        if stats:
            atomic_write(self.root / "stats.csv", to_csv(STATS_COLUMNS, stats))

    def save_sweep(self, sweep: dict) -> None:
        atomic_write(self.root / "sweep.json", json.dumps(sweep, indent=1))

    def load_sweep(self) -> dict:
        path = self.root / "sweep.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"nothing to resume in {self.root}: no sweep.json "
                              "(written when `bknbench run --out DIR` starts)") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None


def to_csv(columns, rows) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()
