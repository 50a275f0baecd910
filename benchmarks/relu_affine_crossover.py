"""Where the C++ relu_affine kernel stops paying: the kernel against the PyTorch node
(`kernels.fused._ReluAffine`, whose matrix products run on BLAS), forward and backward, on
one thread, for G groups x C_in x C_out channel triples. The median of 5 repeats of 200
calls each, side by side; the ratio decides `fused.NATIVE_RELU_AFFINE_MAX`.

    .venv/bin/python benchmarks/relu_affine_crossover.py
"""
from __future__ import annotations

import statistics
import time

import torch

from bknbench.kernels import native
from bknbench.kernels.fused import NATIVE_RELU_AFFINE_MAX, _ReluAffine

SHAPES = [(1, 128, 128, ()), (2, 128, 128, ()), (4, 128, 128, ()), (8, 128, 128, ()),
          (64, 128, 128, ()), (1, 32, 64, (3, 3)), (8, 32, 64, (3, 3)), (64, 32, 64, (3, 3))]


def per_call_us(fn, calls: int = 200, repeats: int = 5) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    kernel = native.module()
    if kernel is None:
        raise SystemExit("the C++ kernels are not built: python -m bknbench.kernels.native")
    print(f"{'G':>3} {'C_in':>4} {'C_out':>5} {'kernel':>6} {'triples':>8} "
          f"{'C++ us':>8} {'node us':>8} {'C++/node':>8}  used")
    for g, ci, co, k in SHAPES:
        gen = torch.Generator().manual_seed(0)
        mean = torch.randn(g, ci, generator=gen).requires_grad_()
        var = (torch.rand(g, ci, generator=gen) + 0.1).requires_grad_()
        weight = torch.randn(co, ci, *k, generator=gen).requires_grad_()

        def run(fn):
            def call():
                m, v = fn(mean, var, weight, None)
                (m.sum() + v.sum()).backward()
            return call

        cpp = per_call_us(run(kernel.relu_affine))
        node = per_call_us(run(_ReluAffine.apply))
        used = "C++" if g * ci * co <= NATIVE_RELU_AFFINE_MAX else "node"
        print(f"{g:>3} {ci:>4} {co:>5} {'x'.join(map(str, k)) or '-':>6} {g * ci * co:>8} "
              f"{cpp:>8.0f} {node:>8.0f} {cpp / node:>8.2f}  {used}")


if __name__ == "__main__":
    main()
