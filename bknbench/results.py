"""Load a sweep's CSVs, select runs, and summarize accuracy over seeds with 95% CIs.

For one cell (dataset, model, spec, norm_batch) with n ok seeds x_i = final_val_acc (%):
    mean = (1/n) sum_i x_i
    std  = sqrt(sum_i (x_i - mean)^2 / (n - 1))               sample std, NaN for n < 2
    CI   = mean -+ t(0.975, n - 1) * std / sqrt(n)             Student t, NaN for n < 2
Against the reference cell r (Welch, unequal variances), in percentage points:
    ref_diff    = mean - mean_r
    se^2        = std^2 / n + std_r^2 / n_r
    dof         = se^4 / ((std^2/n)^2 / (n-1) + (std_r^2/n_r)^2 / (n_r-1))
    ref_diff_ci = t(0.975, dof) * se                            NaN when n < 2 or n_r < 2
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from .config import ConfigError
from .schema import METRIC_COLUMNS, STATUSES

if TYPE_CHECKING:
    from rich.table import Table

# Columns the analysis reads; a file without them is not a bknbench file (or is cut short).
RUN_REQUIRED = ("run_id", "spec", "dataset", "model", "norm_batch", "sgd_batch", "seed",
                "epochs", "status", "reason", "final_val_acc", "best_val_acc")
METRIC_REQUIRED = ("run_id", "epoch", "val_acc")
_RUN_INTS = ("norm_batch", "sgd_batch", "seed", "epochs")
_RUN_FLOATS = ("final_val_acc", "best_val_acc", "final_train_loss", "train_time_s",
               "samples_per_s", "peak_mem_mb", "lr")
_METRIC_INTS = ("epoch", "samples_seen")
_METRIC_FLOATS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "wall_s")
SUMMARY_FORMATS = ("csv", "json", "markdown")


@dataclass(frozen=True)
class Results:
    """One results folder: runs.csv (a row per run) and metrics.csv (a row per run and epoch)."""

    runs: pd.DataFrame
    metrics: pd.DataFrame  # empty (with METRIC_COLUMNS) when metrics.csv is absent
    path: Path


def load_results(path: str | Path) -> Results:
    """Read `path`/runs.csv and, if present, `path`/metrics.csv, with typed columns.

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
    except OSError as e:  # e.g. a folder we may not list
        raise ConfigError(f"cannot read {folder}: {e.strerror or e}") from None
    runs = _read_table(runs_csv, RUN_REQUIRED, _RUN_INTS, _RUN_FLOATS, allow_empty=False)
    unknown = sorted(set(runs["status"]) - set(STATUSES))
    if unknown:
        raise ConfigError(f"{runs_csv}: unknown status {', '.join(map(repr, unknown))}; "
                          f"expected one of {', '.join(STATUSES)}")
    ok_without_acc = runs.index[(runs["status"] == "ok") & runs["final_val_acc"].isna()]
    if len(ok_without_acc):
        raise ConfigError(f"{runs_csv}: run {runs.at[ok_without_acc[0], 'run_id']} is ok "
                          "but has no final_val_acc")
    if has_metrics:
        metrics = _read_table(metrics_csv, METRIC_REQUIRED, _METRIC_INTS, _METRIC_FLOATS,
                              allow_empty=True)
    else:  # `compare` needs only runs.csv; plots check for metrics themselves
        metrics = pd.DataFrame(columns=list(METRIC_COLUMNS))
    return Results(runs=runs, metrics=metrics, path=folder)


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
            keep &= runs[col].isin([int(w) for w in wanted] if col == "norm_batch" else wanted)
    chosen = runs[keep].reset_index(drop=True)
    if chosen.empty:
        present = lambda col: ", ".join(str(v) for v in dict.fromkeys(runs[col]))  # noqa: E731
        raise ConfigError(f"the filter selected no runs; specs present: {present('spec')}; "
                          f"batch sizes: {', '.join(map(str, sorted(set(runs['norm_batch']))))}; "
                          f"datasets: {present('dataset')}; models: {present('model')}")
    metrics = results.metrics[results.metrics["run_id"].isin(chosen["run_id"])]
    return Results(runs=chosen, metrics=metrics.reset_index(drop=True), path=results.path)


def _t975(dof: float) -> float:
    from scipy.stats import t  # local: scipy.stats is slow to import and only needed here

    return float(t.ppf(0.975, dof))


def mean_ci(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, std, half-width) of the finite values; half = t(0.975, n-1) * std / sqrt(n).
    std and half are NaN for n < 2; all three for n = 0."""
    x = pd.Series(list(values), dtype="float64").dropna()
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    if n == 1:
        return float(x.iloc[0]), math.nan, math.nan
    std = float(x.std(ddof=1))
    return float(x.mean()), std, _t975(n - 1) * std / math.sqrt(n)


def welch_half_width(std_a: float, n_a: int, std_b: float, n_b: int) -> float:
    """95% half-width of mean_a - mean_b, Welch-Satterthwaite dof (module docstring)."""
    if n_a < 2 or n_b < 2:
        return math.nan
    va, vb = std_a**2 / n_a, std_b**2 / n_b
    if va + vb == 0:  # identical seeds on both sides: the difference has no spread
        return 0.0
    dof = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    return _t975(dof) * math.sqrt(va + vb)


def _status_counts(statuses: pd.Series) -> str:
    return ", ".join(f"{k} {s}" for s, k in statuses.value_counts(sort=False).items())


def _cells(part: pd.DataFrame) -> list[dict]:
    """Statistics per (spec, norm_batch): specs in order of first appearance, batches ascending."""
    cells = []
    for spec in dict.fromkeys(part["spec"]):
        of_spec = part[part["spec"] == spec]
        for nb in sorted(set(of_spec["norm_batch"])):
            cell = of_spec[of_spec["norm_batch"] == nb]
            ok, bad = cell[cell["status"] == "ok"], cell[cell["status"] != "ok"]
            mean, std, half = mean_ci(ok["final_val_acc"])
            cells.append(dict(
                spec=spec, norm_batch=int(nb), sgd_batch=int(cell["sgd_batch"].iloc[0]),
                n=len(ok), mean=mean, std=std, ci_low=mean - half, ci_high=mean + half,
                failed=len(bad), failed_statuses=_status_counts(bad["status"]),
                is_ref=False, ref_diff=math.nan, ref_diff_ci=math.nan,
                best_mean=float(ok["best_val_acc"].mean()) if len(ok) else math.nan))
    return cells


def _reference(cells: list[dict], reference: str | None, where: str) -> dict | None:
    """The reference cell: SPEC@BATCH (SPEC alone: its largest batch); default bn, else the
    first spec in sorted order, at its largest batch with ok runs. None if nothing is ok."""
    if reference is None:
        ok = [c for c in cells if c["n"] > 0]
        if not ok:
            return None
        spec = "bn" if any(c["spec"] == "bn" for c in ok) else sorted(c["spec"] for c in ok)[0]
        return max((c for c in ok if c["spec"] == spec), key=lambda c: c["norm_batch"])
    spec, sep, batch = reference.rpartition("@")
    if not sep:
        spec, batch = reference, ""
    if not spec or (sep and not batch.strip().isdigit()):
        raise ConfigError(f"reference {reference!r}: expected SPEC@BATCH, e.g. bn@128")
    matches = [c for c in cells
               if c["spec"] == spec and (not batch or c["norm_batch"] == int(batch))]
    if not matches:
        present = ", ".join(dict.fromkeys(f"{c['spec']}@{c['norm_batch']}" for c in cells))
        raise ConfigError(f"reference {reference} is not in the results{where}; present: {present}")
    ok = [c for c in matches if c["n"] > 0]
    if not ok:
        raise ConfigError(f"reference {reference} has no successful runs{where}")
    return max(ok, key=lambda c: c["norm_batch"])


def summarize(runs: pd.DataFrame, reference: str | None = None) -> pd.DataFrame:
    """One row per (dataset, model, spec, norm_batch) with the statistics of the module
    docstring; cells where every run failed stay, with n = 0 and NaN mean. dataset and model
    columns appear only when the runs span several; each (dataset, model) has its own reference."""
    groups = list(dict.fromkeys(zip(runs["dataset"], runs["model"])))
    rows = []
    for dataset, model in groups:
        part = runs[(runs["dataset"] == dataset) & (runs["model"] == model)]
        cells = _cells(part)
        ref = _reference(cells, reference, f" for {dataset}/{model}" if len(groups) > 1 else "")
        for c in cells:
            if ref is not None:
                c["is_ref"] = c is ref
                c["ref_diff"] = c["mean"] - ref["mean"]
                if c is not ref:  # a cell against itself has no uncertainty to report
                    c["ref_diff_ci"] = welch_half_width(c["std"], c["n"], ref["std"], ref["n"])
            rows.append({"dataset": dataset, "model": model, **c})
    columns = ["dataset", "model", "spec", "norm_batch", "sgd_batch", "n", "mean", "std",
               "ci_low", "ci_high", "failed", "failed_statuses", "is_ref", "ref_diff",
               "ref_diff_ci", "best_mean"]
    summary = pd.DataFrame(rows, columns=columns)
    return summary if len(groups) > 1 else summary.drop(columns=["dataset", "model"])


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs whose status is not ok, with why (dataset and model added when several)."""
    cols = ["spec", "norm_batch", "seed", "status", "reason"]
    if len(set(zip(runs["dataset"], runs["model"]))) > 1:
        cols = ["dataset", "model"] + cols
    return runs.loc[runs["status"] != "ok", cols].reset_index(drop=True)


def _acc_text(r) -> str:
    if r.n == 0:
        return "all failed"
    if r.n == 1:
        return f"{r.mean:.2f} (CI n/a)"
    return f"{r.mean:.2f} ± {r.ci_high - r.mean:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"


def _delta_text(r) -> str:
    if r.is_ref:
        return "ref"
    if math.isnan(r.ref_diff):
        return "n/a"
    ci = "(CI n/a)" if math.isnan(r.ref_diff_ci) else f"± {r.ref_diff_ci:.2f}"
    return f"{r.ref_diff:+.2f} {ci}"


def _n_text(r) -> str:
    return f"{r.n} (+{r.failed_statuses})" if r.failed else str(r.n)


def format_summary(summary: pd.DataFrame, fmt: str) -> str:
    """The summary as csv, json (records; NaN -> null) or a markdown pipe table."""
    if fmt == "csv":
        return summary.to_csv(index=False)
    if fmt == "json":
        return summary.to_json(orient="records", indent=2)
    if fmt != "markdown":
        raise ConfigError(f"unknown summary format {fmt!r}; choose {', '.join(SUMMARY_FORMATS)}")
    multi = "dataset" in summary.columns
    head = (["dataset", "model"] if multi else []) + [
        "spec", "batch", "n", "acc % (95% CI)", "Δ vs ref"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if h in ("batch", "n") else "---" for h in head) + "|"]
    for r in summary.itertuples(index=False):
        cells = ([r.dataset, r.model] if multi else []) + [
            r.spec, str(r.norm_batch), _n_text(r), _acc_text(r), _delta_text(r)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(summary: pd.DataFrame, title: str) -> "Table":
    """A rich table for the terminal: mean ± half-width, [low, high], Δ vs ref with its CI."""
    from rich.markup import escape
    from rich.table import Table

    multi = "dataset" in summary.columns
    table = Table(title=title, caption="95% Student-t CI over seeds; Δ in percentage points "
                  "with a 95% Welch CI; n = successful seeds")
    for name in (["dataset", "model"] if multi else []) + ["spec"]:
        table.add_column(name)
    for name in ("batch", "n", "acc %", "95% CI", "Δ vs ref", "failed"):
        table.add_column(name, justify="right" if name in ("batch", "n") else "left")
    for r in summary.itertuples(index=False):
        acc = "[red]all failed[/]" if r.n == 0 else f"{r.mean:.2f}" + (
            f" ± {r.ci_high - r.mean:.2f}" if r.n > 1 else "")
        ci = "" if r.n == 0 else "n/a" if r.n == 1 else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
        failed = f"[red]✗ {r.failed_statuses}[/]" if r.failed else ""
        table.add_row(*([r.dataset, r.model] if multi else []), escape(r.spec),
                      str(r.norm_batch), str(r.n), acc, escape(ci), _delta_text(r), failed,
                      style="bold" if r.is_ref else None)
    return table
