"""Figures from a results folder: test error vs micro-batch size, convergence on the
validation split, and (tuned sweeps) the sensitivity to each tuned value.

Error is 100 - accuracy, in %, and only runs with status ok enter a line.
- error_vs_batch: the final error, mean over seeds, with the 95% interval of summary.py
  (Student-t on the logit scale: never outside [0, 100]; no band when n = 1).
- convergence: the validation error at each evaluation against the training samples seen,
  mean over seeds, with a band from the best to the worst seed (a plain spread: with 3 seeds
  a 95% interval would fill the panel). Samples seen, not optimizer steps, so that specs
  stepping per micro-batch and specs accumulating to a large batch share one x axis.
A spec has one colour in every figure (spec_colors), so the figures can be read side by
side. When the plotted mean errors of a figure span a factor of 10 or more (a collapse at
micro-batch 1 beside 2% elsewhere), its error axis is logarithmic, so that differences of a
point between good runs stay visible.

matplotlib is imported inside functions: `import bknbench.plots` stays fast. Figures are
built with matplotlib.figure.Figure rather than pyplot, so nothing needs a display, no global
backend is switched under a caller's feet, and figures are freed as soon as they are saved.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from ..errors import ConfigError
from .results import Results
from .summary import summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = ("png", "svg", "pdf")
DPI = 150  # raster resolution; vector formats ignore it


def spec_colors(specs: Iterable[str]) -> dict[str, str]:
    """One hex colour per distinct spec, by order of first appearance: the ten tab10 colours,
    then the ten light tab20 shades (so adding an 11th spec keeps the first ten colours);
    past twenty the palette repeats."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    # tab20's even entries are exactly tab10; its odd entries are the lighter partners.
    palette = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    return {s: to_hex(palette[i % len(palette)]) for i, s in enumerate(dict.fromkeys(specs))}


def _dashes(colors: dict[str, str]) -> dict[str, str]:
    """A line style per spec beside its colour (solid, dashed, dash-dot, dotted, in turn),
    so that lines that coincide (bn and bn-accum at 128) both stay visible."""
    styles = ("-", "--", "-.", ":")
    return {s: styles[i % len(styles)] for i, s in enumerate(colors)}


def _error_scale(axes, errors: list[float]) -> str:
    """Log error axes when the plotted mean errors (%) span a factor of 10 or more and are
    all positive; returns the label suffix. Either way every tick is labelled as a plain
    number (3, 4, 5, not 10^0.5 or 6x10^1), so a value can be read off between decades."""
    errors = [e for e in errors if pd.notna(e)]
    log = bool(errors) and min(errors) > 0 and max(errors) / min(errors) >= 10
    for ax in axes:
        if log:
            ax.set_yscale("log")
        _plain_ticks(ax.yaxis, log)
    return ", log scale" if log else ""


def _plain_ticks(axis, log: bool) -> None:
    """Ticks labelled as plain numbers: on a log axis 1, 2, 3, 5 of each decade (minor
    ticks between them unlabelled), on a linear one matplotlib's, without offset or
    scientific notation."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

    if log:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0), numticks=15))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10)), numticks=15))
        axis.set_minor_formatter(NullFormatter())
    else:
        plain = ScalarFormatter(useOffset=False)
        plain.set_scientific(False)
        axis.set_major_formatter(plain)


def _gaps(tested: list[int], sizes: list[int]) -> list[tuple[int, int]]:
    """Neighbouring sizes of a line with a tested size of the sweep between them, where
    this line has no result: (left, right) pairs."""
    return [(a, b) for a, b in zip(sizes, sizes[1:]) if any(a < t < b for t in tested)]


def _untested(tested: list[int]) -> list[int]:
    """Powers of two between the smallest and largest tested size that were not tested
    (a line crosses them straight)."""
    if not tested:
        return []
    powers, p = [], 1
    while p < max(tested):
        if p > min(tested) and p not in tested:
            powers.append(p)
        p *= 2
    return powers


def _groups(runs: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """(dataset, model) and its runs, in order of first appearance."""
    keys = list(dict.fromkeys(zip(runs["dataset"], runs["model"])))
    return [((d, m), runs[(runs["dataset"] == d) & (runs["model"] == m)]) for d, m in keys]


def _error_vs_batch_figure(runs: pd.DataFrame, colors: dict[str, str]) -> "Figure":
    """Final test error vs norm_batch on a log2 axis, a panel per (dataset, model)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    groups = _groups(runs)
    dashes = _dashes(colors)
    fig = Figure(figsize=(6.4 * len(groups), 4.6), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    errors, few, gapped, untested = [], set(), False, set()
    for ax, ((dataset, model), part) in zip(axes, groups):
        summary = summarize(part)
        batches = sorted(set(part["norm_batch"]))  # failed-only sizes keep their tick
        untested.update(_untested(batches))
        for spec in colors:
            line = summary[(summary["spec"] == spec) & (summary["n"] > 0)]
            if line.empty:
                continue
            x = line["norm_batch"].to_numpy()
            errors += list(100 - line["mean"])
            few.update(int(n) for n in line["n"] if 1 < n < 3)
            ax.plot(x, 100 - line["mean"], marker="o", color=colors[spec], label=spec,
                    linestyle=dashes[spec])
            for a, b in _gaps(batches, list(x)):  # a size tested, but not ok for this spec
                gapped = True
                ax.axvspan(a, b, color=colors[spec], alpha=0.06, linewidth=0)
            # NaN bounds (n = 1) leave a gap in the band rather than a fake zero-width one.
            ax.fill_between(x, 100 - line["ci_high"], 100 - line["ci_low"],
                            color=colors[spec], alpha=0.2, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, labels=[str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("micro-batch size (samples per normalization statistic)")
        ax.set_title(f"{dataset} / {model}")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(title="spec")
    scale = _error_scale(axes, errors)
    for ax in axes:
        ax.set_ylabel(f"test error after training (%{scale})")
    n_failed = int((runs["status"] != "ok").sum())
    excluded = f"; {n_failed} failed run(s) excluded" if n_failed else ""
    notes = []
    if few:
        notes.append(f"bands from {'/'.join(map(str, sorted(few)))} seeds: too few for a "
                     "95% CI to mean much (3 or more)")
    if untested:
        notes.append(f"markers: tested sizes; lines join them straight across the untested "
                     f"{', '.join(map(str, sorted(untested)))}")
    if gapped:
        notes.append("shaded: a size where that spec has no successful run, bridged")
    fig.suptitle("Test error vs micro-batch size\n"
                 f"mean over seeds; band: 95% CI, Student-t on the logit scale{excluded}"
                 + "".join(f"\n{n}" for n in notes), fontsize="medium")
    return fig


def _seed_spread(cell: pd.DataFrame) -> pd.DataFrame:
    """Per evaluation point (samples_seen): mean, best and worst error (%) over seeds."""
    err = cell.assign(err=100.0 - cell["val_acc"]).groupby("samples_seen")["err"]
    return pd.DataFrame({"mean": err.mean(), "low": err.min(), "high": err.max()})


def _convergence_figure(runs: pd.DataFrame, metrics: pd.DataFrame,
                        colors: dict[str, str], split: str = "validation") -> "Figure":
    """Validation error against training samples seen, a panel per micro-batch size (a row
    per (dataset, model) when there are several), a line per spec: the mean over seeds with
    the seeds' spread as a band."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    ok = runs.loc[runs["status"] == "ok", ["run_id", "dataset", "model", "spec", "norm_batch"]]
    m = metrics[["run_id", "samples_seen", "val_acc"]].dropna().merge(ok, on="run_id")
    groups = _groups(m)
    panels = [(key, b, part[part["norm_batch"] == b])
              for key, part in groups for b in sorted(set(part["norm_batch"]))]
    if len(groups) == 1:  # wrap a single row of panels into a grid four wide
        ncols = min(4, len(panels))
        places = [divmod(i, ncols) for i in range(len(panels))]
    else:
        ncols = max(len(set(part["norm_batch"])) for _, part in groups)
        places = [(r, c) for r, (_, part) in enumerate(groups)
                  for c in range(len(set(part["norm_batch"])))]
    nrows = max(r for r, _ in places) + 1
    fig = Figure(figsize=(3.4 * ncols + 1.8, 2.9 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True if len(groups) == 1 else "row")
    handles, errors, highs, n_seeds = {}, [], [], set()
    dashes = _dashes(colors)
    for (r, c), ((dataset, model), b, cell) in zip(places, panels):
        ax = axes[r][c]
        for spec in colors:
            of_spec = cell[cell["spec"] == spec]
            if of_spec.empty:
                continue
            n_seeds.add(of_spec["run_id"].nunique())
            line = _seed_spread(of_spec)
            x = line.index.to_numpy()
            errors += list(line["mean"])
            highs.append(float(line["high"].max()))
            (handles[spec],) = ax.plot(x, line["mean"], color=colors[spec], label=spec,
                                       linewidth=1.4, linestyle=dashes[spec])
            ax.fill_between(x, line["low"], line["high"], color=colors[spec], alpha=0.15,
                            linewidth=0)
        where = f"{dataset} / {model}, " if len(groups) > 1 else ""
        ax.set_title(f"{where}micro-batch {b}", fontsize="medium")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3, which="both")
        if (r + 1, c) not in places:  # lowest panel of its column
            ax.set_xlabel("training samples seen")
    scale = _error_scale([axes[r][c] for r, c in places], errors)
    if not scale:  # linear: from 0 to the worst seed, so no band is cut
        top = max(highs) if highs else 100.0
        for r, c in places:
            axes[r][c].set_ylim(0, min(100.0, 1.05 * top))
    for r in range(nrows):
        axes[r][0].set_ylabel(f"{split} error (%{scale})")
    for r in range(nrows):  # grid cells without a panel
        for c in range(ncols):
            if (r, c) not in places:
                axes[r][c].set_visible(False)
    order = [s for s in colors if s in handles]  # the same order as the other figure
    fig.legend([handles[s] for s in order], order, title="spec", loc="outside right upper")
    seeds = "/".join(map(str, sorted(n_seeds)))
    band = ("band: best to worst seed" if max(n_seeds) > 1
            else "one seed: no band")
    fig.suptitle(f"{split.capitalize()} error during training\nmean over {seeds} seed(s); {band}",
                 fontsize="medium")
    return fig


def _prepare(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"cannot write to output folder {out}")
    return out


def plot_results(results: Results, out_dir: str | Path,
                 formats: Iterable[str] = ("png",)) -> list[Path]:
    """Write error_vs_batch.<fmt>, convergence.<fmt> (when metrics.csv has validation
    accuracies), stats_error.<fmt> (when the results have stats.csv) and sensitivity_<key>.<fmt>
    per tuned key (tuning.csv) into out_dir for each format; return the paths written."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"unknown plot format {', '.join(map(repr, unknown)) or '(none)'}; "
                          f"choose from {', '.join(FORMATS)}")
    runs = results.runs
    if not (runs["status"] == "ok").any():
        raise ConfigError(f"no successful runs in {results.path}: nothing to plot")
    if results.metrics.empty:
        raise ConfigError(f"no per-epoch metrics in {results.path}: plots need metrics.csv "
                          "written by `bknbench run`")
    colors = spec_colors(runs["spec"])  # failed runs too: a colour must not depend on success
    figures = {"error_vs_batch": _error_vs_batch_figure(runs, colors)}
    if results.metrics["val_acc"].notna().any():  # none without a validation split
        split = "test" if results.legacy else "validation"
        figures["convergence"] = _convergence_figure(runs, results.metrics, colors, split)
    if results.tuning is not None and not results.tuning.empty:
        from .sensitivity import sensitivity_figures

        figures.update(sensitivity_figures(results.tuning, colors))
    if not results.stats.empty:  # --diagnose
        from .stats_figure import stats_error_figure

        figures["stats_error"] = stats_error_figure(runs, results.stats, colors)
    out = _prepare(out_dir)
    paths = []
    for name, fig in figures.items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            try:
                fig.savefig(path, format=fmt, dpi=DPI)
            except OSError as e:
                raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
            paths.append(path)
    return paths
