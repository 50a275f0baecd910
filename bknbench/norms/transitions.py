"""BKN transitions: how per-channel statistics (G, C) travel through the ops between two
normalization layers.

Analytic (ours): closed-form moments per op. The reference rules (`relu_moments`,
`affine_moments`, ... in kernels/reference.py) define the values; `relu_affine_moments`
(kernels/fused.py) computes ReLU followed by a linear or convolution layer, the pair between
almost every two norms, as one autograd node with the same values. Sampled (the authors'):
push Gaussian draws through the ops.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ..kernels.fused import group_moments, relu_affine_moments
from ..kernels.reference import affine_moments, relu_moments


def _pool_moments(op, mean, var):
    # non-overlapping windows of independent values: the variance shrinks by the area
    k = op.kernel_size
    if isinstance(k, int):
        k = (k, k) if isinstance(op, nn.AvgPool2d) else (k,)
    return mean, var / math.prod(k)


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
