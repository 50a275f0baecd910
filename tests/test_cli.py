"""The commands end to end: a real tiny sweep through the CLI, then compare and plot on it."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bknbench.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = runner.invoke(app, ["run", "--dataset", "synthetic", "--norms",
                                 "bn,bn-accum,gn,bkn,bkn:p=0", "--batch-sizes", "4,64",
                                 "--seeds", "0,1", "--epochs", "3", "--out", str(out),
                                 "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.stdout


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_csvs_and_prints_table(sweep_dir):
    out, stdout = sweep_dir
    runs = read_rows(out / "runs.csv")
    assert len(runs) == 5 * 2 * 2
    assert len({r["run_id"] for r in runs}) == len(runs)
    assert all(r["status"] == "ok" for r in runs)
    # a metric row per evaluation: the default ceil(20 / 3) = 7 per epoch, at most one per
    # step (461 samples: synthetic's 512 less the 10% validation split, / sgd_batch steps),
    # the last at the end of training
    metrics = read_rows(out / "metrics.csv")
    for r in runs:
        steps = 461 // int(r["sgd_batch"])
        mine = [m for m in metrics if m["run_id"] == r["run_id"]]
        assert len(mine) == 3 * min(7, steps)
        assert int(mine[-1]["step"]) == 3 * steps and mine[-1]["epoch"] == "3"
        assert float(mine[-1]["val_acc"]) == float(r["final_val_acc"])
    # the micro-batch / SGD batch relation: only the accumulating spec steps per 128
    for r in runs:
        expect = "128" if r["spec"] == "bn-accum" else r["norm_batch"]
        assert r["sgd_batch"] == expect
        cfg = json.loads(r["config"])
        assert cfg["spec"] == r["spec"] and cfg["norm_batch"] == int(r["norm_batch"])
    # training works: every normalizer learns the synthetic task well above chance (25%)
    assert min(float(r["final_test_acc"]) for r in runs) > 80.0
    assert all(r["val_samples"] == "51" and r["test_samples"] == "256" for r in runs)
    assert "bkn:p=0" in stdout and "95%" in stdout


def test_bkn_with_p0_is_bn(sweep_dir):
    out, _ = sweep_dir
    acc = {(r["spec"], r["norm_batch"], r["seed"]): float(r["final_test_acc"])
           for r in read_rows(out / "runs.csv")}
    for (spec, b, seed), value in acc.items():
        if spec == "bn":
            assert abs(acc[("bkn:p=0", b, seed)] - value) <= 0.2


def table_cells(text: str, bar: str) -> list[list[str]]:
    """The rows of a markdown (bar "|") or terminal (bar "│") table, as stripped cells."""
    return [[c.strip() for c in line.strip().strip(bar).split(bar)]
            for line in text.splitlines() if line.strip().startswith(bar)]


@pytest.mark.parametrize("fmt", ["csv", "json", "markdown", "table"])
def test_compare_formats(sweep_dir, fmt):
    out, _ = sweep_dir
    summary = json.loads(runner.invoke(app, ["compare", str(out), "--format", "json"]).stdout)
    result = runner.invoke(app, ["compare", str(out), "--format", fmt])
    assert result.exit_code == 0, result.output
    text = result.stdout
    if fmt == "json":
        assert {r["spec"] for r in summary} == {"bn", "bn-accum", "gn", "bkn", "bkn:p=0"}
        ref = [r for r in summary if r["spec"] == "bn" and r["norm_batch"] == 64][0]
        assert ref["ref_diff"] == 0 and ref["n"] == 2
        return
    if fmt == "csv":
        rows = list(csv.DictReader(text.splitlines()))
        assert [(r["spec"], int(r["norm_batch"]), float(r["mean"])) for r in rows] == [
            (r["spec"], r["norm_batch"], pytest.approx(r["mean"])) for r in summary]
        return
    # markdown and the terminal table: one row per spec and batch, in the summary's order,
    # with its seed count and its mean accuracy as printed to 2 decimals
    cells = table_cells(text, "|" if fmt == "markdown" else "\u2502")
    if fmt == "markdown":
        header, rule, *cells = cells
        assert header[:3] == ["spec", "batch", "n"] and len(rule) == len(header)
        assert all(set(c) <= set("-:") for c in rule)
    else:  # bn-accum steps every 128 samples: the table shows each row's sgd batch and lr
        assert [c[2] for c in cells] == [str(r["sgd_batch"]) for r in summary]
        assert [float(c[3]) for c in cells] == [pytest.approx(r["lr"]) for r in summary]
        cells = [c[:2] + c[4:] for c in cells]
    assert [c[:3] for c in cells] == [[r["spec"], str(r["norm_batch"]), str(r["n"])]
                                      for r in summary]
    for c, r in zip(cells, summary):
        assert c[3].startswith(f"{r['mean']:.2f}")


def test_compare_reference_and_filter(sweep_dir):
    out, _ = sweep_dir
    result = runner.invoke(app, ["compare", str(out), "--format", "json", "--reference",
                                 "gn@4", "--norms", "gn,bn", "--batch-sizes", "4"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {(r["spec"], r["norm_batch"]) for r in rows} == {("gn", 4), ("bn", 4)}
    assert [r["ref_diff"] for r in rows if r["spec"] == "gn"] == [0]


def test_plot_writes_two_figures(sweep_dir, tmp_path):
    out, _ = sweep_dir
    result = runner.invoke(app, ["plot", str(out), "--out", str(tmp_path / "p"),
                                 "--format", "png,svg"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["convergence.png", "convergence.svg", "error_vs_batch.png",
                     "error_vs_batch.svg"]
    assert (tmp_path / "p" / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_same_out_skips_finished(sweep_dir):
    out, _ = sweep_dir
    before = (out / "runs.csv").read_text()
    result = runner.invoke(app, ["run", "--dataset", "synthetic", "--norms",
                                 "bn,bn-accum,gn,bkn,bkn:p=0", "--batch-sizes", "4,64",
                                 "--seeds", "0,1", "--epochs", "3", "--out", str(out)])
    assert result.exit_code == 0
    assert "20 already finished, 0 to run" in result.stderr
    assert (out / "runs.csv").read_text() == before


def test_run_says_when_the_cpu_kernels_are_missing(tmp_path):
    """Without the C++ kernels a CPU sweep still runs, and says once why it is slower."""
    from bknbench.kernels import native

    args = ["run", "--dataset", "synthetic", "--norms", "bkn", "--batch-sizes", "32",
            "--epochs", "1", "--device", "cpu", "--workers", "1"]
    with native.disabled():
        result = runner.invoke(app, args + ["--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("C++ CPU kernels are not built") == 1
    assert json.loads(read_rows(tmp_path / "a" / "runs.csv")[0]["versions"])["kernels"] == "torch"
    if native.module() is not None:
        result = runner.invoke(app, args + ["--out", str(tmp_path / "b")])
        assert result.exit_code == 0 and "kernels are not built" not in result.stderr
        row = read_rows(tmp_path / "b" / "runs.csv")[0]
        assert json.loads(row["versions"])["kernels"] == "native"


@pytest.mark.parametrize("command", [[], ["run"], ["compare"], ["plot"], ["norms"]])
def test_every_command_has_help(command):
    result = runner.invoke(app, command + ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_norms_lists_registry():
    from bknbench.norms.registry import names

    result = runner.invoke(app, ["norms"])
    assert result.exit_code == 0
    # a line per normalizer (its options indented below it), in the registry's order
    listed = [line.split()[0] for line in result.stdout.splitlines() if not line[:1].isspace()]
    assert listed == names()


def test_python_m_and_fast_help():
    """`python -m bknbench` works, and --help does not import torch or pandas."""
    code = ("import sys, runpy; sys.argv = ['bknbench', '--help']\n"
            "try:\n    runpy.run_module('bknbench', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'pandas', 'matplotlib') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "Usage" in res.stdout
    assert "heavy: []" in res.stdout
