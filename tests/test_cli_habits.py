"""What a user expects of a CLI: --version, list options that may repeat, "did you mean",
a configuration file equal to its flags (same run ids), --name, help in plain words."""
from __future__ import annotations

import csv
import re

import pytest
from typer.testing import CliRunner

from bknbench import __version__
from bknbench.cli import app

runner = CliRunner()
TINY = ["--dataset", "synthetic", "--epochs", "1", "--workers", "1", "--quiet"]


def ids(folder) -> list[str]:
    with open(folder / "runs.csv", newline="") as f:
        return sorted(r["run_id"] for r in csv.DictReader(f))


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"bknbench {__version__}"


def test_a_config_file_makes_the_runs_its_flags_make(tmp_path):
    flags = runner.invoke(app, ["run", "--norms", "bn", "--norms", "gn:groups=2",
                                "--batch-sizes", "4", "--batch-sizes", "16", "--seeds", "0,1",
                                "--lr", "0.1", "--milestones", "1", "--schedule", "step",
                                "--no-augment", *TINY, "--out", str(tmp_path / "flags")])
    assert flags.exit_code == 0, flags.output
    assert len(ids(tmp_path / "flags")) == 8  # both --norms, both --batch-sizes kept
    study = tmp_path / "study.toml"
    study.write_text('norms = ["bn", "gn:groups=2"]\nbatch-sizes = [4, 16]\nseeds = "0,1"\n'
                     'lr = 0.1\nmilestones = [1]\nschedule = "step"\naugment = false\n'
                     'dataset = "synthetic"\nepochs = 3\nworkers = 1\n')
    # a flag overrides the file (epochs 3 -> 1)
    config = runner.invoke(app, ["run", "--config", str(study), "--epochs", "1", "--quiet",
                                 "--out", str(tmp_path / "config")])
    assert config.exit_code == 0, config.output
    assert ids(tmp_path / "config") == ids(tmp_path / "flags")
    # the resolved file written into the folder makes them again, as is
    again = runner.invoke(app, ["run", "--config", str(tmp_path / "config" / "config.toml"),
                                "--workers", "1", "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert ids(tmp_path / "again") == ids(tmp_path / "flags")
    # and, onto its own folder, finds everything done
    same = runner.invoke(app, ["run", "--config", str(tmp_path / "config" / "config.toml"),
                               "--workers", "1"])
    assert same.exit_code == 0 and "8 already finished, 0 to run" in same.stderr


def test_name_makes_results_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "--norms", "gn", "--batch-sizes", "4", *TINY,
                                 "--name", "first-look"])
    assert result.exit_code == 0, result.output
    assert len(ids(tmp_path / "results" / "first-look")) == 1


@pytest.mark.parametrize("command", [["run"], ["compare"], ["plot"], ["report"]])
def test_help_shows_no_internal_reprs(command):
    result = runner.invoke(app, command + ["--help"], terminal_width=100)
    assert result.exit_code == 0
    for internal in ("<str>", "<int>", "<float>", "<path>", "list[", "()", "Presets: 400"):
        assert internal not in result.stdout, internal
    assert not re.search(r"default: \(|default: True|default: False", result.stdout)


def table_header(sgd_batches, lrs) -> str:
    import pandas as pd
    from rich.console import Console

    from bknbench.render import summary_table
    from bknbench.report.summary import summarize

    runs = pd.DataFrame([{"dataset": "d", "model": "m", "spec": f"s{i}", "norm_batch": 2,
                          "sgd_batch": sgd, "lr": lr, "seed": 0, "status": "ok",
                          "final_val_acc": 90.0, "final_test_acc": 90.0, "best_val_acc": 90.0}
                         for i, (sgd, lr) in enumerate(zip(sgd_batches, lrs))])
    console = Console(width=200, record=True)
    console.print(summary_table(summarize(runs), "t"))
    return console.export_text().splitlines()[2]


def test_the_table_shows_sgd_batch_and_lr_where_a_row_accumulates_or_is_tuned():
    plain = table_header([2, 2], [0.2 * 2 / 128] * 2)
    assert "sgd" not in plain and "lr" not in plain
    accumulated = table_header([2, 128], [0.2 * 2 / 128, 0.2])  # bn@2 beside bn-accum@2
    assert "sgd" in accumulated and "lr" in accumulated
    tuned = table_header([2, 2], [0.1, 0.2])
    assert "sgd" not in tuned and "lr" in tuned
