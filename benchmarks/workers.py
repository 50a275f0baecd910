"""Wall time of one sweep with 1 worker (serial, in process) vs 2 worker processes, and
the default worker count (one per CPU core) where that is another number.

    python benchmarks/workers.py [--quick] [--make-run] [--repeats 5]

The sweep (cnn on mnist1d; bn, gn, bkn x micro-batch 4, 8, 16, 32 x 2 seeds, 2 epochs:
about half a minute on one worker; --quick: 1 seed, 1 epoch; --make-run: the first sweep
of `make run`'s default study, "paper": 60 runs of the mlp on mnist1d with
--diagnose, about a minute per sweep) runs through
`bknbench.sweep.run_sweep` into a fresh temporary folder each repeat, with SerialExecutor
(1 worker: this process, torch threads = all cores), ProcessExecutor(2) (two spawned
workers, cores // 2 threads each) and, when the machine does not have 2 cores, what
`bknbench run` picks without --workers (commands.make_executor). Each pool is created per
sweep, so its start-up, spawning and importing torch, is part of the figure. With
--one-process, ProcessExecutor(1) is timed too. No warm-up round: every repeat is a whole
sweep. Target (issue "Performance"): 2 workers on 2 cores >= 1.7x faster than 1 worker.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from common import header, interleaved, median, parse_args, spread, timed, verdict


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], threads=None,
                      flags={"--one-process": "also time ProcessExecutor(1)",
                             "--make-run": "time make run's paper sweep (60 runs)"},
                      device=False)
    import torch

    from bknbench.commands import make_executor
    from bknbench.config import RunConfig, SweepConfig
    from bknbench.sweep.local import ProcessExecutor, cpu_cores
    from bknbench.sweep.plan import SerialExecutor, run_sweep

    cores = cpu_cores()
    torch.set_num_threads(cores)  # the serial executor's share: the whole machine
    header("workers: one sweep, 1 vs 2 worker processes", args)
    if args.make_run:  # the Makefile's `run` target, its first sweep
        sweep = SweepConfig(specs=("bn", "gn", "bkn", "bkn:propagate=output"),
                            batch_sizes=(2, 4, 8, 32, 128), seeds=(0, 1, 2),
                            accumulate_to=128,
                            base=RunConfig(spec="", dataset="mnist1d", model="mlp", epochs=6,
                                           diagnose=True))
    else:
        sweep = SweepConfig(specs=("bn", "gn", "bkn"), batch_sizes=(4, 8, 16, 32),
                            seeds=(0,) if args.quick else (0, 1),
                            base=RunConfig(spec="", dataset="mnist1d", model="cnn",
                                           epochs=1 if args.quick else 2))
    print(f"sweep: {len(sweep.expand())} runs; cores: {cores}\n")

    def sweep_with(make_executor):
        def run():
            with tempfile.TemporaryDirectory() as d:
                report = run_sweep(sweep, Path(d) / "sweep", make_executor())
            bad = [r["reason"] for r in report.finished if r["status"] != "ok"]
            if bad:
                raise RuntimeError(f"failed runs: {bad}")
        return timed(run)

    cases = {"1 worker (serial)": sweep_with(SerialExecutor),
             "2 workers": sweep_with(lambda: ProcessExecutor(2))}
    default = make_executor(None, "cpu")
    n = getattr(default, "workers", 1)
    if n not in (1, 2):
        cases[f"default ({n} workers)"] = sweep_with(lambda: make_executor(None, "cpu"))
    print(f"bknbench run without --workers: {n} worker(s) here\n")
    if args.one_process:
        cases["1 worker process"] = sweep_with(lambda: ProcessExecutor(1))
    r = interleaved(cases, args.repeats, warmup=0)
    print(f"{'executor':22s} {'wall s':>8s} {'spread':>10s} {'speed-up vs 1 worker':>22s}")
    one = median(r["1 worker (serial)"])
    for name, xs in r.items():
        print(f"{name:22s} {median(xs):8.2f} {spread(xs):>10s} {one / median(xs):22.2f}")
    speedup = one / median(r["2 workers"])
    print(f"\n2 workers vs 1 worker: {speedup:.2f}x  {verdict(speedup, 1.7)}")


if __name__ == "__main__":
    main()
