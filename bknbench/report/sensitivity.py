"""Sensitivity is a result: a tuned sweep's validation accuracy against each tuned value.

From tuning.csv (sweep/tune.py): a trial's score is its final_val_acc, 0% when it is not ok
(as the choice counts it); a point's score is the mean over the tuning seeds. For a key,
the curve of a (spec, micro-batch) is the best score over the other keys' values at each of
its values (the same as the scores themselves when one key is tuned).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .results import tuned_keys

if TYPE_CHECKING:
    from matplotlib.figure import Figure


UNITS = {"lr": "lr (peak, per 128 samples)"}  # axis labels: a key's flag units


def point_scores(tuning: pd.DataFrame) -> pd.DataFrame:
    """A row per (spec, norm_batch, point): score (mean over seeds, not ok = 0), chosen,
    at_edge."""
    keys = tuned_keys(tuning)
    t = tuning.assign(score=tuning["final_val_acc"].where(tuning["status"] == "ok", 0.0)
                      .fillna(0.0))
    return t.groupby(["spec", "norm_batch", *keys], sort=False).agg(
        score=("score", "mean"), chosen=("chosen", "max"), at_edge=("at_edge", "max"),
        seeds=("seed", "size")).reset_index()


def chosen_points(tuning: pd.DataFrame) -> pd.DataFrame:
    """A row per (spec, norm_batch): the chosen value of each key, its score and at_edge."""
    p = point_scores(tuning)
    return p[p["chosen"] == 1].drop(columns="chosen").reset_index(drop=True)


def sensitivity_figures(tuning: pd.DataFrame, colors: dict[str, str]) -> dict[str, "Figure"]:
    """{"sensitivity_<key>": figure} per tuned key: a panel per micro-batch, a line per spec
    (validation accuracy, %), the chosen point of each line circled."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    keys, scores = tuned_keys(tuning), point_scores(tuning)
    batches = sorted(set(scores["norm_batch"]))
    figures = {}
    for key in keys:
        best = scores.groupby(["spec", "norm_batch", key], sort=False).agg(
            score=("score", "max"), chosen=("chosen", "max")).reset_index()
        ncols = min(4, len(batches))
        nrows = -(-len(batches) // ncols)
        fig = Figure(figsize=(3.4 * ncols + 1.8, 2.9 * nrows + 0.8), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
        handles = {}
        for ax, b in zip(axes, batches):
            for spec in (s for s in colors if s in set(best["spec"])):
                line = best[(best["spec"] == spec) & (best["norm_batch"] == b)].sort_values(key)
                if line.empty:
                    continue
                (handles[spec],) = ax.plot(line[key], line["score"], marker=".",
                                           color=colors[spec], label=spec)
                pick = line[line["chosen"] == 1]
                ax.plot(pick[key], pick["score"], marker="o", markersize=11, fillstyle="none",
                        color=colors[spec], linestyle="none")
            values = sorted(set(best[key]))
            if values[0] > 0 and values[-1] / values[0] >= 4:
                ax.set_xscale("log")
            ax.set_xticks(values, labels=[f"{v:g}" for v in values])  # the grid itself
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_title(f"micro-batch {b}", fontsize="medium")
            ax.set_xlabel(UNITS.get(key, key))
            ax.grid(alpha=0.3, which="both")
        for ax in axes[len(batches):]:
            ax.set_visible(False)
        for ax in axes[::ncols]:
            ax.set_ylabel("validation accuracy (%)")
        order = list(handles)
        fig.legend([handles[s] for s in order], order, title="spec", loc="outside right upper")
        seeds = "/".join(map(str, sorted(set(scores["seeds"]))))
        fig.suptitle(f"Sensitivity to {key}: validation accuracy after training, mean over "
                     f"{seeds} tuning seed(s)\n(a failed trial counts 0%); circled: the "
                     "chosen point", fontsize="medium")
        figures[f"sensitivity_{key}"] = fig
    return figures
