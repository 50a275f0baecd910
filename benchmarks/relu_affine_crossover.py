"""Where the C++ relu_affine and relu_conv kernels stop paying: each kernel against its
PyTorch node (`kernels.relu._ReluAffine`, `kernels.borders._ReluConv`, whose matrix
products run on BLAS), forward and backward, on one thread, for G groups x C_in x C_out
channel triples (x R border patterns for relu_conv). The median of 5 repeats of 200 calls
each, side by side; the ratios decide `relu.NATIVE_RELU_AFFINE_MAX` and
`borders.NATIVE_RELU_CONV_MAX`.

    .venv/bin/python benchmarks/relu_affine_crossover.py
"""
from __future__ import annotations

import statistics
import time

import torch

from bknbench.kernels import native
from bknbench.kernels.borders import NATIVE_RELU_CONV_MAX, _axes_tensors, _ReluConv, conv_axis
from bknbench.kernels.relu import NATIVE_RELU_AFFINE_MAX, _ReluAffine

AFFINE = [(1, 128, 128, ()), (2, 128, 128, ()), (4, 128, 128, ()), (8, 128, 128, ()),
          (64, 128, 128, ()), (1, 32, 64, (3, 3)), (8, 32, 64, (3, 3)), (64, 32, 64, (3, 3))]
# relu_conv: (G, C_in, C_out, map, kernel, stride), padding kernel // 2 (the models' convs):
# the CNN's transitions on mnist1d (1-D, 40 long) and digits (8x8), resnet20's on 32x32
CONV = [(1, 32, 32, (40,), 3, 2), (1, 64, 64, (10,), 3, 1), (4, 64, 64, (10,), 3, 1),
        (8, 64, 64, (10,), 3, 1), (16, 64, 64, (10,), 3, 1), (64, 64, 64, (10,), 3, 1),
        (1, 32, 64, (4, 4), 3, 2), (1, 64, 64, (2, 2), 3, 1), (4, 64, 64, (2, 2), 3, 1),
        (8, 64, 64, (2, 2), 3, 1), (16, 64, 64, (2, 2), 3, 1), (64, 64, 64, (2, 2), 3, 1),
        (1, 16, 16, (32, 32), 3, 1), (1, 64, 64, (8, 8), 3, 1), (4, 64, 64, (8, 8), 3, 1),
        (8, 64, 64, (8, 8), 3, 1), (1, 128, 128, (8, 8), 3, 1), (4, 128, 128, (4, 4), 3, 1)]


def per_call_us(fns, calls: int = 200, repeats: int = 5) -> list[float]:
    """Median us per call of each function, their repeats round-robin (a slow patch of
    the machine hits every one alike)."""
    for fn in fns:
        for _ in range(20):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            t.append((time.perf_counter() - start) / calls * 1e6)
    return [statistics.median(t) for t in times]


def timed(g, ci, co, k, cpp, node, extra=()):
    """(C++ us, node us) per call of forward and backward at G x C_in -> C_out."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(g, ci, generator=gen).requires_grad_()
    var = (torch.rand(g, ci, generator=gen) + 0.1).requires_grad_()
    weight = torch.randn(co, ci, *k, generator=gen).requires_grad_()

    def run(fn):
        def call():
            m, v = fn(mean, var, weight, None, *extra)
            (m.sum() + v.sum()).backward()
        return call
    return per_call_us([run(cpp), run(node)])


def main() -> None:
    torch.set_num_threads(1)
    kernel = native.module()
    if kernel is None:
        raise SystemExit("the C++ kernels are not built: python -m bknbench.kernels.native")
    print(f"{'op':>6} {'G':>3} {'C_in':>4} {'C_out':>5} {'kernel':>6} {'map':>6} {'R':>2} "
          f"{'size':>8} {'C++ us':>8} {'node us':>8} {'C++/node':>8}  used")
    rows = [("affine", g, ci, co, k, "-", 1, kernel.relu_affine, _ReluAffine.apply, (),
             NATIVE_RELU_AFFINE_MAX) for g, ci, co, k in AFFINE]
    for g, ci, co, shape, k, stride in CONV:
        axes = tuple(conv_axis(n, k, stride, k // 2, k // 2, 1) for n in shape)
        mask, share = _axes_tensors(axes, torch.float32, torch.device("cpu"))
        rows.append(("conv", g, ci, co, (k,) * len(shape), "x".join(map(str, shape)),
                     mask.shape[0], kernel.relu_conv, _ReluConv.apply, (mask, share),
                     NATIVE_RELU_CONV_MAX))
    for op, g, ci, co, k, where, r, cpp, node, extra, limit in rows:
        cpp_us, node_us = timed(g, ci, co, k, cpp, node, extra)
        size = g * ci * co * r  # relu_affine: R = 1
        print(f"{op:>6} {g:>3} {ci:>4} {co:>5} {'x'.join(map(str, k)) or '-':>6} {where:>6} "
              f"{r:>2} {size:>8} {cpp_us:>8.0f} {node_us:>8.0f} {cpp_us / node_us:>8.2f}  "
              f"{'C++' if size <= limit else 'node'}", flush=True)


if __name__ == "__main__":
    main()
