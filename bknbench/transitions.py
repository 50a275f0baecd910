"""BKN transitions: how per-channel statistics (G, C) travel through the ops between two
normalization layers.

Analytic (ours): closed-form moments per op. The reference rules (`relu_moments`,
`affine_moments`, ...) define the values; `relu_affine_moments` computes ReLU followed by a
linear or convolution layer, the pair between almost every two norms, as one autograd node
with the same values. Sampled (the authors'): push Gaussian draws through the ops.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from . import native
from .fused import group_moments

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_VAR_FLOOR = 1e-12  # below this the input is treated as a constant (sd fixed at 1e-6)


# ---------------------------------------------------------------- reference rules
def _relu_terms(mean, var):
    """sd, Phi(a), phi(a), E[ReLU z] and the unclamped Var[ReLU z] for z ~ N(mean, var)."""
    sd = var.clamp_min(_VAR_FLOOR).sqrt()
    a = mean / sd
    cdf = torch.special.ndtr(a)
    pdf = torch.exp(a.square().mul(-0.5)).mul(_INV_SQRT_2PI)
    m1 = torch.addcmul(sd * pdf, mean, cdf)
    # E[y^2] = (mean^2 + var) Phi + mean sd phi = mean (mean Phi + sd phi) + var Phi
    v1_raw = torch.addcmul(torch.addcmul(var * cdf, mean, m1), m1, m1, value=-1.0)
    return sd, cdf, pdf, m1, v1_raw


def relu_moments(mean, var):
    """Mean and variance of ReLU(z), z ~ N(mean, var), elementwise. With sd = sqrt(var),
    a = mean / sd: E[y] = mean Phi(a) + sd phi(a); E[y^2] = (mean^2 + var) Phi(a) + mean sd phi(a).
    """
    *_, m1, v1_raw = _relu_terms(mean, var)
    return m1, v1_raw.clamp_min(0.0)


def _kernel_sums(weight, c_in: int):
    """(W summed over kernel positions, W^2 summed), each (C_out, C_in)."""
    w = weight.reshape(weight.shape[0], c_in, -1)
    return w.sum(-1), w.square().sum(-1)


def affine_moments(mean, var, weight, bias=None):
    """Per-channel moments after a convolution or linear layer.

    mean, var: (G, C_in). weight: (C_out, C_in, *kernel) for a convolution, or
    (C_out, C_in * P) for a linear layer fed by a flattened (C_in, P) map.
    mean_out = (W summed over kernel positions) @ mean + b; var_out = (W^2 summed) @ var.
    Approximations: inputs independent across channels and positions, identically
    distributed over positions, and zero padding at the borders ignored.
    Returns (G, C_out), (G, C_out).
    """
    w_sum, w2_sum = _kernel_sums(weight, mean.shape[1])
    out_mean = mean @ w_sum.t()
    if bias is not None:
        out_mean = out_mean + bias
    return out_mean, var @ w2_sum.t()


def _pool_moments(op, mean, var):
    # non-overlapping windows of independent values: the variance shrinks by the area
    k = op.kernel_size
    if isinstance(k, int):
        k = (k, k) if isinstance(op, nn.AvgPool2d) else (k,)
    return mean, var / math.prod(k)


# ---------------------------------------------------------------- ReLU -> affine, fused
class _ReluAffine(torch.autograd.Function):
    """``affine_moments(*relu_moments(mean, var), weight, bias)`` as one autograd node.

    Autograd through the reference rules takes ~60 small ops per transition; at micro-batch
    sizes their dispatch overhead, not arithmetic, is BKN's cost. The backward uses the
    Gaussian identities d E[ReLU z]/d mean = Phi(a), d E[ReLU z]/d var = phi(a) / (2 sd),
    d E[(ReLU z)^2]/d mean = 2 E[ReLU z], d E[(ReLU z)^2]/d var = Phi(a).
    """

    @staticmethod
    def forward(ctx, mean, var, weight, bias):
        sd, cdf, pdf, m1, v1_raw = _relu_terms(mean, var)
        v1 = v1_raw.clamp_min(0.0)
        w_sum, w2_sum = _kernel_sums(weight, mean.shape[1])
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
        g_m1 = g_mean @ w_sum  # (G, C_in)
        g_v1 = (g_var @ w2_sum).mul_(v1_raw >= 0)  # clamp_min passes the gradient at >= 0
        # weight: d/dW of sum_k W_k (mean side) and sum_k W_k^2 (variance side)
        w = weight.reshape(weight.shape[0], w_sum.shape[1], -1)
        g_w = torch.addcmul((g_mean.t() @ m1).unsqueeze(-1), w,
                            (g_var.t() @ v1).unsqueeze(-1), value=2.0).reshape(weight.shape)
        g_bias = g_mean.sum(0) if ctx.has_bias else None
        # through the ReLU moments; v1 = E[y^2] - m1^2
        g_in_mean = torch.addcmul(g_m1 * cdf, g_v1, m1 * (1.0 - cdf), value=2.0)
        # sd = sqrt(max(var, floor)): the phi terms reach var only above the floor
        half_pdf_sd = (pdf / sd).mul_(var > _VAR_FLOOR)  # phi / sd
        g_in_var = torch.addcmul(g_v1 * cdf, g_m1 - 2.0 * g_v1 * m1, half_pdf_sd, value=0.5)
        return g_in_mean, g_in_var, g_w, g_bias


def relu_affine_moments(mean, var, weight, bias=None):
    """Moments after ReLU then a linear or convolution layer (see `_ReluAffine`).
    mean, var: (G, C_in) -> (G, C_out), (G, C_out). On the C++ kernel of `native` when it
    applies; under torch.compile: the reference rules, which the compiler fuses."""
    if torch.compiler.is_compiling():
        return affine_moments(*relu_moments(mean, var), weight, bias)
    if native.usable(mean, var, weight, bias):
        return tuple(native.module().relu_affine(mean, var, weight, bias))
    return _ReluAffine.apply(mean, var, weight, bias)


def _is_affine(op: nn.Module) -> bool:
    return isinstance(op, nn.Linear) or (
        isinstance(op, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and op.groups == 1)


# ---------------------------------------------------------------- rules per op
def analytic_rule(op: nn.Module):
    """The moment rule for one module, or None. A module may define ``moments(mean, var)``
    itself (the ResNet shortcut does)."""
    if hasattr(op, "moments"):
        return op.moments
    if isinstance(op, nn.ReLU):
        return relu_moments
    if _is_affine(op):
        return lambda mean, var: affine_moments(mean, var, op.weight, op.bias)
    if isinstance(op, (nn.AvgPool1d, nn.AvgPool2d)):
        return lambda mean, var: _pool_moments(op, mean, var)
    if isinstance(op, (nn.Flatten, nn.Identity, nn.Dropout)):
        return lambda mean, var: (mean, var)
    return None


def op_moments(op: nn.Module, mean, var):
    """Push per-channel moments (G, C) through one module analytically."""
    rule = analytic_rule(op)
    if rule is None:
        raise TypeError(f"no analytic moments for {op}; use transition=sampled")
    return rule(mean, var)


def chain_rules(ops) -> list:
    """The analytic rule of each op, a ReLU followed by a linear or convolution layer
    taken as one fused rule; an op without a rule raises `op_moments`' TypeError when used.
    (Flatten and Identity between them change nothing and are skipped.)"""
    ops = [op for op in ops if not isinstance(op, (nn.Flatten, nn.Identity))]
    rules, i = [], 0
    while i < len(ops):
        if isinstance(ops[i], nn.ReLU) and i + 1 < len(ops) and _is_affine(ops[i + 1]):
            op = ops[i + 1]
            rules.append(lambda mean, var, op=op: relu_affine_moments(mean, var, op.weight,
                                                                        op.bias))
            i += 2
            continue
        rules.append(analytic_rule(ops[i]) or partial(op_moments, ops[i]))
        i += 1
    return rules


# ---------------------------------------------------------------- sampled
def sampled_moments(mean, var, ops, in_shape, draws: int):
    """Monte-Carlo transition (the authors' estimator): draw ``draws`` inputs per group of
    shape (C, *spatial) from N(mean, var), apply the ops with their current weights
    (gradients flow), return the per-channel mean and biased variance of the result over
    draws and positions. mean, var: (G, C) -> (G, C_out), (G, C_out)."""
    g, c = mean.shape
    spatial = tuple(in_shape)
    view = (g, 1, c) + (1,) * len(spatial)
    noise = torch.randn((g, draws, c) + spatial, dtype=mean.dtype, device=mean.device)
    z = torch.addcmul(mean.view(view), var.clamp_min(0).sqrt().view(view), noise)
    z = z.reshape((g * draws, c) + spatial)
    for op in ops:
        z = op(z)
    return group_moments(z, g)
