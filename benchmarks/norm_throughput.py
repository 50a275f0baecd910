"""Training throughput of the normalizers, side by side, at micro-batch 128 and 2.

    python benchmarks/norm_throughput.py [--quick] [--threads 1] [--repeats 5] [--device cpu]
                                         [--rivals-only]

Cases (each a bknbench run, `train_run`, over a fixed number of steps; figure: samples/s
of the training loop, median of the repeats, torch threads fixed):
  1. cnn on mnist1d: bn, bkn (analytic), bkn:transition=sampled, gn at micro-batch 128, 2,
     and bkn on the PyTorch autograd nodes instead of the C++ kernels ("[torch nodes]");
  2. resnet20 on random 32x32x3 images: the same cases at micro-batch 128, 2;
  3. accumulation to SGD batch 128 from micro-batch 2 on cnn/mnist1d: bn-accum (one
     grouped forward of 128 samples, 64 statistics groups) vs an explicit loop (64
     forward/backward passes of 2 samples, then one step) vs bn at micro-batch 128;
  4. the rivals (brn, mabn, cbn, frn, evonorm-b0, evonorm-s0, ws-gn) on cnn / mnist1d at
     micro-batch 128 and 2 against bn (``--rivals-only``: this section alone).
Targets (issue "Performance"): bkn >= 0.90x bn at 128; bn-accum >= 0.70x bn at 128 and
>= 10x the explicit loop; every rival >= 0.80x bn at 128 on the cnn (issue 12; cbn, which
computes a weight gradient per layer and step, is reported without a target).
"""
from __future__ import annotations

from common import (bknbench_rate, header, interleaved, median, parse_args, spread, stopwatch,
                    subset, synthetic_images, verdict, without_native)

NORMS = ("bn", "bkn", "bkn:transition=sampled", "gn")
RIVALS = ("brn", "mabn", "cbn", "frn", "evonorm-b0", "evonorm-s0", "ws-gn")


def explicit_accumulation_rate(data, steps: int, device: str, micro: int = 2,
                               sgd_batch: int = 128):
    """The hand-written alternative to bn-accum: per step, sgd_batch / micro separate
    forward/backward passes of `micro` samples with BN (each its own statistics), the
    gradients summed, then one optimizer step. Returns a case giving samples/s."""
    import torch
    import torch.nn.functional as F

    from bknbench.config import RunConfig
    from bknbench.models.registry import make_model
    from bknbench.norms.registry import parse_spec
    from bknbench.train import make_optimizer

    cfg = RunConfig(spec="bn", norm_batch=micro, sgd_batch=sgd_batch)
    parts = sgd_batch // micro
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    now = stopwatch(device)

    def run() -> float:
        torch.manual_seed(0)
        model = make_model("cnn", parse_spec("bn"), micro, data.sample_shape,
                           data.num_classes).to(device)
        opt = make_optimizer(model, cfg)
        model.train()
        t = now()
        for s in range(steps):
            x = x_all[s * sgd_batch:(s + 1) * sgd_batch]
            y = y_all[s * sgd_batch:(s + 1) * sgd_batch]
            opt.zero_grad(set_to_none=True)
            for k in range(parts):
                sl = slice(k * micro, (k + 1) * micro)
                (F.cross_entropy(model(x[sl]), y[sl]) / parts).backward()
            opt.step()
        return steps * sgd_batch / (now() - t)
    return run


def table(title: str, rates: dict[str, list[float]], ref: str) -> dict[str, float]:
    print(f"## {title}")
    print(f"{'case':44s} {'samples/s':>10s} {'spread':>12s} {'x ' + ref:>14s}")
    med = {k: median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k:44s} {med[k]:10.0f} {spread(v):>12s} {med[k] / med[ref]:14.3f}")
    print(flush=True)
    return med


def rivals(mnist, plan: dict[int, int], args) -> None:
    """Section 4: the rivals against bn on the cnn, and their targets."""
    from bknbench.config import RunConfig

    results = {}
    for b, steps in plan.items():
        data = subset(mnist, steps * b, 256)
        cases = {f"cnn {spec} b={b}": bknbench_rate(
            RunConfig(spec=spec, model="cnn", norm_batch=b, sgd_batch=b, epochs=1), data,
            args.device) for spec in ("bn",) + RIVALS}
        results[b] = table(f"rivals: cnn / mnist1d, micro-batch {b}",
                           interleaved(cases, args.repeats), f"cnn bn b={b}")
    print("## targets (rivals)")
    for spec in RIVALS:
        r = results[128][f"cnn {spec} b=128"] / results[128]["cnn bn b=128"]
        k = results[2][f"cnn {spec} b=2"] / results[2]["cnn bn b=2"]
        target = "(no target)" if spec == "cbn" else verdict(r, 0.80)
        print(f"cnn {spec:11s} / bn at 128: {r:.3f}  {target:28s} at 2: {k:.3f}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      flags={"--rivals-only": "only section 4, the rivals against bn"})
    import torch

    from bknbench.config import RunConfig
    from bknbench.data.registry import load_dataset

    torch.set_num_threads(args.threads)
    header("norm_throughput: training samples/s per normalizer", args)
    q = args.quick
    mnist = load_dataset("mnist1d")
    # steps per timed run, chosen so that one run takes about 0.2-1 s (full) on one core
    plan = {128: 10 if q else 30, 2: 60 if q else 200}
    if args.rivals_only:
        rivals(mnist, plan, args)
        return
    results = {}
    for b, steps in plan.items():
        data = subset(mnist, steps * b, 256)
        cases = {f"cnn {spec} b={b}": bknbench_rate(
            RunConfig(spec=spec, model="cnn", norm_batch=b, sgd_batch=b, epochs=1), data,
            args.device) for spec in NORMS}
        if args.device == "cpu":  # the C++ kernels are CPU-only
            cases[f"cnn bkn b={b} [torch nodes]"] = without_native(cases[f"cnn bkn b={b}"])
        results[b] = table(f"cnn / mnist1d, micro-batch {b}",
                           interleaved(cases, args.repeats), f"cnn bn b={b}")

    res_plan = {128: 1 if q else 3, 2: 10 if q else 30}
    res_results = {}
    for b, steps in res_plan.items():
        data = synthetic_images(steps * b, 64)
        cases = {f"resnet20 {spec} b={b}": bknbench_rate(
            RunConfig(spec=spec, model="resnet20", dataset="synthetic32", norm_batch=b,
                      sgd_batch=b, epochs=1, eval_batch=64), data, args.device)
            for spec in NORMS}
        if args.device == "cpu":
            cases[f"resnet20 bkn b={b} [torch nodes]"] = without_native(
                cases[f"resnet20 bkn b={b}"])
        res_results[b] = table(f"resnet20 / random 32x32x3, micro-batch {b}",
                               interleaved(cases, args.repeats), f"resnet20 bn b={b}")

    steps = 10 if q else 30
    data = subset(mnist, steps * 128, 256)
    cases = {
        "bn b=128": bknbench_rate(RunConfig(spec="bn", norm_batch=128, sgd_batch=128,
                                            epochs=1), data, args.device),
        "bn-accum b=2 -> sgd 128 (grouped forward)": bknbench_rate(
            RunConfig(spec="bn-accum", norm_batch=2, sgd_batch=128, epochs=1), data,
            args.device),
        "explicit loop 64 x b=2 -> sgd 128": explicit_accumulation_rate(
            data, max(2, steps // 5), args.device),
    }
    if args.device == "cpu":
        cases["bn-accum b=2 -> sgd 128 [torch nodes]"] = without_native(
            cases["bn-accum b=2 -> sgd 128 (grouped forward)"])
    acc = table("accumulation to SGD batch 128 from micro-batch 2 (cnn / mnist1d)",
                interleaved(cases, args.repeats), "bn b=128")

    print("## targets")
    bkn128 = results[128]["cnn bkn b=128"] / results[128]["cnn bn b=128"]
    print(f"cnn bkn / bn at 128:            {bkn128:.3f}  {verdict(bkn128, 0.90)}")
    r = res_results[128]["resnet20 bkn b=128"] / res_results[128]["resnet20 bn b=128"]
    print(f"resnet20 bkn / bn at 128:       {r:.3f}  (same target, informative)")
    a = acc["bn-accum b=2 -> sgd 128 (grouped forward)"]
    print(f"bn-accum / bn at 128:           {a / acc['bn b=128']:.3f}  "
          f"{verdict(a / acc['bn b=128'], 0.70)}")
    e = acc["explicit loop 64 x b=2 -> sgd 128"]
    print(f"bn-accum / explicit loop:       {a / e:.1f}  {verdict(a / e, 10.0)}")
    k = results[2]["cnn bkn b=2"] / results[2]["cnn bn b=2"]
    print(f"cnn bkn / bn at 2 (no target):  {k:.3f}")
    from bknbench.kernels import native
    print(f"kernels: {native.status()} (the [torch nodes] cases: the PyTorch autograd nodes)")
    print(flush=True)
    rivals(mnist, plan, args)


if __name__ == "__main__":
    main()
