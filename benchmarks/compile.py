"""`--compile` (torch.compile) against eager mode: steady-state training step time, and the
one-off compile cost.

    python benchmarks/compile.py [--quick] [--threads 1] [--repeats 5] [--device cpu]

Each case is bknbench's own training step (the model of `make_model`, the optimizer of
`make_optimizer`, forward, cross-entropy, zero_grad, backward, SGD step) on the cnn for
digits, 8x8 images, at micro-batch 2 and 128, for bn and bkn. The compiled model is
built once and warmed up (compiled) before timing, so the figures are steady state; the
compile time (first call, including dynamo and inductor) is printed beside them. A real
run pays that cost once per run: with few steps it can exceed the saving. Inductor caches
what it compiled on disk, so a second invocation compiles faster; for cold figures run with
TORCHINDUCTOR_CACHE_DIR set to an empty folder.
"""
from __future__ import annotations

from common import header, interleaved, median, parse_args, spread, stopwatch, timed

SPECS = ("bn", "bkn")


def step_case(spec: str, b: int, compiled: bool, steps: int, device: str):
    """A case: `steps` training steps on fixed random data; returns (case, compile seconds)."""
    import torch
    import torch.nn.functional as F

    from bknbench.config import RunConfig
    from bknbench.models.registry import make_model
    from bknbench.norms.registry import parse_spec
    from bknbench.train import make_optimizer

    torch.manual_seed(0)
    model = make_model("cnn", parse_spec(spec), b, (1, 8, 8), 10).to(device)
    opt = make_optimizer(model, RunConfig(spec=spec, dataset="digits", norm_batch=b,
                                          sgd_batch=b))
    fn = torch.compile(model) if compiled else model
    x = torch.randn(b, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    now = stopwatch(device)

    def one():
        loss = F.cross_entropy(fn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = now()
    one()  # compiles forward and backward when compiled
    first = now() - t

    def run():
        for _ in range(steps):
            one()
    return timed(run, now), first


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch

    torch.set_num_threads(args.threads)
    header("compile: torch.compile vs eager, training step", args)
    steps = {2: 100 if args.quick else 300, 128: 10 if args.quick else 30}
    print(f"{'case':22s} {'eager ms':>9s} {'spread':>10s} {'compiled ms':>12s} {'spread':>10s} "
          f"{'speed-up':>9s} {'compile s':>10s}")
    for spec in SPECS:
        for b, n in steps.items():
            eager, _ = step_case(spec, b, False, n, args.device)
            compiled, first = step_case(spec, b, True, n, args.device)
            r = interleaved({"eager": eager, "compiled": compiled}, args.repeats)
            e, c = median(r["eager"]) / n * 1e3, median(r["compiled"]) / n * 1e3
            print(f"cnn {spec} b={b:<13d} {e:9.3f} {spread(r['eager']):>10s} {c:12.3f} "
                  f"{spread(r['compiled']):>10s} {e / c:9.2f} {first:10.1f}", flush=True)


if __name__ == "__main__":
    main()
