"""bkn vs bn training samples/s on 1 and 2 torch threads, at micro-batch 128 and 2.

    python benchmarks/kernel_threads.py [--quick] [--threads 1,2] [--repeats 5]

Cases: the CNN on digits (2-D, 8x8: `bknbench run`'s default) and on mnist1d (1-D), bn and bkn
(analytic transition) at micro-batch 128 and 2, each on every thread count of --threads.
Each case sets torch.set_num_threads before its run, so the cases of one table, all thread
counts included, run round-robin in one process. Figure: samples/s of a bknbench run
(`train_run`, training loop only), median of the repeats; "x bn": bkn over bn at the same
micro-batch and thread count; "x 1st": over the same norm on the first thread count.
Targets (issue "Reliability at scale", item 6): bkn >= 0.90x bn at micro-batch 128 and
>= 0.80x at 2, on 2 threads as well as on 1. The C++ kernels split their passes over the
threads; tests/kernels/test_native.py checks that the results do not depend on it.
"""
from __future__ import annotations

from typing import Callable

from common import bknbench_rate, header, interleaved, median, parse_args, spread, subset, verdict

NORMS = ("bn", "bkn")
TARGETS = {128: 0.90, 2: 0.80}


def on_threads(case: Callable[[], float], threads: int) -> Callable[[], float]:
    """The case run with `threads` torch intra-op threads."""
    def run() -> float:
        import torch

        torch.set_num_threads(threads)
        return case()
    return run


def table(title: str, rates: dict[tuple[str, int], list[float]],
          counts: tuple[int, ...]) -> dict[tuple[str, int], float]:
    """Print one table; returns {(norm, threads): median samples/s}."""
    print(f"## {title}")
    print(f"{'case':22s} {'samples/s':>10s} {'spread':>12s} {'x bn':>7s} {'x 1st':>7s}")
    med = {k: median(v) for k, v in rates.items()}
    for (norm, t), v in rates.items():
        print(f"{f'{norm}, {t} thread(s)':22s} {med[norm, t]:10.0f} {spread(v):>12s} "
              f"{med[norm, t] / med['bn', t]:7.3f} {med[norm, t] / med[norm, counts[0]]:7.3f}")
    print(flush=True)
    return med


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], threads=(1, 2), device=False)
    from bknbench.config import RunConfig
    from bknbench.data.registry import load_dataset

    header("kernel_threads: bkn vs bn on 1 and 2 torch threads", args)
    q = args.quick
    # (steps per epoch, epochs): about 30 steps at 128 and 200 at 2 (full), as
    # norm_throughput.py; digits has 10 steps of 128 per epoch, hence 3 epochs
    plans = {"digits": {128: (10, 1 if q else 3), 2: (60 if q else 200, 1)},
             "mnist1d": {128: (10 if q else 30, 1), 2: (60 if q else 200, 1)}}
    ratios = {}
    for dataset, plan in plans.items():
        full = load_dataset(dataset)
        for b, (steps, epochs) in plan.items():
            data = subset(full, steps * b, 256)
            cases = {(norm, t): on_threads(bknbench_rate(
                RunConfig(spec=norm, dataset=dataset, model="cnn", norm_batch=b, sgd_batch=b,
                          epochs=epochs), data), t)
                     for t in args.threads for norm in NORMS}
            med = table(f"cnn / {dataset}, micro-batch {b}", interleaved(cases, args.repeats),
                        args.threads)
            for t in args.threads:
                ratios[dataset, b, t] = med["bkn", t] / med["bn", t]

    print("## targets: bkn / bn")
    for (dataset, b, t), r in ratios.items():
        print(f"cnn / {dataset:8s} micro-batch {b:3d}, {t} thread(s): {r:.3f}  "
              f"{verdict(r, TARGETS[b])}")
    from bknbench.kernels import native
    print(f"kernels: {native.status()}")


if __name__ == "__main__":
    main()
