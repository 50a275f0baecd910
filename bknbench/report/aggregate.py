"""One verdict over several workloads: mean ranks and the performance profile.

A problem is a (workload, micro-batch) pair, a workload a (dataset, model) pair; a spec's
score on a problem is its mean final_test_acc over ok seeds (all seeds failed: no score).

Mean rank: within each problem the specs are ranked by score, 1 = best, ties sharing the
mean of their ranks, a spec without a score last; per (spec, micro-batch) the mean of its
ranks over the workloads that ran it, and their number.

Performance profile (Dolan and More 2002), over the specs' test errors e = 100 - score,
each floored at one test sample (100 / N_test) so that a perfect score gives a finite ratio:
    r(p, s)    = e(p, s) / min over specs of e(p, s)        (inf: no score on p)
    rho_s(tau) = |{p : r(p, s) <= tau}| / |problems|        for 1 <= tau <= TAU_MAX
    area_s     = (1 / (TAU_MAX - 1)) integral_1^TAU_MAX rho_s(tau) dtau
               = mean over p of max(0, TAU_MAX - r(p, s)) / (TAU_MAX - 1)   in [0, 1]
A curve that rises early and high is a spec near the best on most problems; AlgoPerf
scores the same area (its tau_max is 4 as well).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .summary import N_UNKNOWN, data_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TAU_MAX = 4.0  # the profile's right end and the area's bound
RANK_COLUMNS = ["spec", "norm_batch", "mean_rank", "workloads"]


def scores(runs: pd.DataFrame) -> pd.DataFrame:
    """A row per (dataset, model, norm_batch, spec): score (mean final_test_acc of ok runs,
    NaN when none) and test_samples."""
    runs = runs.assign(ok_acc=runs["final_test_acc"].where(runs["status"] == "ok"))
    if "test_samples" not in runs:
        runs = runs.assign(test_samples=math.nan)
    keys = ["dataset", "model", "norm_batch", "spec"]
    return runs.groupby(keys, sort=False).agg(
        score=("ok_acc", "mean"), test_samples=("test_samples", "max")).reset_index()


def mean_ranks(runs: pd.DataFrame) -> pd.DataFrame:
    """RANK_COLUMNS, best mean rank first (the module docstring)."""
    s = scores(runs)
    s["rank"] = s.groupby(["dataset", "model", "norm_batch"])["score"].rank(
        ascending=False, method="average", na_option="bottom")
    out = s.groupby(["spec", "norm_batch"], sort=False).agg(
        mean_rank=("rank", "mean"), workloads=("rank", "size")).reset_index()
    return out.sort_values(["mean_rank", "norm_batch"], kind="stable").reset_index(drop=True)


def ratios(runs: pd.DataFrame) -> pd.DataFrame:
    """r(p, s): a row per problem (dataset, model, norm_batch), a column per spec."""
    s = scores(runs)
    floor = 100.0 / s["test_samples"].fillna(N_UNKNOWN)
    s["error"] = np.maximum(100.0 - s["score"], floor).fillna(math.inf)
    err = s.pivot(index=["dataset", "model", "norm_batch"], columns="spec",
                  values="error").fillna(math.inf)  # a spec not run on a problem: inf
    return err.div(err.min(axis=1), axis=0)[list(dict.fromkeys(runs["spec"]))]


def profile(runs: pd.DataFrame, taus: np.ndarray) -> pd.DataFrame:
    """rho_s(tau): a row per tau, a column per spec."""
    r = ratios(runs)
    return pd.DataFrame({spec: [(r[spec] <= t).mean() for t in taus] for spec in r.columns},
                        index=taus)


def profile_area(runs: pd.DataFrame, tau_max: float = TAU_MAX) -> pd.Series:
    """area_s per spec (the module docstring), in [0, 1]."""
    r = ratios(runs)
    return (np.maximum(0.0, tau_max - r) / (tau_max - 1.0)).mean().rename("profile_area")


def format_ranks(ranks: pd.DataFrame, fmt: str) -> str:
    """csv, json (records with RANK_COLUMNS) or a markdown table."""
    text = data_text(ranks, fmt)
    if text is not None:
        return text
    lines = ["| spec | batch | mean rank | workloads |", "|---|---:|---:|---:|"]
    lines += [f"| {r.spec} | {r.norm_batch} | {r.mean_rank:.2f} | {r.workloads} |"
              for r in ranks.itertuples(index=False)]
    return "\n".join(lines) + "\n\n" + RANK_NOTE + "\n"


RANK_NOTE = ("mean rank: specs ranked by mean test accuracy within each (workload, "
             "micro-batch), 1 = best, ties share the mean rank; averaged over the workloads")


def profile_figure(runs: pd.DataFrame, colors: dict[str, str]) -> "Figure":
    """rho_s(tau) for 1 <= tau <= TAU_MAX, a step line per spec, its area in the legend."""
    from matplotlib.figure import Figure

    taus = np.linspace(1.0, TAU_MAX, 301)
    rho, area = profile(runs, taus), profile_area(runs)
    n = len(ratios(runs))
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for spec in sorted(rho.columns, key=lambda s: -area[s]):
        ax.step(taus, rho[spec], where="post", color=colors.get(spec),
                label=f"{spec} (area {area[spec]:.2f})")
    ax.set_xlim(1.0, TAU_MAX)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau: test error within a factor tau of the best spec's")
    ax.set_ylabel(f"fraction of the {n} (workload, micro-batch) problems")
    ax.grid(alpha=0.3)
    ax.legend(title=f"spec (area up to tau {TAU_MAX:g})", fontsize="small")
    fig.suptitle("Performance profile over workloads and micro-batches", fontsize="medium")
    return fig
