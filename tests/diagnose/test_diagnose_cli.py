"""--diagnose through the CLI: stats.csv committed with each run, final_val_acc_population
beside final_val_acc (empty where not applicable), compare --metric and the statistics
figure."""
from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.report.results import load_results, select
from bknbench.report.schema import STATS_COLUMNS

runner = CliRunner()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("diag")
    result = runner.invoke(app, ["run", "--dataset", "synthetic", "--norms", "bn,gn,bkn",
                                 "--batch-sizes", "4,32", "--seeds", "0", "--epochs", "2",
                                 "--diagnose", "--out", str(out), "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_stats_csv_and_population_accuracy(sweep):
    runs = {r["run_id"]: r for r in _rows(sweep / "runs.csv")}
    stats = _rows(sweep / "stats.csv")
    assert list(stats[0]) == list(STATS_COLUMNS)
    for run_id, run in runs.items():
        mine = [s for s in stats if s["run_id"] == run_id]
        record = json.loads((sweep / "runs" / run_id / "record.json").read_text())
        assert len(record["stats"]) == len(mine)  # the index is rebuilt from the records
        assert run["diagnose"] == "True" and json.loads(run["config"])["diagnose"] is True
        if run["spec"] == "gn":
            assert mine == [] and run["final_val_acc_population"] == ""
        else:
            assert {s["layer"] for s in mine} == {"0", "1", "2", "3"}  # cnn: 4 norms
            assert {s["epoch"] for s in mine} == {"1", "2"}
            assert 0 <= float(run["final_val_acc_population"]) <= 100


def test_compare_population_metric_leaves_out_what_it_does_not_apply_to(sweep):
    result = runner.invoke(app, ["compare", str(sweep), "--metric", "final_val_acc_population",
                                 "--format", "csv"])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(result.stdout.splitlines()))
    assert {r["spec"] for r in table} == {"bn", "bkn"}
    runs = {(r["spec"], r["norm_batch"]): float(r["final_val_acc_population"])
            for r in _rows(sweep / "runs.csv") if r["spec"] != "gn"}
    for r in table:  # one seed: the mean is the run's value
        assert float(r["mean"]) == pytest.approx(runs[(r["spec"], r["norm_batch"])])
    assert "not applicable to gn" in result.stderr
    plain = runner.invoke(app, ["compare", str(sweep), "--format", "csv"])
    assert {r["spec"] for r in csv.DictReader(plain.stdout.splitlines())} == {"bn", "gn", "bkn"}


def test_plot_adds_the_statistics_figure(sweep, tmp_path, drawn_colours):
    result = runner.invoke(app, ["plot", str(sweep), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "convergence.png", "error_vs_batch.png", "stats_error.png"]
    # the statistics figure drawn: bn's and bkn's colours, not gn's (it has no statistics),
    # at the figure's size and resolution
    import matplotlib.image

    from bknbench.report.plots import DPI, spec_colors
    from bknbench.report.stats_figure import stats_error_figure

    res = load_results(sweep)
    colors = spec_colors(res.runs["spec"])
    image = matplotlib.image.imread(tmp_path / "stats_error.png")
    w_in, h_in = stats_error_figure(res.runs, res.stats, colors).get_size_inches()
    assert image.shape[:2] == (round(h_in * DPI), round(w_in * DPI))
    drawn = drawn_colours(tmp_path / "stats_error.png")
    assert {colors["bn"], colors["bkn"]} <= drawn and colors["gn"] not in drawn


def test_statistics_figure_lines(sweep):
    """A panel per layer and error kind; in each, a solid (used) and a dashed (running) line
    per diagnosed spec, at the micro-batch sizes, with the mean of the runs' values."""
    from bknbench.report.plots import spec_colors
    from bknbench.report.stats_figure import stats_error_figure

    res = load_results(sweep)
    fig = stats_error_figure(res.runs, res.stats, spec_colors(res.runs["spec"]))
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert len(axes) == 2 * 4
    for ax in axes:
        styles = sorted(line.get_linestyle() for line in ax.lines)
        assert styles == ["-", "-", "--", "--"]  # bn and bkn; gn has no statistics
        assert all(list(line.get_xdata()) == [4, 32] for line in ax.lines)
    s = res.stats
    bn_run = res.runs[(res.runs["spec"] == "bn") & (res.runs["norm_batch"] == 4)]["run_id"].iloc[0]
    want = s[(s["run_id"] == bn_run) & (s["epoch"] == 2) & (s["layer"] == 0)
             & (s["metric"] == "mean_err_used")]["value"].iloc[0]
    first = axes[0].lines[0]  # bn, used, layer 0, mean error
    assert first.get_ydata()[0] == pytest.approx(want)


def test_select_filters_the_statistics(sweep):
    res = select(load_results(sweep), specs=["bkn"], batch_sizes=[4])
    assert set(res.stats["run_id"]) == set(res.runs["run_id"]) and len(res.runs) == 1
    assert res.stats["value"].dtype == "float64" and res.stats["layer"].dtype == "int64"
