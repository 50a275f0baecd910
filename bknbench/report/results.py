"""Load a sweep's CSVs (checked row by row) and select runs."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..errors import ConfigError
from .schema import (METRIC_COLUMNS, STATS_COLUMNS, STATUSES, TUNING_FILE,
                     TUNING_REQUIRED)

# Columns the analysis reads; a file without them is not a bknbench file (or is cut short).
RUN_REQUIRED = ("run_id", "spec", "dataset", "model", "norm_batch", "sgd_batch", "seed",
                "epochs", "status", "reason", "final_val_acc", "best_val_acc")
# Written before the validation split existed (no final_test_acc): every accuracy, the
# curves' included, is on the test split. Loaded relabelled, with this note once.
LEGACY_NOTE = ("{folder} was written before bknbench had a validation split: its accuracies "
               "(final_val_acc then, final_test_acc now; the curves' val_acc too) are on the "
               "test split")
METRIC_REQUIRED = ("run_id", "epoch", "val_acc")
_RUN_INTS = ("norm_batch", "sgd_batch", "seed", "epochs")
_RUN_FLOATS = ("final_val_acc", "final_test_acc", "final_val_acc_population", "best_val_acc",
               "final_train_loss", "train_time_s", "samples_per_s", "peak_mem_mb", "lr",
               "val_samples", "test_samples")
_METRIC_INTS = ("epoch", "samples_seen")
# step may be empty: rows of runs finished before it was recorded, in a resumed folder
_METRIC_FLOATS = ("step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "wall_s")
_STATS_INTS = ("epoch", "layer")


@dataclass(frozen=True)
class Results:
    """One results folder: runs.csv (a row per run), metrics.csv (a row per run and epoch),
    stats.csv (--diagnose: a row per run, epoch, layer and metric)."""

    runs: pd.DataFrame
    metrics: pd.DataFrame  # empty (with METRIC_COLUMNS) when metrics.csv is absent
    path: Path
    stats: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(STATS_COLUMNS)))
    # settings that differ between runs of one spec and micro-batch (a folder written before
    # one sweep per folder was enforced); each such run's spec names its values, "bn [epochs=2]"
    split: tuple[str, ...] = ()
    tuning: pd.DataFrame | None = None  # tuning.csv of a tuned sweep (tuning.TUNING_COLUMNS)
    notes: tuple[str, ...] = ()  # what a reader must know, said once (e.g. LEGACY_NOTE)
    legacy: bool = False  # written before the validation split: every accuracy on test


def load_results(path: str | Path) -> Results:
    """Read `path`/runs.csv and, if present, `path`/metrics.csv and stats.csv, typed.

    Every defect (missing folder, empty or cut-short file, missing column, a number that does
    not parse) raises ConfigError naming the file and line, never a parser traceback."""
    folder = Path(path)
    try:
        if not folder.exists():
            raise ConfigError(f"results folder {folder} does not exist")
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder: pass the folder holding runs.csv")
        runs_csv, metrics_csv = folder / "runs.csv", folder / "metrics.csv"
        if not runs_csv.is_file():
            raise ConfigError(
                f"no results in {folder}: expected runs.csv written by `bknbench run`")
        has_metrics = metrics_csv.is_file()
        has_stats = (folder / "stats.csv").is_file()
    except OSError as e:  # e.g. a folder we may not list
        raise ConfigError(f"cannot read {folder}: {e.strerror or e}") from None
    runs = _read_table(runs_csv, RUN_REQUIRED, _RUN_INTS, _RUN_FLOATS, allow_empty=False)
    if "final_val_acc_population" not in runs.columns:  # written before --diagnose existed
        runs["final_val_acc_population"] = float("nan")
    notes = ()
    if "final_test_acc" not in runs.columns:
        runs = _relabel_legacy(runs)
        notes = (LEGACY_NOTE.format(folder=folder),)
    unknown = sorted(set(runs["status"]) - set(STATUSES))
    if unknown:
        raise ConfigError(f"{runs_csv}: unknown status {', '.join(map(repr, unknown))}; "
                          f"expected one of {', '.join(STATUSES)}")
    ok_without_acc = runs.index[(runs["status"] == "ok") & runs["final_test_acc"].isna()]
    if len(ok_without_acc):
        raise ConfigError(f"{runs_csv}: run {runs.at[ok_without_acc[0], 'run_id']} is ok "
                          "but has no final_test_acc")
    if has_metrics:
        metrics = _read_table(metrics_csv, METRIC_REQUIRED, _METRIC_INTS, _METRIC_FLOATS,
                              allow_empty=True)
    else:  # `compare` needs only runs.csv; plots check for metrics themselves
        metrics = pd.DataFrame(columns=list(METRIC_COLUMNS))
    stats = (_read_table(folder / "stats.csv", STATS_COLUMNS, _STATS_INTS, ("value",),
                         allow_empty=True) if has_stats
             else pd.DataFrame(columns=list(STATS_COLUMNS)))
    runs, split = split_settings(runs)
    tuning = load_tuning(folder / TUNING_FILE) if (folder / TUNING_FILE).is_file() else None
    return Results(runs=runs, metrics=metrics, path=folder, stats=stats, tuning=tuning,
                   notes=notes, legacy=bool(notes), split=split)


# Configuration fields that may differ between the runs of one cell without making another
# experiment: the seed (what a cell averages over) and choices that cannot change a result.
POOLED = ("seed", "spec", "norm_batch", "eval_batch", "evals_per_epoch", "diagnose",
          "threads", "data_dir")


def split_settings(runs: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Runs of one (dataset, model, spec, micro-batch) whose configurations (runs.csv's
    `config`) differ in anything but POOLED are never averaged together: each run's spec
    gets the differing settings' values, "bn [epochs=2]", so they form their own cells.
    Returns the runs and the names of those settings (none: the runs unchanged)."""
    if "config" not in runs.columns:
        return runs, ()
    configs = []
    for text in runs["config"]:
        try:
            c = json.loads(text)
        except (TypeError, ValueError):
            c = {}
        configs.append({k: json.dumps(v) for k, v in (c if isinstance(c, dict) else {}).items()
                        if k not in POOLED})
    cells: dict[tuple, list[dict]] = {}
    for key, c in zip(zip(runs["dataset"], runs["model"], runs["spec"], runs["norm_batch"]),
                      configs):
        cells.setdefault(key, []).append(c)
    split = tuple(dict.fromkeys(
        k for group in cells.values() for k in dict.fromkeys(k for c in group for k in c)
        if len({c.get(k) for c in group}) > 1))
    if not split:
        return runs, ()
    runs = runs.copy()
    runs["spec"] = [f"{spec} [{', '.join(f'{_short(k)}={_value(c.get(k))}' for k in split)}]"
                    for spec, c in zip(runs["spec"], configs)]
    return runs, split


def _short(name: str) -> str:
    return {"base_lr": "lr"}.get(name, name)


def _value(text: str | None) -> str:
    value = None if text is None else json.loads(text)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def base_spec(spec: str) -> str:
    """A spec without the settings split_settings gave it: "bn [epochs=2]" -> "bn"."""
    return spec.partition(" [")[0]



def _relabel_legacy(runs: pd.DataFrame) -> pd.DataFrame:
    """A runs.csv from before the validation split: its final_val_acc, best_val_acc and
    val_samples were on the test split. They move to final_test_acc and test_samples;
    the validation columns stay empty."""
    runs = runs.copy()
    runs["final_test_acc"] = runs["final_val_acc"]
    runs["test_samples"] = runs["val_samples"] if "val_samples" in runs else float("nan")
    for col in ("final_val_acc", "best_val_acc", "val_samples", "final_val_acc_population"):
        runs[col] = float("nan")
    return runs


def load_tuning(path: Path) -> pd.DataFrame:
    """tuning.csv, typed: a row per trial (schema.TUNING_COLUMNS plus a column per key)."""
    df = _read_table(path, TUNING_REQUIRED, ("norm_batch", "seed", "chosen", "at_edge"),
                     (), allow_empty=True)
    for col in tuned_keys(df):
        df[col] = _numbers(df, col, path)
    df["final_val_acc"] = _numbers(df, "final_val_acc", path)
    return df


def tuned_keys(tuning: pd.DataFrame) -> list[str]:
    """The tuned keys of a tuning.csv: its columns between norm_batch and seed."""
    cols = list(tuning.columns)
    return cols[cols.index("norm_batch") + 1:cols.index("seed")]


def _numbers(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    text = df[col].str.strip()
    num = pd.to_numeric(text, errors="coerce")
    bad = num.isna() & (text != "") & (text.str.lower() != "nan")
    if bad.any():
        raise ConfigError(f"{path}: {col}={df[col][bad].iloc[0]!r} is not a number")
    return num.astype("float64")


def _read_table(path: Path, required, ints, floats, allow_empty: bool) -> pd.DataFrame:
    """Parse with the csv module (the sweep writes with it), checking shape row by row."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, strict=True)  # strict: an unclosed quote is an error
            rows, lines = [], []
            for row in reader:
                if row:  # blank lines carry nothing
                    rows.append(row)
                    lines.append(reader.line_num)
    except csv.Error as e:
        raise ConfigError(f"{path}:{reader.line_num}: malformed CSV ({e}); "
                          "was the file cut short?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not rows:
        raise ConfigError(f"{path} is empty")
    header, body, lines = rows[0], rows[1:], lines[1:]
    missing = [c for c in required if c not in header]
    if missing:
        raise ConfigError(f"{path} lacks column(s) {', '.join(missing)}: "
                          "not a file written by `bknbench run`")
    if not body and not allow_empty:
        raise ConfigError(f"{path} has a header but no runs")
    for row, line in zip(body, lines):
        if len(row) != len(header):
            raise ConfigError(f"{path}:{line}: {len(row)} fields where the header has "
                              f"{len(header)}: truncated or malformed row")
    df = pd.DataFrame(body, columns=header, dtype=str)
    for col in (c for c in ints + floats if c in df.columns):
        text = df[col].str.strip()
        num = pd.to_numeric(text, errors="coerce")
        if col in ints:  # configuration: always written, always whole
            bad = num.isna() | (num % 1 != 0)  # NaN and inf give NaN here, so are bad too
        else:  # measurements: empty (not measured) and "nan" (diverged) are allowed
            bad = num.isna() & (text != "") & (text.str.lower() != "nan")
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise ConfigError(f"{path}:{lines[i]}: {col}={df[col].iloc[i]!r} is not "
                              f"{'an integer' if col in ints else 'a number'}")
        df[col] = num.astype("int64") if col in ints else num.astype("float64")
    return df


def select(results: Results, specs: Iterable[str] | None = None,
           batch_sizes: Iterable[int] | None = None, datasets: Iterable[str] | None = None,
           models: Iterable[str] | None = None) -> Results:
    """Runs matching every given filter (None or empty: no filter), and their metrics."""
    runs = results.runs
    keep = pd.Series(True, index=runs.index)
    filters = (("spec", specs), ("norm_batch", batch_sizes), ("dataset", datasets),
               ("model", models))
    for col, wanted in filters:
        wanted = list(wanted or ())
        if wanted:
            match = runs[col].isin([int(w) for w in wanted] if col == "norm_batch" else wanted)
            if col == "spec":  # a spec given alone also selects its split cells
                match |= runs[col].map(base_spec).isin(wanted)
            keep &= match
    chosen = runs[keep].reset_index(drop=True)
    if chosen.empty:
        present = lambda col: ", ".join(str(v) for v in dict.fromkeys(runs[col]))  # noqa: E731
        raise ConfigError(f"the filter selected no runs; specs present: {present('spec')}; "
                          f"batch sizes: {', '.join(map(str, sorted(set(runs['norm_batch']))))}; "
                          f"datasets: {present('dataset')}; models: {present('model')}")
    metrics = results.metrics[results.metrics["run_id"].isin(chosen["run_id"])]
    stats = results.stats[results.stats["run_id"].isin(chosen["run_id"])]
    tuning = results.tuning
    if tuning is not None:
        tuning = tuning[tuning["spec"].isin(chosen["spec"])
                        & tuning["norm_batch"].isin(chosen["norm_batch"])].reset_index(drop=True)
    return Results(runs=chosen, metrics=metrics.reset_index(drop=True), path=results.path,
                   stats=stats.reset_index(drop=True), split=results.split,
                   tuning=tuning, notes=results.notes,
                   legacy=results.legacy)
