"""plots.py: files written, one colour per spec everywhere, axes that show the batch sizes."""
import csv
import subprocess
import sys

import pytest

from bknbench.errors import ConfigError
from bknbench.report.plots import (_convergence_figure, _error_vs_batch_figure, plot_results,
                                   spec_colors)
from bknbench.report.results import load_results, select
from bknbench.report.schema import METRIC_COLUMNS, RUN_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCHES = (1, 2, 4, 8, 32)
SPECS = ("bn", "gn:groups=8", "bkn:p=0.5")


def _write(path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def results_dir(tmp_path):
    """3 specs x 5 batches x 2 seeds, 3 epochs; bn fails at batch 1 (oom), and gn has a
    single seed at batch 32, so one point has no band."""
    runs, metrics = [], []
    for i, spec in enumerate(SPECS):
        for b in BATCHES:
            for seed in (0, 1):
                if spec == "gn:groups=8" and b == 32 and seed == 1:
                    continue
                run_id = f"{spec}-{b}-{seed}"
                ok = not (spec == "bn" and b == 1)
                acc = 95.0 - 3 * i - (10 if spec == "bn" and b < 8 else 0) + seed
                runs.append({"run_id": run_id, "spec": spec, "norm": spec.split(":")[0],
                             "dataset": "mnist1d", "model": "cnn", "norm_batch": b,
                             "sgd_batch": b, "seed": seed, "epochs": 3,
                             "status": "ok" if ok else "oom",
                             "reason": "" if ok else "CUDA out of memory",
                             "final_val_acc": acc if ok else "",
                             "final_test_acc": acc if ok else "",
                             "best_val_acc": acc + 0.3 if ok else ""})
                if ok:
                    metrics += [{"run_id": run_id, "epoch": e, "step": 125 * e,
                                 "samples_seen": 4000 * e,
                                 "val_acc": acc - 4 * (3 - e), "train_loss": 1 / e}
                                for e in (1, 2, 3)]
    folder = tmp_path / "res"
    folder.mkdir()
    _write(folder / "runs.csv", RUN_COLUMNS, runs)
    _write(folder / "metrics.csv", METRIC_COLUMNS, metrics)
    return folder


def test_png_files_written(results_dir, tmp_path, drawn_colours):
    """Both figures, at the size and resolution asked, with every spec's colour drawn."""
    import matplotlib.image

    from bknbench.report.plots import DPI

    out = tmp_path / "figs" / "nested"  # created on demand
    res = load_results(results_dir)
    paths = plot_results(res, out)
    assert [p.name for p in paths] == ["error_vs_batch.png", "convergence.png"]
    colors = spec_colors(res.runs["spec"])
    sizes = {"error_vs_batch.png": _error_vs_batch_figure(res.runs, colors),
             "convergence.png": _convergence_figure(res.runs, res.metrics, colors)}
    for p in paths:
        assert p.parent == out and p.read_bytes()[:8] == PNG_MAGIC
        height, width = matplotlib.image.imread(p).shape[:2]
        w_in, h_in = sizes[p.name].get_size_inches()
        assert (width, height) == (round(w_in * DPI), round(h_in * DPI))
        assert set(colors.values()) <= drawn_colours(p), p.name


def test_svg_and_several_formats(results_dir, tmp_path):
    paths = plot_results(load_results(results_dir), tmp_path, formats=("svg", "png"))
    assert sorted(p.name for p in paths) == [
        "convergence.png", "convergence.svg", "error_vs_batch.png", "error_vs_batch.svg"]
    svg = (tmp_path / "error_vs_batch.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_bad_format_output_folder_and_missing_metrics(results_dir, tmp_path):
    res = load_results(results_dir)
    with pytest.raises(ConfigError, match="unknown plot format 'gif'"):
        plot_results(res, tmp_path, formats=("gif",))
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="cannot create output folder"):
        plot_results(res, tmp_path / "taken" / "figs")
    (results_dir / "metrics.csv").unlink()
    with pytest.raises(ConfigError, match="plots need metrics.csv"):
        plot_results(load_results(results_dir), tmp_path / "figs")
    assert not (tmp_path / "figs").exists()  # nothing is written before the checks pass


def test_spec_colors_are_stable_and_distinct():
    specs = ["bn", "gn", "bn", "bkn:p=0.5", "ln"]
    colors = spec_colors(specs)
    assert list(colors) == ["bn", "gn", "bkn:p=0.5", "ln"]  # first appearance
    assert colors == spec_colors(specs) and len(set(colors.values())) == 4
    many = spec_colors(f"s{i}" for i in range(20))
    assert len(set(many.values())) == 20
    # Going past ten specs must not recolour the first ten.
    assert list(many.values())[:10] == list(spec_colors(f"s{i}" for i in range(10)).values())


def test_error_vs_batch_axes(results_dir):
    runs = load_results(results_dir).runs
    colors = spec_colors(runs["spec"])
    ax = _error_vs_batch_figure(runs, colors).axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.get_xticks()) == list(BATCHES)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(b) for b in BATCHES]
    assert ax.xaxis.get_minor_locator().tick_values(1, 32) == []
    assert "test error" in ax.get_ylabel() and "%" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == list(SPECS)
    for spec, line in lines.items():
        assert line.get_color() == colors[spec]
    # bn failed at batch 1: the point is gone; error is 100 - mean accuracy over seeds.
    assert list(lines["bn"].get_xdata()) == [2, 4, 8, 32]
    assert list(lines["bn"].get_ydata()) == pytest.approx([14.5, 14.5, 4.5, 4.5])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(SPECS)


def test_error_axis_is_logarithmic_only_when_errors_span_ten_times(results_dir):
    runs = load_results(results_dir).runs
    colors = spec_colors(runs["spec"])
    # the fixture's mean errors run from 4.5% to 14.5%: a linear axis
    assert _error_vs_batch_figure(runs, colors).axes[0].get_yscale() == "linear"
    collapsed = runs.copy()
    collapsed.loc[collapsed["spec"] == "bkn:p=0.5", "final_test_acc"] = 20.0  # 80% error
    collapsed.loc[collapsed["spec"] == "gn:groups=8", "final_test_acc"] = 99.0  # 1% error
    ax = _error_vs_batch_figure(collapsed, colors).axes[0]
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()


def test_convergence_panels_share_the_colours(results_dir):
    res = load_results(results_dir)
    colors = spec_colors(res.runs["spec"])
    fig = _convergence_figure(res.runs, res.metrics, colors)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"micro-batch {b}" for b in BATCHES]
    assert len(fig.axes) == 8  # 5 panels wrapped four wide; the 3 spare cells hidden
    first = {line.get_label(): line for line in panels[0].get_lines()}
    assert set(first) == {"gn:groups=8", "bkn:p=0.5"}  # bn failed at batch 1
    for spec, line in first.items():
        assert line.get_color() == colors[spec]
    gn = first["gn:groups=8"]  # mean of seeds 0 and 1 (92, 93) minus 4 per epoch left
    assert list(gn.get_xdata()) == [4000, 8000, 12000]  # training samples seen
    assert list(gn.get_ydata()) == pytest.approx([100 - 84.5, 100 - 88.5, 100 - 92.5])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(SPECS)
    # the band runs from the best seed to the worst (errors 7, 8 at the end), not a t-interval
    from matplotlib.colors import to_rgb

    band, = [c for c in panels[0].collections
             if tuple(c.get_facecolor()[0][:3]) == pytest.approx(to_rgb(gn.get_color()))]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(7.0)  # best seed at the end: 100 - 93
    assert ys.max() == pytest.approx(16.0)  # worst seed after epoch 1: 100 - (92 - 8)
    assert panels[-1].get_xlabel() == "training samples seen"
    assert panels[0].get_yscale() == "linear" and panels[0].get_ylim()[0] == 0


def test_convergence_bands_never_leave_what_is_possible(results_dir):
    """Seeds at 0% and 100%: the spread band stays in [0, 100] (a t-band would not)."""
    res = load_results(results_dir)
    metrics = res.metrics.copy()
    metrics["val_acc"] = [100.0 if i % 2 else 0.0 for i in range(len(metrics))]
    fig = _convergence_figure(res.runs, metrics, spec_colors(res.runs["spec"]))
    for ax in fig.axes:
        for band in ax.collections:
            for path in band.get_paths():
                ys = path.vertices[:, 1]
                assert ys.min() >= 0.0 and ys.max() <= 100.0


def test_selection_can_be_plotted(results_dir, tmp_path, drawn_colours):
    res = select(load_results(results_dir), specs=["gn:groups=8"], batch_sizes=[2, 32])
    paths = plot_results(res, tmp_path)
    [mine] = spec_colors(res.runs["spec"]).values()  # the first colour: the selection's one
    others = set(spec_colors(SPECS).values()) - {mine}
    for p in paths:
        drawn = drawn_colours(p)
        assert mine in drawn and not others & drawn, p.name


def test_import_does_not_load_matplotlib():
    code = "import sys, bknbench.report.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_several_datasets_get_a_panel_each(results_dir, tmp_path, drawn_colours):
    runs_csv = results_dir / "runs.csv"
    lines = runs_csv.read_text().splitlines(keepends=True)
    runs_csv.write_text("".join(line.replace(",mnist1d,", ",cifar10,") if "bkn" in line
                                else line for line in lines))
    res = load_results(results_dir)
    colors = spec_colors(res.runs["spec"])
    titles = [ax.get_title() for ax in _error_vs_batch_figure(res.runs, colors).axes]
    assert titles == ["mnist1d / cnn", "cifar10 / cnn"]
    fig = _convergence_figure(res.runs, res.metrics, colors)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()][4:6] == [
        "mnist1d / cnn, micro-batch 32", "cifar10 / cnn, micro-batch 1"]
    for p in plot_results(res, tmp_path / "figs"):
        assert set(colors.values()) <= drawn_colours(p), p.name



def test_error_ticks_read_as_numbers_and_the_title_says_what_is_missing(results_dir):
    """Log axes labelled between decades as plain numbers; the title names the untested
    powers of two a line crosses (16: the fixture runs 8 then 32), a size where a spec has
    no successful run is shaded (bn at 1 failed: not bridged, it is the line's end), and
    bands of 2 seeds are flagged."""
    runs = load_results(results_dir).runs
    colors = spec_colors(runs["spec"])
    collapsed = runs.copy()
    collapsed.loc[collapsed["spec"] == "bkn:p=0.5", "final_test_acc"] = 20.0  # 80% error
    collapsed.loc[collapsed["spec"] == "gn:groups=8", "final_test_acc"] = 99.0  # 1% error
    fig = _error_vs_batch_figure(collapsed, colors)
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert {"1", "2", "3", "5", "10", "20", "30", "50"} <= set(labels), labels
    assert not any("10^" in t or "\\times" in t or "{" in t for t in labels), labels
    title = fig.get_suptitle()
    assert "untested 16" in title and "bands from 2 seeds" in title
    assert "no successful run" not in title  # no spec misses an inner size
    gappy = runs[~((runs["spec"] == "gn:groups=8") & (runs["norm_batch"] == 4))]  # 2 -> 8
    title = _error_vs_batch_figure(gappy, colors).get_suptitle()
    assert "no successful run, bridged" in title
    linear = _error_vs_batch_figure(runs, colors)
    linear.canvas.draw()
    labels = [t.get_text() for t in linear.axes[0].get_yticklabels() if t.get_text()]
    assert all(t.replace(".", "").replace("−", "").isdigit() for t in labels), labels
