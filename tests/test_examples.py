"""The example plugin (examples/mean_only_bn.py) as its docstring uses it: checked, swept
beside bn and gn in 2 worker processes, resumed and reported. On Ray: tests/sweep/test_ray.py."""
from __future__ import annotations

import csv
from pathlib import Path

from typer.testing import CliRunner

from bknbench.cli import app

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mean_only_bn.py"
SWEEP = ["run", "--plugin", str(EXAMPLE), "--norms", "bn,gn,mean-bn", "--dataset", "waves",
         "--batch-sizes", "8,32", "--epochs", "1", "-q"]


def test_the_example_passes_its_check(plugin_sandbox):
    result = runner.invoke(app, ["check", "mean-bn", "--plugin", str(EXAMPLE),
                                 "--compile-backend", "aot_eager"])
    assert result.exit_code == 0, result.output
    assert "13 of 13 checks passed" in result.stdout


def test_the_example_sweeps_in_two_workers_resumes_and_reports(tmp_path, plugin_sandbox):
    out = tmp_path / "out"
    result = runner.invoke(app, [*SWEEP, "--workers", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert sorted((r["spec"], r["status"]) for r in rows) == sorted(
        (s, "ok") for s in ("bn", "gn", "mean-bn") for _ in range(2))
    assert all(float(r["final_val_acc"]) > 100 / 3 for r in rows)  # above chance, 3 classes
    # every run uses the plugin's dataset: every run records the plugin
    assert len({r["plugins"] for r in rows}) == 1 and f"{EXAMPLE}@sha256:" in rows[0]["plugins"]
    resumed = runner.invoke(app, ["run", "--resume", str(out), "-q"])
    assert resumed.exit_code == 0 and len(list(csv.DictReader(open(out / "runs.csv")))) == 6
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text()
    assert "mean-bn" in page and f"--plugin {EXAMPLE}" in page.replace("\\\n    ", "")
