"""benchmarks/gpu_check.py, the one call to make when a GPU is lent, tested where none is:
`--device cpu` runs every section as a dry run and writes its few files into --out only;
a failed check is exit status 1; bad usage 2; --device cuda without CUDA one line and 0."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "gpu_check.py"


def check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=600)


def test_dry_run_on_the_cpu_runs_every_section(tmp_path):
    out = tmp_path / "check"
    proc = check("--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.json", "summary.md", "sweep-runs.csv", "sweep.log"]
    text = (out / "summary.md").read_text()
    assert text.startswith("# gpu_check on cpu") and "**all checks passed**" in text
    for section in ("environment", "correctness", "amp", "determinism", "syncs", "speed",
                    "graphs", "sweep"):
        assert f"\n## {section}\n" in text, section
    assert "not run" not in text
    assert "| bknbench run --strict | pass | all runs ok |" in text


def test_a_failed_check_is_exit_status_1_and_listed_first(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(BENCH)] + sys.path)  # main() adds to it too
    gpu_check, sections = (importlib.import_module(m) for m in ("gpu_check", "gpu_sections"))
    monkeypatch.setattr(sections, "amp", lambda ctx: [sections.row("amp", "bkn", False,
                                                                   "drift 3e-02")])
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--only",
                                      "environment,amp", "--out", str(tmp_path)])
    assert gpu_check.main() == 1
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[3:5] == ["**FAILED: 1 check(s)** (0 passed)", "- FAILED amp / bkn: drift 3e-02"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA it runs the whole check")
def test_without_cuda_one_line_and_exit_0(tmp_path):
    proc = check("--out", str(tmp_path / "never"))
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines() == [
        f"gpu_check: no CUDA device here (torch {torch.__version__}: "
        "torch.cuda.is_available() is False); nothing to check"]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, words", [
    (["--only", "amp,nope"], "error: unknown section(s) nope; sections: environment, "
                             "correctness, amp, determinism, syncs, speed, graphs, sweep"),
    (["--budget-s", "0"], "error: --budget-s must be positive, got 0"),
    ([], "error: the following arguments are required: --out"),
])
def test_bad_usage_is_exit_status_2(args, words, tmp_path):
    out = [] if not args else ["--out", str(tmp_path)]
    proc = check("--device", "cpu", *out, *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1].endswith(words)
