"""gpu_check.py's timed sections: speed (samples/s, bkn/bn and bn-accum/bn) and CUDA graphs
(capture and replay of one training step against eager). Rows as in gpu_sections.py."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bknbench.device import sync
from gpu_sections import Ctx, batch, build, each, error, row, sgd, state, step

TRIO = ("bn", "bkn", "bn-accum")


def rate(ctx: Ctx, spec, model, shape, nb, amp, channels_last, steps) -> float:
    """Training samples per second over ``steps`` steps after two warm-up steps."""
    n = (8 if ctx.dry else 128) if spec == "bn-accum" else nb  # bn-accum: SGD batch 128
    net = build(spec, model, ctx.device, shape=shape, norm_batch=nb)
    x, y = batch(model, ctx.device, n=n, shape=shape)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = sgd(net, lr=0.01)
    for _ in range(2):
        step(net, opt, x, y, amp)
    sync(ctx.device)
    t = time.perf_counter()
    for _ in range(steps):
        step(net, opt, x, y, amp)
    sync(ctx.device)
    return steps * n / (time.perf_counter() - t)


def speed(ctx: Ctx) -> list[dict]:
    """cnn and resnet20 on 32x32 images (8x8 in the dry run), micro-batch 2 and 128 (8),
    with and without amp and channels_last: samples/s of bn, bkn, bn-accum, and ratios."""
    shape, steps = ((3, 8, 8), 1) if ctx.dry else ((3, 32, 32), 20)
    sizes = (2, 8) if ctx.dry else (2, 128)

    def check(item):
        model, nb, amp, cl = item
        r = {s: rate(ctx, s, model, shape, nb, amp, cl, steps) for s in TRIO}
        return [row("speed", f"{model} b={nb} amp={int(amp)} channels_last={int(cl)}", True,
                    f"samples/s bn {r['bn']:.0f}, bkn {r['bkn']:.0f}, bn-accum "
                    f"{r['bn-accum']:.0f}; bkn/bn {r['bkn'] / r['bn']:.2f}, bn-accum/bn "
                    f"{r['bn-accum'] / r['bn']:.2f}", samples_per_s=r)]
    items = [(m, nb, amp, cl) for m in ("cnn", "resnet20") for nb in sizes
             for amp in (False, True) for cl in (False, True)]
    if ctx.dry:  # the script's paths, once each
        items = [("cnn", 2, False, False), ("resnet20", 8, True, True)]
    return each(ctx, "speed", items, check)


# ---------------------------------------------------------------- CUDA graphs
def captured(ctx: Ctx, spec, nb, shape):
    """A cnn with ``spec`` at micro-batch nb, three eager steps (on a side stream, as
    capture wants), then one forward + backward + SGD step (lr a device tensor) captured:
    (net, graph)."""
    net = build(spec, "cnn", ctx.device, shape=shape, norm_batch=nb)
    # fused: the foreach SGD reads a tensor lr to the host (alpha=-lr), which capture forbids
    opt = torch.optim.SGD(net.parameters(), lr=torch.tensor(0.01, device=ctx.device),
                          momentum=0.9, fused=True)
    x, y = batch("cnn", ctx.device, n=nb, shape=shape)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(net, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, graph, (opt, x, y)


def eager_twin(ctx: Ctx, spec, nb, shape, steps):
    net = build(spec, "cnn", ctx.device, shape=shape, norm_batch=nb)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9,
                          fused=ctx.device.type == "cuda")  # as the captured one's
    x, y = batch("cnn", ctx.device, n=nb, shape=shape)
    for _ in range(steps):
        step(net, opt, x, y)
    return net, opt, x, y


def per_step(ctx: Ctx, fn, steps: int) -> float:
    sync(ctx.device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(ctx.device)
    return (time.perf_counter() - t) / steps


def graphs(ctx: Ctx) -> list[dict]:
    """bn and bkn at micro-batch 1, 2, 128: captured, replays equal to eager steps, replay
    vs eager time per step. Every other spec at 2: captured or what blocks it. Dry run: the
    eager steps only (capture needs CUDA)."""
    shape = (3, 8, 8) if ctx.dry else (3, 32, 32)
    if ctx.dry:
        def dry(spec):
            eager_twin(ctx, spec, 2, shape, 2)
            return [row("graphs", spec, None, "capture needs CUDA; its eager step ran")]
        return each(ctx, "graphs", ("bn", "bkn"), dry)

    def replayed(spec, nb):
        net, graph, _ = captured(ctx, spec, nb, shape)
        twin, opt, x, y = eager_twin(ctx, spec, nb, shape, 3)
        for _ in range(2):
            graph.replay()
            step(twin, opt, x, y)
        return error(state(net), [t.cpu().double() for t in state(twin)]), graph, twin, opt, x, y

    def check(item):
        spec, nb = item
        if spec not in ("bn", "bkn"):  # what blocks capture: information, not a failure
            try:
                diff = replayed(spec, nb)[0]
            except Exception as e:  # noqa: BLE001
                return [row("graphs", f"{spec} b={nb}", None, "blocked: " + (
                    str(e).strip().splitlines() or [type(e).__name__])[0][:160])]
            return [row("graphs", f"{spec} b={nb}", None, f"captured; replay vs eager {diff:.1e}")]
        diff, graph, twin, opt, x, y = replayed(spec, nb)
        t_replay = per_step(ctx, graph.replay, 20)
        t_eager = per_step(ctx, lambda: step(twin, opt, x, y), 20)
        return [row("graphs", f"{spec} b={nb}", diff < 1e-4,
                    f"replay vs eager {diff:.1e}; {t_replay * 1e3:.2f} ms vs "
                    f"{t_eager * 1e3:.2f} ms per step ({t_eager / t_replay:.1f}x)",
                    replay_ms=t_replay * 1e3, eager_ms=t_eager * 1e3)]
    items = [(s, nb) for s in ("bn", "bkn") for nb in (1, 2, 128)]
    items += [(s, 2) for s in ctx.specs if s not in ("bn", "bkn")]
    return each(ctx, "graphs", items, check)
