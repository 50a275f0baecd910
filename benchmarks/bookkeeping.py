"""Bookkeeping at scale: the cost of committing a run at 100, 1,000 and 10,000 runs in the
folder, and of planning the resume of a folder of 10,000 finished runs. No training.

    python benchmarks/bookkeeping.py [--quick] [--repeats 5]

Records are synthetic but shaped like real ones: a runs.csv row made by make_row, three
metrics rows. Commit: each repeat fills a fresh folder through Store.commit, and at 100,
1,000 and 10,000 runs times the 50 commits that bring the folder there, one by one (the
figure of a repeat: their median; it includes writing record.json with its fsync).
Resume: on the folder of 10,000 runs (5 specs x 8 micro-batch sizes x 250 seeds), the time
`bknbench run --resume` spends before it would start a run: reading and validating
sweep.json (build_sweep), then run_sweep with nothing left to do (lock, index check, plan);
"after a kill" first removes the last run from index.log, as a kill before its line would,
so the repair appends it. Also the whole command in a fresh process (importing torch,
printing the comparison table of 10,000 runs). --quick: 100 and 1,000 runs only.
Folders go to $TMPDIR (default /tmp): point it at the disk results are written to.
Targets (issue "Reliability at scale"): commit at 10,000 within 2x of commit at 100;
resume planning < 3 s.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, header, median, parse_args, spread, verdict

SIZES = (100, 1_000, 10_000)
TIMED = 50  # commits timed at each size


def make_sweep():
    from bknbench.config import RunConfig, SweepConfig

    return SweepConfig(specs=("bn", "gn", "bkn", "ln", "bn-accum"),
                       batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128), seeds=tuple(range(250)),
                       base=RunConfig(spec="", dataset="synthetic", epochs=3))


def synthetic_record(cfg, t: float) -> dict:
    from bknbench.sweep.run import make_row
    from bknbench.train import RunOutcome

    epochs = [{"epoch": e, "samples_seen": 512 * e, "train_loss": 1.0 / e, "train_acc": 90.0,
               "val_loss": 1.1 / e, "val_acc": 88.5 + e, "lr": 0.1 / e, "wall_s": 0.7 * e}
              for e in (1, 2, 3)]
    outcome = RunOutcome(epochs=epochs, train_time_s=2.1, samples=1536)
    return {"row": make_row(cfg, outcome, threads=1), "metrics": epochs, "finished_at": t}


def fill(out: Path, runs, sizes) -> dict[int, float]:
    """Commit every run into `out`; {size: median seconds of the TIMED commits that bring
    the folder to that many runs}."""
    from bknbench.sweep.plan import sweep_to_dict
    from bknbench.sweep.store import Store

    store = Store(out)
    store.prepare()
    store.save_sweep(sweep_to_dict(make_sweep()))
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for i, cfg in enumerate(runs):
        record = synthetic_record(cfg, float(i))
        t = time.perf_counter()
        store.commit(record)
        dt = time.perf_counter() - t
        for n in sizes:
            if n - TIMED <= i < n:
                times[n].append(dt)
    store.close()
    return {n: median(xs) for n, xs in times.items()}


def resume_time(out: Path, after_kill: bool) -> float:
    from bknbench.request import RunRequest, build_sweep
    from bknbench.sweep.plan import run_sweep

    if after_kill:  # index.log one run behind the tables and records
        log = out / "index.log"
        lines = log.read_bytes().splitlines(keepends=True)
        log.write_bytes(b"".join(lines[:-1]))
    t = time.perf_counter()
    sweep, folder = build_sweep(RunRequest(resume=out))
    report = run_sweep(sweep, folder)
    dt = time.perf_counter() - t
    assert report.planned == report.skipped == 10_000, (report.planned, report.skipped)
    return dt


def command_time(out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bknbench", "run", "--resume", str(out), "--quiet"],
                   env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t


def filesystem(path: str) -> str:
    best = ("", "unknown")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, kind = line.split()[:3]
            if path.startswith(mount) and len(mount) > len(best[0]):
                best = (mount, kind)
    except OSError:
        pass
    return best[1]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], threads=None, device=False)
    header("bookkeeping: commit and resume cost against the number of runs", args)
    sizes = SIZES[:2] if args.quick else SIZES
    runs = make_sweep().expand()[: max(sizes)]
    base = tempfile.gettempdir()
    print(f"folders in {base} ({filesystem(os.path.realpath(base))}); {TIMED} commits timed "
          f"at each size, {args.repeats} repeats\n", flush=True)
    per_size: dict[int, list[float]] = {n: [] for n in sizes}
    resume = {"resume": [], "resume after a kill": [], "whole command": []}
    for _ in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="bknbench-bookkeeping-"))
        try:
            for n, dt in fill(out, runs, sizes).items():
                per_size[n].append(dt)
            if not args.quick:
                resume["resume"].append(resume_time(out, after_kill=False))
                resume["resume after a kill"].append(resume_time(out, after_kill=True))
                resume["whole command"].append(command_time(out))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{'runs in the folder':>20s} {'commit ms':>10s} {'spread':>10s} {'vs 100':>7s}")
    first = median(per_size[sizes[0]])
    for n in sizes:
        m = median(per_size[n])
        print(f"{n:20,d} {1000 * m:10.3f} {spread(per_size[n]):>10s} {m / first:7.2f}")
    ratio = median(per_size[sizes[-1]]) / first
    print(f"\ncommit at {sizes[-1]:,} vs at 100: {ratio:.2f}x  "
          f"{verdict(ratio, 2.0, higher_is_better=False)}")
    if args.quick:
        return
    print(f"\n{'resume of 10,000 finished runs':32s} {'s':>7s} {'spread':>10s}")
    for name, xs in resume.items():
        print(f"{name:32s} {median(xs):7.2f} {spread(xs):>10s}")
    worst = max(median(resume["resume"]), median(resume["resume after a kill"]))
    print(f"\nresume planning: {worst:.2f} s  {verdict(worst, 3.0, higher_is_better=False)}")


if __name__ == "__main__":
    main()
