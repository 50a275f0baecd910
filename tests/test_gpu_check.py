"""benchmarks/gpu_check.py where it can run here: without a CUDA device it says so in one
line and exits 0; a part it does not know is a usage error. (With CUDA it runs the whole
check, minutes long: run it by hand, as the README says.)"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA it runs the whole check")
def test_without_cuda_one_line_and_exit_0():
    proc = check()
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines() == [
        f"gpu_check: no CUDA device here (torch {torch.__version__}: "
        "torch.cuda.is_available() is False); nothing to check"]


def test_unknown_part_is_a_usage_error():
    proc = check("--only", "tests,nope")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1].endswith(
        "error: unknown part(s) nope; parts: tests, sweep, throughput, overhead, compile")
