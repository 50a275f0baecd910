"""Summarize accuracy over seeds with 95% intervals that stay inside what is possible.

One cell is (dataset, model, spec, norm_batch); its n ok seeds give a_i = final_test_acc (%)
(or the metric asked for, ACC_METRICS),
measured on N held-out samples (runs.csv `test_samples`, or `val_samples` for a validation
metric; N_UNKNOWN where older files lack it).
An accuracy is a count out of N: it moves in steps of r = 100 / N points, and a spread
below the rounding of one step cannot be measured, so every standard deviation below has
Sheppard's rounding floor, sd >= r / sqrt(12) for an accuracy (r / sqrt(6) for the
difference of two). Without it three seeds that happen to agree would give a zero-width
interval and claim certainty.

Accuracy, "logit-t": a Student-t interval on the empirical-logit scale, mapped back.
    mean    = (1/n) sum_i a_i                                   the arithmetic mean, as printed
    g(a)    = logit((a N / 100 + 1/2) / (N + 1))                finite at 0% and 100%
    y_i     = g(a_i);  ybar their mean
    s_y     = max(sample std of y_i, g'(mean) r / sqrt(12))     the floor, carried by g
    CI      = g^-1(ybar -+ t(0.975, n - 1) s_y / sqrt(n)),      NaN for n < 2
    g^-1(y) = 100 (expit(y) (N + 1) - 1/2) / N, clipped to [0, 100]
The logit stretches the scale near 0% and 100%, so an interval never leaves [0, 100] and
is short on the side of the bound; the +1/2 is the empirical logit's continuity correction.

Difference to the reference cell (Δ, percentage points), paired when it can be:
    "paired": the cell and the reference have the same ok seeds (every spec of a sweep runs
        the same seeds, so the same data order), m = n >= 2:  d_i = a_i - ref_i (same seed),
        Δ = mean d,  s_d = max(sample std of d_i, r / sqrt(6)),
        CI = Δ -+ t(0.975, m - 1) s_d / sqrt(m)
    "welch": otherwise (seeds differ, a seed failed), Δ = mean - mean_ref,
        v = max(s^2, r^2 / 12) / n for each side,  se^2 = v + v_ref,
        dof = se^4 / (v^2 / (n - 1) + v_ref^2 / (n_ref - 1)),
        CI = Δ -+ t(0.975, dof) se;   NaN when n < 2 or n_ref < 2
Both clipped to [-100, 100]. `ref_diff_excludes_0` marks a Δ whose interval excludes 0.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import ConfigError

SUMMARY_FORMATS = ("csv", "json", "markdown")
CI_METHOD = "logit-t"
N_UNKNOWN = 1000  # held-out samples assumed for the half-sample correction when not recorded
COLUMNS = ["dataset", "model", "spec", "norm_batch", "sgd_batch", "lr", "n", "mean", "std",
           "ci_low", "ci_high", "ci_method", "samples", "failed", "failed_statuses",
           "is_ref", "ref_diff", "ref_diff_low", "ref_diff_high", "ref_diff_method",
           "ref_diff_n", "ref_diff_excludes_0", "best_mean"]
# what a summary can be of: the test split (the final comparison), the validation split
ACC_METRICS = ("final_test_acc", "final_val_acc", "final_val_acc_population")
SAMPLES = {"final_test_acc": "test_samples"}  # the column holding N of a metric; else val_samples
SPLIT = {"final_test_acc": "test", "final_val_acc": "validation",
         "final_val_acc_population": "validation"}


def _t975(dof: float) -> float:
    from scipy.stats import t  # local: scipy.stats is slow to import and only needed here

    return float(t.ppf(0.975, dof))


def _n_test(n_test: float | None) -> float:
    return float(n_test) if n_test is not None and n_test > 0 else float(N_UNKNOWN)


def acc_interval(values: Iterable[float], n_test: float | None = None
                 ) -> tuple[float, float, float, float]:
    """(mean, std, low, high) of accuracies in % (module docstring, "logit-t"); std, low and
    high are NaN for n < 2, all four for n = 0. n_test: held-out samples (None: N_UNKNOWN)."""
    a = np.asarray([v for v in values if pd.notna(v)], dtype="float64")
    if len(a) == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(a.mean())
    if len(a) == 1:
        return mean, math.nan, math.nan, math.nan
    big_n = _n_test(n_test)
    p = (np.clip(a, 0.0, 100.0) / 100.0 * big_n + 0.5) / (big_n + 1.0)
    y = np.log(p) - np.log1p(-p)
    p_mean = (min(max(mean, 0.0), 100.0) / 100.0 * big_n + 0.5) / (big_n + 1.0)
    slope = big_n / 100.0 / (big_n + 1.0) / (p_mean * (1.0 - p_mean))  # g'(mean)
    s_y = max(float(y.std(ddof=1)), slope * (100.0 / big_n) / math.sqrt(12.0))
    half = _t975(len(a) - 1) * s_y / math.sqrt(len(a))
    ends = 1.0 / (1.0 + np.exp(-np.array([y.mean() - half, y.mean() + half])))
    low, high = np.clip(100.0 * (ends * (big_n + 1.0) - 0.5) / big_n, 0.0, 100.0)
    return mean, float(a.std(ddof=1)), float(low), float(high)


def diff_interval(cell: pd.Series, ref: pd.Series, n_test: float | None = None
                  ) -> tuple[float, float, float, str, int]:
    """(Δ, low, high, method, n) of mean(cell) - mean(ref); the Series are accuracies (%)
    indexed by seed (module docstring: "paired" when both have the same seeds, else "welch")."""
    a, r = cell.dropna(), ref.dropna()
    if len(a) == 0 or len(r) == 0:
        return math.nan, math.nan, math.nan, "", 0
    diff = float(a.mean() - r.mean())
    var_floor = (100.0 / _n_test(n_test)) ** 2 / 12.0  # one accuracy's rounding variance
    if (len(a) >= 2 and a.index.is_unique and r.index.is_unique
            and sorted(a.index) == sorted(r.index)):
        d = a - r.reindex(a.index)
        s_d = math.sqrt(max(float(d.var(ddof=1)), 2.0 * var_floor))
        half = _t975(len(d) - 1) * s_d / math.sqrt(len(d))
        method, n = "paired", len(d)
    else:
        method, n = "welch", min(len(a), len(r))
        if len(a) < 2 or len(r) < 2:
            return diff, math.nan, math.nan, method, n
        va = max(float(a.var(ddof=1)), var_floor) / len(a)
        vr = max(float(r.var(ddof=1)), var_floor) / len(r)
        dof = (va + vr) ** 2 / (va**2 / (len(a) - 1) + vr**2 / (len(r) - 1))
        half = _t975(dof) * math.sqrt(va + vr)
    return diff, max(-100.0, diff - half), min(100.0, diff + half), method, n


def _status_counts(statuses: pd.Series) -> str:
    return ", ".join(f"{k} {s}" for s, k in statuses.value_counts(sort=False).items())


def _samples(cell: pd.DataFrame, metric: str) -> float:
    column = SAMPLES.get(metric, "val_samples")
    if column not in cell.columns:
        return math.nan
    known = cell[column].dropna()
    return float(known.iloc[0]) if len(known) else math.nan


def _cells(part: pd.DataFrame, metric: str = "final_test_acc") -> list[dict]:
    """Statistics per (spec, norm_batch): specs in order of first appearance, batches ascending.
    `accs` (accuracy by seed) is kept for the difference to the reference, then dropped."""
    cells = []
    for spec in dict.fromkeys(part["spec"]):
        of_spec = part[part["spec"] == spec]
        for nb in sorted(set(of_spec["norm_batch"])):
            cell = of_spec[of_spec["norm_batch"] == nb]
            # runs without the metric (population accuracy of a batch-independent norm) are
            # not applicable, neither ok nor failed
            ok = cell[(cell["status"] == "ok") & cell[metric].notna()]
            bad = cell[cell["status"] != "ok"]
            n_test = _samples(ok, metric)
            mean, std, low, high = acc_interval(ok[metric],
                                                None if math.isnan(n_test) else n_test)
            cells.append(dict(
                spec=spec, norm_batch=int(nb), sgd_batch=int(cell["sgd_batch"].iloc[0]),
                lr=float(cell["lr"].iloc[0]) if "lr" in cell else math.nan,  # peak, scaled
                n=len(ok), mean=mean, std=std, ci_low=low, ci_high=high,
                ci_method=CI_METHOD if len(ok) > 1 else "", samples=n_test,
                failed=len(bad), failed_statuses=_status_counts(bad["status"]),
                is_ref=False, ref_diff=math.nan, ref_diff_low=math.nan,
                ref_diff_high=math.nan, ref_diff_method="", ref_diff_n=0,
                ref_diff_excludes_0=False,
                best_mean=float(ok["best_val_acc"].mean()) if len(ok) else math.nan,
                accs=pd.Series(ok[metric].to_numpy(), index=ok["seed"].to_numpy())))
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
              metric: str = "final_test_acc") -> pd.DataFrame:
    """One row per (dataset, model, spec, norm_batch) with the statistics of the module
    docstring; cells where every run failed stay, with n = 0 and NaN mean. dataset and model
    columns appear only when the runs span several; each (dataset, model) has its own reference."""
    groups = list(dict.fromkeys(zip(runs["dataset"], runs["model"])))
    rows = []
    for dataset, model in groups:
        part = runs[(runs["dataset"] == dataset) & (runs["model"] == model)]
        cells = _cells(part, metric)
        ref = _reference(cells, reference, f" for {dataset}/{model}" if len(groups) > 1 else "")
        ref_accs = None if ref is None else ref["accs"]
        for c in cells:
            accs = c.pop("accs")
            if ref is not None:
                c["is_ref"] = c is ref
                c["ref_diff"] = c["mean"] - ref["mean"]
                if c is not ref:  # a cell against itself has no uncertainty to report
                    _, low, high, method, n = diff_interval(
                        accs, ref_accs, None if math.isnan(c["samples"]) else c["samples"])
                    c.update(ref_diff_low=low, ref_diff_high=high, ref_diff_method=method,
                             ref_diff_n=n, ref_diff_excludes_0=bool(low > 0 or high < 0))
            rows.append({"dataset": dataset, "model": model, **c})
    summary = pd.DataFrame(rows, columns=COLUMNS)
    summary = summary if len(groups) > 1 else summary.drop(columns=["dataset", "model"])
    summary.attrs["metric"] = metric  # method_note names the split
    return summary


def check_metric(metric: str) -> None:
    if metric not in ACC_METRICS:
        raise ConfigError(f"--metric must be {', '.join(ACC_METRICS)}; got {metric!r}")


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


def method_note(summary: pd.DataFrame) -> str:
    """The footer every rendering of the table carries: which intervals these are."""
    unknown = "samples" in summary and bool(
        (summary["n"] > 1).any() and summary.loc[summary["n"] > 1, "samples"].isna().any())
    metric = summary.attrs.get("metric", "final_test_acc")
    split = SPLIT[metric]
    assumed = f" ({split}-set size not recorded: N = {N_UNKNOWN} assumed)" if unknown else ""
    return (f"acc: {metric}, on the {split} split; mean over n successful seeds, 95% CI "
            "Student-t on the logit scale of the "
            f"accuracy, half-sample corrected{assumed}, never outside [0, 100]; Δ vs ref in "
            "points with its 95% CI, paired by seed (P) or Welch (W); * = CI excludes 0; "
            f"spreads floored at one {split} sample's rounding")


def acc_text(r) -> str:
    if r.n == 0:
        return "all failed"
    if r.n == 1:
        return f"{r.mean:.2f} (CI n/a)"
    return f"{r.mean:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"


def delta_text(r) -> str:
    if r.is_ref:
        return "ref"
    if math.isnan(r.ref_diff):
        return "n/a"
    if math.isnan(r.ref_diff_low):
        return f"{r.ref_diff:+.2f} (CI n/a)"
    mark = " *" if r.ref_diff_excludes_0 else ""
    tag = "P" if r.ref_diff_method == "paired" else "W"
    return f"{r.ref_diff:+.2f} [{r.ref_diff_low:+.2f}, {r.ref_diff_high:+.2f}] {tag}{mark}"


def n_text(r) -> str:
    return f"{r.n} (+{r.failed_statuses})" if r.failed else str(r.n)


def data_text(frame: pd.DataFrame, fmt: str) -> str | None:
    """A table as csv or json (records; NaN -> null); None for markdown, which each table
    writes its own way; ConfigError for any other format."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return frame.to_json(orient="records", indent=2)
    if fmt != "markdown":
        raise ConfigError(f"unknown format {fmt!r}; choose {', '.join(SUMMARY_FORMATS)}")
    return None


def format_summary(summary: pd.DataFrame, fmt: str) -> str:
    """The summary as csv, json (records; NaN -> null) or a markdown pipe table with the
    method note below it."""
    text = data_text(summary, fmt)
    if text is not None:
        return text
    multi = "dataset" in summary.columns
    head = (["dataset", "model"] if multi else []) + [
        "spec", "batch", "n", "acc % [95% CI]", "Δ vs ref [95% CI]"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if h in ("batch", "n") else "---" for h in head) + "|"]
    for r in summary.itertuples(index=False):
        cells = ([r.dataset, r.model] if multi else []) + [
            r.spec, str(r.norm_batch), n_text(r), acc_text(r), delta_text(r)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n\n" + method_note(summary) + "\n"
