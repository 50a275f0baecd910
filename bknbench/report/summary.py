"""Summarize accuracy over seeds with 95% CIs.

For one cell (dataset, model, spec, norm_batch) with n ok seeds x_i = final_val_acc (%), or
the metric asked for (ACC_METRICS):
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

import math
from typing import Iterable

import pandas as pd

from ..errors import ConfigError

SUMMARY_FORMATS = ("csv", "json", "markdown")
ACC_METRICS = ("final_val_acc", "final_val_acc_population")  # what a summary can be of


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


def _cells(part: pd.DataFrame, metric: str = "final_val_acc") -> list[dict]:
    """Statistics per (spec, norm_batch): specs in order of first appearance, batches ascending."""
    cells = []
    for spec in dict.fromkeys(part["spec"]):
        of_spec = part[part["spec"] == spec]
        for nb in sorted(set(of_spec["norm_batch"])):
            cell = of_spec[of_spec["norm_batch"] == nb]
            ok, bad = cell[cell["status"] == "ok"], cell[cell["status"] != "ok"]
            mean, std, half = mean_ci(ok[metric])
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


def summarize(runs: pd.DataFrame, reference: str | None = None,
              metric: str = "final_val_acc") -> pd.DataFrame:
    """One row per (dataset, model, spec, norm_batch) with the statistics of the module
    docstring; cells where every run failed stay, with n = 0 and NaN mean. dataset and model
    columns appear only when the runs span several; each (dataset, model) has its own reference."""
    groups = list(dict.fromkeys(zip(runs["dataset"], runs["model"])))
    rows = []
    for dataset, model in groups:
        part = runs[(runs["dataset"] == dataset) & (runs["model"] == model)]
        cells = _cells(part, metric)
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


def check_metric(metric: str) -> None:
    if metric not in ACC_METRICS:
        raise ConfigError(f"--metric must be {' or '.join(ACC_METRICS)}, got {metric!r}")


def runs_with(runs: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str], int]:
    """(the runs a metric applies to, the specs it applies to in none of their ok runs, the
    number of other ok runs without it). final_val_acc_population is empty for a model
    without batch-dependent layers (gn, ln, none, gkn: not applicable) and for a run made
    without --diagnose; such runs are left out of a summary of it, never counted as 0."""
    check_metric(metric)
    ok = runs["status"] == "ok"
    has = ok & runs[metric].notna()
    specs = [s for s in dict.fromkeys(runs.loc[ok, "spec"]) if not has[runs["spec"] == s].any()]
    inapplicable = runs["spec"].isin(specs)
    keep = ~inapplicable & (has | ~ok)
    return runs[keep].reset_index(drop=True), specs, int((ok & ~has & ~inapplicable).sum())


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs whose status is not ok, with why (dataset and model added when several)."""
    cols = ["spec", "norm_batch", "seed", "status", "reason"]
    if len(set(zip(runs["dataset"], runs["model"]))) > 1:
        cols = ["dataset", "model"] + cols
    return runs.loc[runs["status"] != "ok", cols].reset_index(drop=True)


def acc_text(r) -> str:
    if r.n == 0:
        return "all failed"
    if r.n == 1:
        return f"{r.mean:.2f} (CI n/a)"
    return f"{r.mean:.2f} ± {r.ci_high - r.mean:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"


def delta_text(r) -> str:
    if r.is_ref:
        return "ref"
    if math.isnan(r.ref_diff):
        return "n/a"
    ci = "(CI n/a)" if math.isnan(r.ref_diff_ci) else f"± {r.ref_diff_ci:.2f}"
    return f"{r.ref_diff:+.2f} {ci}"


def n_text(r) -> str:
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
            r.spec, str(r.norm_batch), n_text(r), acc_text(r), delta_text(r)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
