"""What --diagnose costs: the same run with and without it, side by side.

    python benchmarks/diagnose_cost.py [--quick] [--threads 1] [--repeats 5] [--device cpu]

Each case is one whole bknbench run (`train_run`: build, train, evaluate every epoch, and
with --diagnose the probes after every epoch and the population accuracy at the end), timed
wall-clock from call to return with the data already loaded; the figure is the median of the
repeats of diagnosed / undiagnosed (interleaved), so 1.08 means diagnostics add 8% to a run.
The runs last 3 epochs (`bknbench run`'s default; 1 with --quick), and 12 at SGD batch 128,
whose 3-epoch runs (0.5-1.3 s) spread by more than the 10% to resolve: the population
accuracy is paid once per run, the probes once per epoch.
Cases: cnn on mnist1d (4000 samples; probe set 512) and on digits (1347 samples, the default
dataset), bn and bkn, at micro-batch 2 without accumulation (one forward per 2 samples: the
train probe replays 64 of them), micro-batch 2 accumulated to 128, and 128.
Expectation: the probes cost about (512 + 256) forward samples an epoch, where training costs
n_train forward-backward samples; at large batches a no-grad forward of a sample is about half
a training step's on a CPU, so about 10% on mnist1d and more on the small digits set.
Target (issue 11): ratio <= 1.10 in every case.
"""
from __future__ import annotations

import dataclasses
import time

from common import header, interleaved, median, parse_args, spread, verdict


def run_time(cfg, data):
    from bknbench.train import train_run

    def run() -> float:
        t = time.perf_counter()
        out = train_run(cfg, data)  # syncs the device itself (it reads the epoch's metrics)
        if out.status != "ok":
            raise RuntimeError(f"{cfg.spec} b={cfg.norm_batch}: {out.status} {out.reason}")
        return time.perf_counter() - t
    return run


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch

    from bknbench.config import RunConfig
    from bknbench.data.registry import load_dataset

    torch.set_num_threads(args.threads)
    header("diagnose_cost: a run with --diagnose vs without", args)
    datasets = ("mnist1d",) if args.quick else ("mnist1d", "digits")
    epochs = 1 if args.quick else 3
    batches = ((2, 128), (128, 128)) if args.quick else ((2, 2), (2, 128), (128, 128))
    print(f"{'case':36s} {'plain s':>8s} {'spread':>10s} {'diagnosed s':>12s} {'spread':>10s} "
          f"{'ratio':>6s}")
    worst = 0.0
    for name in datasets:
        data = load_dataset(name)
        for spec in ("bn", "bkn"):
            for micro, sgd in batches:
                n_epochs = epochs * 4 if sgd == 128 else epochs  # see the docstring
                plain = RunConfig(spec=spec, dataset=name, model="cnn", norm_batch=micro,
                                  sgd_batch=sgd, epochs=n_epochs, device=args.device)
                diagnosed = dataclasses.replace(plain, diagnose=True)
                r = interleaved({"plain": run_time(plain, data),
                                 "diagnosed": run_time(diagnosed, data)}, args.repeats)
                a, b = median(r["plain"]), median(r["diagnosed"])
                worst = max(worst, b / a)
                case = f"{name} cnn {spec} b={micro} sgd={sgd} x{n_epochs}"
                print(f"{case:36s} {a:8.2f} {spread(r['plain']):>10s} {b:12.2f} "
                      f"{spread(r['diagnosed']):>10s} {b / a:6.3f}", flush=True)
    print(f"\nworst ratio diagnosed / plain: {worst:.3f}  "
          f"{verdict(worst, 1.10, higher_is_better=False)}")


if __name__ == "__main__":
    main()
