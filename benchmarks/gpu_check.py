"""Check the GPU path in one command, in under 8 minutes, on a machine with a CUDA device.

    python benchmarks/gpu_check.py [--only PART,...] [--out DIR] [--device cuda]

Runs bknbench from this checkout (PYTHONPATH; nothing is installed). It needs torch with
CUDA and bknbench's other dependencies with pytest (`pip install -e ".[test]"` keeps an
installed torch >= 2.1); it names any that are missing. Parts, each stopped at its limit
(they add up to 7 minutes 30 s; time a part leaves unused goes to the next), each logged
in full in OUT/<part>.log:
  tests       pytest tests/test_gpu.py (training with and without --amp, peak memory,
              determinism, the fused nodes on the GPU against the CPU reference)
  sweep       bknbench run: bn, bkn, bn-accum at micro-batch 2 and 128 on digits, 1 epoch,
              once without and once with --amp
  throughput  benchmarks/norm_throughput.py --quick on the GPU
  overhead    benchmarks/tool_overhead.py --quick on the GPU
  compile     benchmarks/compile.py --quick on the GPU
Then one summary: pass/fail/timeout per part, every sweep run with its accuracy, samples/s
and peak memory (from runs.csv), and the benchmarks' tables. Exit status 1 when a part did
not pass. Without a CUDA device: one line, exit status 0. (--device cpu runs the same
parts on the CPU, to try the script itself.)
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# part -> seconds it may take; together under 8 minutes with the start-up around them
LIMITS = {"tests": 100, "sweep": 100, "throughput": 130, "overhead": 60, "compile": 60}
SWEEP = ["--dataset", "digits", "--norms", "bn,bkn,bn-accum", "--batch-sizes", "2,128",
         "--seeds", "0", "--epochs", "1", "--quiet"]
NEEDED = {"typer": "typer", "rich": "rich", "pandas": "pandas", "numpy": "numpy",
          "sklearn": "scikit-learn", "scipy": "scipy", "mnist1d": "mnist1d",
          "pytest": "pytest"}


def run_part(name: str, cmd: list[str], out: Path, limit: float) -> tuple[str, str, float]:
    """(status pass/fail/timeout, its output, seconds); the output also in OUT/name.log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        status, text = ("pass" if proc.returncode == 0 else "fail"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        text = "".join(s.decode() if isinstance(s, bytes) else (s or "")
                       for s in (e.stdout, e.stderr))
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{text}")
    return status, text, time.monotonic() - t


def sweep_rows(folders: list[Path]) -> list[str]:
    lines = [f"{'spec':10s} {'batch':>5s} {'amp':>5s} {'status':8s} {'val acc %':>9s} "
             f"{'samples/s':>10s} {'peak MiB':>9s}"]
    for folder in folders:
        path = folder / "runs.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                lines.append(f"{r['spec']:10s} {r['norm_batch']:>5s} {r['amp']:>5s} "
                             f"{r['status']:8s} {r['final_val_acc'][:6]:>9s} "
                             f"{r['samples_per_s']:>10s} {r['peak_mem_mb'][:8]:>9s}")
    return lines


def body(text: str) -> list[str]:
    """A benchmark's output without its header block (up to the first blank line)."""
    lines = text.rstrip().splitlines()
    return lines[lines.index("") + 1:] if "" in lines else lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(LIMITS), help=f"parts: {', '.join(LIMITS)}")
    ap.add_argument("--out", type=Path, help="logs and sweep folders [default: "
                                             "results/gpu-check-<time>]")
    ap.add_argument("--device", default="cuda", help="cuda (or cuda:N); cpu to try the script")
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in LIMITS]:
        ap.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(LIMITS)}")
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed, so there is no CUDA device to check")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}: "
              "torch.cuda.is_available() is False); nothing to check")
        return 0
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"gpu_check: missing {', '.join(missing)}; install with: pip install "
              f"{' '.join(missing)}  (or pip install -e \".[test]\", which keeps this torch)")
        return 2
    out = args.out or ROOT / "results" / datetime.datetime.now().strftime(
        "gpu-check-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else "CPU")
    print(f"gpu_check on {where}, torch {torch.__version__}; logs in {out}", flush=True)
    py = sys.executable
    bench = ["--quick", "--device", args.device]
    commands = {
        "tests": [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]],
        "sweep": [[py, "-m", "bknbench", "run", *SWEEP, "--device", args.device, "--out",
                   str(out / "sweep-fp32")],
                  [py, "-m", "bknbench", "run", *SWEEP, "--device", args.device, "--amp",
                   "--out", str(out / "sweep-amp")]],
        "throughput": [[py, "benchmarks/norm_throughput.py", *bench]],
        "overhead": [[py, "benchmarks/tool_overhead.py", *bench]],
        "compile": [[py, "benchmarks/compile.py", *bench]],
    }
    results, spare = {}, 0.0
    for part in parts:
        status, text, spent = "pass", "", 0.0
        limit = LIMITS[part] + spare
        for cmd in commands[part]:  # the sweep's two halves share its limit
            s, t, dt = run_part(part, cmd, out, limit - spent)
            status = s if status == "pass" else status
            text, spent = text + t, spent + dt
            if s == "timeout":
                break
        results[part] = (status, text, spent)
        spare = max(0.0, limit - spent)
        print(f"  {part:10s} {status:8s} {spent:6.0f} s", flush=True)

    print("\n# summary")
    for part, (status, text, spent) in results.items():
        detail = ""
        if part == "tests":
            found = re.findall(r"\d+ (?:passed|failed|skipped|errors?)", text)
            detail = ", ".join(found)
        if status == "timeout":
            detail = f"stopped at its time limit; what it printed is in {out / part}.log"
        elif status == "fail" and part != "tests":
            detail = (text.strip().splitlines() or [""])[-1][:100]
        print(f"{part:10s} {status:8s} {spent:6.0f} s  {detail}")
    if "sweep" in results:
        print("\n## sweep (runs.csv)")
        print("\n".join(sweep_rows([out / "sweep-fp32", out / "sweep-amp"])))
    for part in ("throughput", "overhead", "compile"):
        if part in results and results[part][1].strip():
            print(f"\n## {part}")
            print("\n".join(body(results[part][1])))
    return 0 if all(s == "pass" for s, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
