"""The statistics diagnostics figure (stats.csv, `bknbench run --diagnose`).

Per batch-dependent layer a column of panels, per (dataset, model) two rows: the mean error
(m - mu)^2 / var and the log-variance error (log(v / var))^2 (docs/diagnostics.md)
against the micro-batch size, both axes logarithmic. A line per spec: solid,
the statistics training normalizes with ("used"); dashed, the running statistics evaluation
uses. Each point is the mean over seeds of the last epoch's value; only ok runs enter. Specs
are drawn in order with decreasing line width, so that identical lines (bkn:p=0 and bn) both
stay visible.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from ..errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_LAYERS = 6  # columns per row; deeper models show this many layers, evenly spaced
ROWS = (("mean_err", "mean error\n(m - μ)² / σ²"),
        ("logvar_err", "log-variance error\n(log v / σ²)²"))
LINES = (("used", "-", "o", "training (used)"), ("running", "--", "s", "running (eval)"))


def _last_epoch(runs: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """The last epoch's rows of each ok run, with its dataset, model, spec and batch."""
    ok = runs.loc[runs["status"] == "ok", ["run_id", "dataset", "model", "spec", "norm_batch"]]
    s = stats.merge(ok, on="run_id")
    return s[s["epoch"] == s.groupby("run_id")["epoch"].transform("max")]


def _shown_layers(part: pd.DataFrame) -> list[tuple[int, str]]:
    layers = sorted(set(zip(part["layer"], part["layer_name"])))
    if len(layers) <= MAX_LAYERS:
        return layers
    step = (len(layers) - 1) / (MAX_LAYERS - 1)
    return [layers[round(i * step)] for i in range(MAX_LAYERS)]


def stats_error_figure(runs: pd.DataFrame, stats: pd.DataFrame,
                       colors: dict[str, str]) -> "Figure":
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    s = _last_epoch(runs, stats)
    if s.empty:
        raise ConfigError("stats.csv has no rows of successful runs: nothing to plot")
    groups = list(dict.fromkeys(zip(s["dataset"], s["model"])))
    panels = [(key, _shown_layers(s[(s["dataset"] == key[0]) & (s["model"] == key[1])]))
              for key in groups]
    ncols = max(len(layers) for _, layers in panels)
    nrows = len(ROWS) * len(groups)
    fig = Figure(figsize=(3.3 * ncols + 1.8, 2.9 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cut = False
    for g, ((dataset, model), layers) in enumerate(panels):
        part = s[(s["dataset"] == dataset) & (s["model"] == model)]
        cut |= len(layers) < len(set(part["layer"]))
        batches = sorted(set(part["norm_batch"]))
        for r, (kind, ylabel) in enumerate(ROWS):
            row = g * len(ROWS) + r
            for c in range(ncols):
                ax = axes[row][c]
                if c >= len(layers):
                    ax.set_visible(False)
                    continue
                layer, name = layers[c]
                for k, spec in enumerate(colors):
                    width = 1.2 + 2.0 * (len(colors) - 1 - k) / max(1, len(colors) - 1)
                    for pair, style, marker, _ in LINES:
                        pts = part[(part["spec"] == spec) & (part["layer"] == layer)
                                   & (part["metric"] == f"{kind}_{pair}")]
                        line = pts.groupby("norm_batch")["value"].mean()
                        line = line[line > 0]  # a log axis; 0 only for an exact estimate
                        if len(line):
                            ax.plot(line.index, line.to_numpy(), linestyle=style, marker=marker,
                                    markersize=2 + 1.5 * width, color=colors[spec], linewidth=width,
                                    fillstyle="full" if pair == "used" else "none")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(batches, labels=[str(b) for b in batches])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.grid(alpha=0.3, which="both")
                where = f"{dataset}/{model} " if len(groups) > 1 else ""
                ax.set_title(f"{where}layer {layer} (module {name})", fontsize="medium")
                if c == 0:
                    ax.set_ylabel(ylabel)
                if r == len(ROWS) - 1:
                    ax.set_xlabel("micro-batch size")
    specs = [sp for sp in colors if sp in set(s["spec"])]
    handles = [Line2D([], [], color=colors[sp], label=sp) for sp in specs] + [
        Line2D([], [], color="gray", linestyle=style, marker=marker, label=label,
               fillstyle="full" if pair == "used" else "none")
        for pair, style, marker, label in LINES]
    fig.legend(handles=handles, loc="outside right upper", title="spec / statistics")
    shown = f"; {MAX_LAYERS} layers shown, evenly spaced" if cut else ""
    fig.suptitle("Error of the normalization statistics against the population's, per layer\n"
                 f"last epoch, mean over seeds{shown}; where lines coincide, a later spec's "
                 "line is drawn thinner on top", fontsize="medium")
    return fig
