"""Progress: the ETA's arithmetic, and plain lines (stderr not a terminal) with [k/N], a
time and the ETA on every line, epoch lines from worker processes too."""
from __future__ import annotations

import re

from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.config import RunConfig
from bknbench.render import Eta, duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_from_finished_runs_of_the_same_spec_and_size():
    clock = Clock()
    eta = Eta(clock)
    runs = [RunConfig(spec=s, norm_batch=b, sgd_batch=b, seed=k)
            for s in ("bn", "gn") for b in (2, 32) for k in (0, 1)]
    eta.plan(runs)
    assert eta.left_s() is None and eta.text() == "ETA --"
    eta.start(runs[0])
    eta.start(runs[2])  # two workers
    clock.now = 10.0
    eta.finish(runs[2])  # bn@32: 10 s
    clock.now = 40.0
    eta.finish(runs[0])  # bn@2: 40 s
    # left: bn@2 s1 40, bn@32 s1 10, gn@2 x2 at bn@2's size 40, gn@32 x2 10; two at a time
    assert eta.left_s() == (40 + 10 + 2 * 40 + 2 * 10) / 2
    eta.start(runs[1])
    clock.now = 50.0  # bn@2 seed 1 has run 10 of its 40 s
    assert eta.left_s() == (30 + 10 + 2 * 40 + 2 * 10) / 2
    assert [duration(s) for s in (45, 200, 3 * 3600 + 300)] == ["45s", "3m20s", "3h05m"]


def test_plain_lines_have_count_time_and_eta_and_worker_epochs(tmp_path):
    result = CliRunner().invoke(app, ["run", "--dataset", "synthetic", "--norms", "bn,gn",
                                      "--batch-sizes", "16", "--seeds", "0", "--epochs", "2",
                                      "--workers", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    progress = [ln for ln in lines if not ln.startswith(("results in", "note:"))]
    assert "sweep: 2 runs, 0 already finished, 2 to run" in progress[0]
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[(\d)/2\] "
    for line in progress:
        assert re.match(stamp + r".*  ETA (--|\d+s|\d+m\d\ds)$", line), line
    epochs = [ln for ln in progress if "  epoch " in ln]
    assert len(epochs) == 4, lines  # 2 runs x 2 epochs, from the worker processes
    assert [int(re.match(stamp, ln).group(1)) for ln in progress if " done " in ln] == [1, 2]
    assert progress[-1].endswith("ETA 0s")
