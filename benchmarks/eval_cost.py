"""The cost of the convergence curves: one run with K = 1 evaluation per epoch vs the
default K = ceil(20 / epochs), side by side.

    python benchmarks/eval_cost.py [--quick] [--repeats 5]

Cases: `bknbench run`'s default model (cnn on digits, 3 epochs, so K = 7) with bn at micro-batch
1, 8 and 128, each timed whole (train_run: build, train, every evaluation) with K = 1 and
with K = 7. An evaluation is one eval-mode forward over the held-out split (450 samples on
digits), so its cost is fixed per evaluation while a training epoch costs more the smaller
the micro-batch: the overhead is largest at 128. Reported: the median seconds of each case,
the ratio K = 7 / K = 1 per micro-batch, and the ratio of the three summed (the default
sweep's time is mostly its small micro-batches). --quick: 1 epoch (K = 20).
"""
from __future__ import annotations

import dataclasses

from common import header, interleaved, median, parse_args, spread, timed


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], flags={})
    import torch

    from bknbench.config import RunConfig
    from bknbench.data import load_dataset
    from bknbench.train import train_run

    torch.set_num_threads(args.threads)
    header("evaluation cost: K = 1 vs the default K", args)
    data = load_dataset("digits")
    epochs = 1 if args.quick else 3
    cases = {}
    for b in (1, 8, 128):
        base = RunConfig(spec="bn", dataset="digits", model="cnn", norm_batch=b, sgd_batch=b,
                         epochs=epochs, device=args.device)
        for k in (1, base.evals):
            cfg = dataclasses.replace(base, evals_per_epoch=k)
            cases[f"b={b} K={k}"] = timed(lambda cfg=cfg: train_run(cfg, data))
    times = interleaved(cases, args.repeats)
    k_default = RunConfig(spec="bn", epochs=epochs).evals
    for b in (1, 8, 128):
        one, many = times[f"b={b} K=1"], times[f"b={b} K={k_default}"]
        print(f"micro-batch {b:3d}: K=1 {median(one):7.2f} s ({spread(one)}), "
              f"K={k_default} {median(many):7.2f} s ({spread(many)}): "
              f"x{median(many) / median(one):.3f}")
    total_one = sum(median(times[f"b={b} K=1"]) for b in (1, 8, 128))
    total_many = sum(median(times[f"b={b} K={k_default}"]) for b in (1, 8, 128))
    print(f"the three together: x{total_many / total_one:.3f}")


if __name__ == "__main__":
    main()
