"""ReLU then a linear or convolution layer, on Gaussian moments (BKN's analytic transition
between almost every two norms), as one autograd node, and the ReLU-moment backward it
shares with the exact-border transition (borders.py).

`reference.relu_moments` then `reference.affine_moments` define the values; tests hold the
node and its C++ kernel (native.py) to them, values and gradients.
"""
from __future__ import annotations

import torch

from . import native
from .reference import VAR_FLOOR, affine_moments, kernel_sums, relu_moments, relu_terms


def relu_moments_backward(g_m1, g_v1, var, sd, cdf, pdf, m1, v1_raw):
    """Gradients into (mean, var) of z from those of (E[ReLU z], clamped Var[ReLU z]), with
    the terms of `relu_terms`. Gaussian identities: d E[ReLU z]/d mean = Phi(a),
    d E[ReLU z]/d var = phi(a) / (2 sd), d E[(ReLU z)^2]/d mean = 2 E[ReLU z],
    d E[(ReLU z)^2]/d var = Phi(a); v1 = E[y^2] - m1^2."""
    g_v1 = g_v1 * (v1_raw >= 0)  # clamp_min passes the gradient at >= 0
    g_in_mean = torch.addcmul(g_m1 * cdf, g_v1, m1 * (1.0 - cdf), value=2.0)
    # sd = sqrt(max(var, floor)): the phi terms reach var only above the floor
    half_pdf_sd = (pdf / sd).mul_(var > VAR_FLOOR)  # phi / sd
    return g_in_mean, torch.addcmul(g_v1 * cdf, g_m1 - 2.0 * g_v1 * m1, half_pdf_sd, value=0.5)


class _ReluAffine(torch.autograd.Function):
    """``affine_moments(*relu_moments(mean, var), weight, bias)`` as one autograd node.

    Autograd through the reference rules takes ~60 small ops per transition; at micro-batch
    sizes their dispatch overhead, not arithmetic, is BKN's cost. The backward through the
    ReLU is `relu_moments_backward`.
    """

    @staticmethod
    def forward(ctx, mean, var, weight, bias):
        sd, cdf, pdf, m1, v1_raw = relu_terms(mean, var)
        v1 = v1_raw.clamp_min(0.0)
        w_sum, w2_sum = kernel_sums(weight, mean.shape[1])
        out_mean = m1 @ w_sum.t() if bias is None else torch.addmm(bias, m1, w_sum.t())
        ctx.save_for_backward(var, sd, cdf, pdf, m1, v1_raw, v1, weight, w_sum, w2_sum)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return out_mean, v1 @ w2_sum.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean, g_var):
        var, sd, cdf, pdf, m1, v1_raw, v1, weight, w_sum, w2_sum = ctx.saved_tensors
        if g_mean is None:
            g_mean = torch.zeros_like(m1[:, :1]).expand(-1, w_sum.shape[0])
        if g_var is None:
            g_var = torch.zeros_like(v1[:, :1]).expand(-1, w2_sum.shape[0])
        # weight: d/dW of sum_k W_k (mean side) and sum_k W_k^2 (variance side)
        w = weight.reshape(weight.shape[0], w_sum.shape[1], -1)
        g_w = torch.addcmul((g_mean.t() @ m1).unsqueeze(-1), w,
                            (g_var.t() @ v1).unsqueeze(-1), value=2.0).reshape(weight.shape)
        g_bias = g_mean.sum(0) if ctx.has_bias else None
        g_in_mean, g_in_var = relu_moments_backward(g_mean @ w_sum, g_var @ w2_sum, var, sd,
                                                    cdf, pdf, m1, v1_raw)
        return g_in_mean, g_in_var, g_w, g_bias


# Above this many (group, input, output) channel triples the node's matrix products on
# BLAS beat the C++ kernel's loops; below it the kernel's single call wins. Measured on one
# thread, forward and backward (benchmarks/relu_affine_crossover.py, median of 5): the
# kernel takes 0.71x the node's time at G=1 with 128 x 128 channels and 0.43x at G=1 on a
# 3x3 conv of 32 -> 64; 0.95x at 2 x 128 x 128; 2.4x at 8 x 128 x 128 and 10.7x at
# 64 x 128 x 128 (the paper's protocol: 64 groups of 2).
NATIVE_RELU_AFFINE_MAX = 1 << 15


def relu_affine_moments(mean, var, weight, bias=None):
    """Moments after ReLU then a linear or convolution layer (see `_ReluAffine`).
    mean, var: (G, C_in) -> (G, C_out), (G, C_out). On the C++ kernel of `native` when it
    applies and the problem is small (NATIVE_RELU_AFFINE_MAX), else the node; under
    torch.compile: the reference rules, which the compiler fuses."""
    if torch.compiler.is_compiling():
        return affine_moments(*relu_moments(mean, var), weight, bias)
    if (mean.shape[0] * mean.shape[1] * weight.shape[0] <= NATIVE_RELU_AFFINE_MAX
            and native.usable(mean, var, weight, bias)):
        return tuple(native.module().relu_affine(mean, var, weight, bias))
    return _ReluAffine.apply(mean, var, weight, bias)
