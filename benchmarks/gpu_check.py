"""Check the GPU path in one call, within a time budget, from a checkout.

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--only SECTION,...] [--budget-s 360]

Needs torch with CUDA and bknbench's dependencies (nothing else: digits and synthetic data
are in the repository). Writes only into DIR, at most 5 files: summary.md (read it first),
results.json (every row), errors.log (tracebacks, if any), sweep-runs.csv and sweep.log.
Sections (docs/gpu.md says what each shows):
  environment  GPU, driver, torch, CUDA, TF32, which ops autocast runs in bf16
  correctness  one training step of every model family and spec on the device in float32
               against float64 on the CPU: outputs, gradients, parameters, running statistics
  amp          running-statistics drift per spec after 100 steps under bf16 autocast
  determinism  two identical runs per spec under torch.use_deterministic_algorithms: bitwise
  syncs        synchronizing calls per training step, per spec
  speed        samples/s, bkn/bn and bn-accum/bn: cnn and resnet20, micro-batch 2 and 128,
               with and without amp and channels_last
  graphs       CUDA graphs: capture and replay of a training step (bn, bkn: replay vs eager
               time at micro-batch 1, 2, 128; the other specs: captured or what blocks it)
  sweep        a short `bknbench run --strict` (digits; bn, bkn, bn-accum at 2 and 128)
Each section has a share of the budget (time one leaves goes to the next); what its deadline
does not reach is listed as not run, to rerun with --only. Exit status 1 when a check failed,
2 on bad usage; without a CUDA device (and --device cuda) one line and 0. --device cpu runs
every section as a dry run with small sizes (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# section -> share of the budget, seconds of the default 360
SHARES = {"environment": 5, "correctness": 60, "amp": 25, "determinism": 35, "syncs": 25,
          "speed": 95, "graphs": 55, "sweep": 60}
SWEEP = {"cuda": ["--dataset", "digits", "--norms", "bn,bkn,bn-accum", "--batch-sizes", "2,128"],
         "cpu": ["--dataset", "synthetic", "--norms", "bn,bkn", "--batch-sizes", "64",
                 "--evals-per-epoch", "1"]}


def sweep_section(ctx, out: Path) -> list[dict]:
    """`bknbench run --strict` in a temporary folder; its runs.csv and log kept in out."""
    from gpu_sections import row

    args = SWEEP["cpu" if ctx.dry else "cuda"] + ["--epochs", "1", "--seeds", "0", "--strict",
                                                  "--quiet", "--device", str(ctx.device)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "bknbench", "run", *args, "--out", tmp + "/sweep"]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, ctx.deadline - time.monotonic()))
            ok, text = proc.returncode == 0, proc.stdout + proc.stderr
            detail = "all runs ok" if ok else f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            ok, text, detail = None, "", "not run to its end: time budget"
        (out / "sweep.log").write_text(f"$ bknbench run {' '.join(args)}\n{text}")
        if Path(tmp, "sweep", "runs.csv").exists():
            shutil.copy(Path(tmp, "sweep", "runs.csv"), out / "sweep-runs.csv")
    return [row("sweep", "bknbench run --strict", ok, detail)]


def summary(rows: list[dict], header: list[str], rerun: str) -> str:
    failed = [r for r in rows if r["ok"] is False]
    skipped = sorted({r["section"] for r in rows if r["detail"] == "not run: time budget"})
    verdict = f"FAILED: {len(failed)} check(s)" if failed else "all checks passed"
    lines = header + ["", f"**{verdict}** ({sum(r['ok'] is True for r in rows)} passed)"]
    if skipped:
        lines.append(f"not reached in the budget: {', '.join(skipped)}; rerun: {rerun} "
                     f"--only {','.join(skipped)}")
    lines += [f"- FAILED {r['section']} / {r['check']}: {r['detail']}" for r in failed]
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += ["", f"## {section}", "", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {r['check']} | {({True: 'pass', False: 'FAIL', None: '-'})[r['ok']]} "
                  f"| {r['detail']} |" for r in rows if r["section"] == section]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the files it writes")
    ap.add_argument("--device", default="cuda", help="cuda (or cuda:N); cpu: a dry run")
    ap.add_argument("--only", default=",".join(SHARES), help=f"sections: {', '.join(SHARES)}")
    ap.add_argument("--budget-s", type=float, default=360.0, help="time budget, seconds")
    args = ap.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := [s for s in sections if s not in SHARES]:
        ap.error(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SHARES)}")
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be positive, got {args.budget_s:g}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}: "
              "torch.cuda.is_available() is False); nothing to check")
        return 0
    if not args.device.startswith(("cuda", "cpu")):
        ap.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # for determinism
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)  # a dry run of tiny tensors: threads only contend
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_sections
    import gpu_speed

    args.out.mkdir(parents=True, exist_ok=True)
    run = {**{s: getattr(gpu_sections, s, None) for s in SHARES},
           "speed": gpu_speed.speed, "graphs": gpu_speed.graphs,
           "sweep": lambda ctx: sweep_section(ctx, args.out)}
    t0, rows, spare = time.monotonic(), [], 0.0
    scale = args.budget_s / sum(SHARES[s] for s in sections)
    rerun = f"python benchmarks/gpu_check.py --out DIR --device {args.device}"
    for section in sections:
        start = time.monotonic()
        ctx = gpu_sections.Ctx(args.device, start + SHARES[section] * scale + spare)
        try:
            rows += run[section](ctx)
        except Exception as e:  # noqa: BLE001 (a section that crashes is a failed check)
            rows.append(gpu_sections.row(section, "section", False,
                                         f"{type(e).__name__}: {e}"[:200]))
            with open(args.out / "errors.log", "a") as f:
                f.write(f"## {section}\n{traceback.format_exc()}\n")
        spare = max(0.0, ctx.deadline - time.monotonic())
        print(f"  {section:12s} {time.monotonic() - start:6.1f} s", flush=True)
    header = [f"# gpu_check on {args.device}, torch {torch.__version__}",
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; sections: "
              f"{', '.join(sections)}; {time.monotonic() - t0:.0f} s of a "
              f"{args.budget_s:.0f} s budget"]
    text = summary(rows, header, rerun)
    (args.out / "summary.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text.split("\n## ")[0].rstrip())
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
