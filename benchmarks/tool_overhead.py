"""bknbench's training loop vs a bare hand-written PyTorch loop on the same model and data.

    python benchmarks/tool_overhead.py [--quick] [--threads 1] [--repeats 5] [--device cpu]

bknbench: `train_run` for one epoch over a fixed subset; its timer covers only the
training loop (index the batch, autocast context, forward, loss, zero_grad, backward, SGD
step, lr schedule step, on-device loss/accuracy sums, one sync per epoch).
bare: the minimal loop anyone would write: the same model (make_model), the same optimizer
(make_optimizer), the same shuffled batches; forward, loss, zero_grad, backward, step.
Target (issue "Performance"): bknbench's step within 5% of the bare loop (ratio <= 1.05).
"""
from __future__ import annotations

from common import (bknbench_rate, header, interleaved, median, parse_args, spread, stopwatch,
                    subset, verdict)


def bare_rate(cfg, data, device: str):
    """A case: the bare loop for one epoch over `data` on `device`, returning samples/s."""
    import torch
    import torch.nn.functional as F

    from bknbench.models.registry import make_model
    from bknbench.norms.registry import parse_spec
    from bknbench.train import make_optimizer

    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    now = stopwatch(device)

    def run() -> float:
        torch.manual_seed(cfg.seed)
        model = make_model(cfg.model, parse_spec(cfg.spec), cfg.norm_batch, data.sample_shape,
                           data.num_classes).to(device)
        opt = make_optimizer(model, cfg)
        model.train()
        steps = len(x_all) // cfg.sgd_batch
        order = torch.Generator().manual_seed(cfg.seed)
        t = now()
        perm = torch.randperm(len(x_all), generator=order)[: steps * cfg.sgd_batch]
        for idx in perm.to(device).view(steps, cfg.sgd_batch):
            x, y = x_all[idx], y_all[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * cfg.sgd_batch / (now() - t)
    return run


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch

    from bknbench.config import RunConfig
    from bknbench.data.registry import Dataset, load_dataset

    torch.set_num_threads(args.threads)
    header("tool_overhead: bknbench train step vs a bare PyTorch loop", args)
    mnist = load_dataset("mnist1d")
    # mnist1d's 4000 training samples three times over, so that a repeat at 128 lasts
    # about 0.4 s: shorter ones were at the mercy of a shared machine's noise
    mnist = Dataset(mnist.name, mnist.x_train.repeat(3, 1, 1), mnist.y_train.repeat(3),
                    mnist.x_test, mnist.y_test, mnist.num_classes, mnist.image)
    steps = {128: 10 if args.quick else 90, 2: 100 if args.quick else 400}
    worst = 0.0
    print(f"{'case':28s} {'bknbench/s':>11s} {'spread':>10s} {'bare/s':>9s} {'spread':>10s} "
          f"{'t_step ratio':>14s}")
    for spec in ("bn", "bkn"):
        for b, n in steps.items():
            cfg = RunConfig(spec=spec, model="cnn", norm_batch=b, sgd_batch=b, epochs=1)
            data = subset(mnist, n * b, 256)
            r = interleaved({"bknbench": bknbench_rate(cfg, data, args.device),
                             "bare": bare_rate(cfg, data, args.device)}, args.repeats)
            ours, bare = median(r["bknbench"]), median(r["bare"])
            ratio = bare / ours  # time per step, bknbench relative to bare
            worst = max(worst, ratio)
            print(f"cnn {spec} b={b:<19d} {ours:11.0f} {spread(r['bknbench']):>10s} "
                  f"{bare:9.0f} {spread(r['bare']):>10s} {ratio:14.3f}", flush=True)
    print(f"\nworst step-time ratio bknbench / bare: {worst:.3f}  "
          f"{verdict(worst, 1.05, higher_is_better=False)}")


if __name__ == "__main__":
    main()
