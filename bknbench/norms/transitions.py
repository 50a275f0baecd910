"""BKN transitions: how per-channel statistics (G, C) travel through the ops between two
normalization layers.

Analytic (ours): closed-form moments per op, each rule ``rule(mean, var, shape) -> (mean,
var, shape)`` carrying the spatial shape of the map (the source layer's input shape at the
start; convolutions and pooling change it, Flatten and Linear end it). The formulas live in
kernels/: `relu_moments`, `affine_moments` (reference.py), the border-aware `conv_moments`
and `pool_moments` (borders.py). ReLU followed by a linear or convolution layer, the pair
between almost every two norms, is one autograd node: `relu_affine_moments` (kernels/relu.py, and
its C++ kernel) where borders change nothing, `relu_conv_moments` (borders.py) where they do.
Sampled (the authors'): push Gaussian draws through the ops.

Borders (``borders=``): "exact" averages over all output positions, zero padding included
(kernels/borders.py); "ignore" treats every output position as if its kernel lay inside the
map (and average pooling as non-overlapping full windows), the rule before borders were
modelled. Approximations of both: inputs independent across channels and positions, and
Gaussian where a ReLU acts.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.borders import (adaptive_axis, conv_axis, conv_moments, dense_weight,
                               pool_axis, pool_moments, relu_conv_moments, trivial)
from ..kernels.fused import group_moments
from ..kernels.relu import relu_affine_moments
from ..kernels.reference import affine_moments, relu_moments
from ..kernels.reference import full_precision  # noqa: F401 (kalman.py imports it from here)

BORDERS = ("exact", "ignore")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _per_dim(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


# ---------------------------------------------------------------- geometry of a module
def conv_axes(op: nn.Module, shape: tuple[int, ...]):
    """The `conv_axis` geometry of each spatial dim of a convolution on maps of ``shape``."""
    dims = len(op.kernel_size)
    if len(shape) != dims:
        raise ValueError(f"{op} needs a {dims}-D map, the transition carries shape {shape}")
    k, s, dil = op.kernel_size, _per_dim(op.stride, dims), _per_dim(op.dilation, dims)
    if hasattr(op, "same_pads"):  # padded by the op itself (models/resnet.py SamePadConv2d)
        pads = op.same_pads(shape)
    elif op.padding == "valid":
        pads = [(0, 0)] * dims
    elif op.padding == "same":  # torch puts the odd extra pad on the right
        pads = [(d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2) for kk, d in zip(k, dil)]
    else:
        pads = [(p, p) for p in _per_dim(op.padding, dims)]
    zeros = op.padding_mode == "zeros"
    return tuple(conv_axis(n, kk, ss, lo, hi, d, zeros)
                 for n, kk, ss, (lo, hi), d in zip(shape, k, s, pads, dil))


def pool_axes(op: nn.Module, shape: tuple[int, ...]):
    """The `pool_axis` / `adaptive_axis` geometry of average pooling on maps of ``shape``."""
    dims = len(shape)
    if isinstance(op, ADAPTIVE):
        out = _per_dim(op.output_size, dims)
        return tuple(adaptive_axis(n, o if o is not None else n) for n, o in zip(shape, out))
    k = _per_dim(op.kernel_size, dims)
    s = _per_dim(op.stride if op.stride is not None else op.kernel_size, dims)
    pad = _per_dim(op.padding, dims)
    return tuple(pool_axis(n, kk, ss, pp, op.ceil_mode, op.count_include_pad)
                 for n, kk, ss, pp in zip(shape, k, s, pad))


def _out_shape(axes) -> tuple[int, ...]:
    return tuple(out for _, _, out in axes)


# ---------------------------------------------------------------- rules per op
def _affine(op, borders: str, relu: bool):
    """The rule of a linear or convolution layer, after a ReLU when ``relu``."""
    groups = getattr(op, "groups", 1)
    known = {}  # map shape -> its geometry: the op's is fixed, worked out once per shape

    def geometry(shape):
        """(axes, out shape, whether borders change nothing) on maps of ``shape``."""
        if isinstance(op, nn.Linear):  # a flattened map: every input is read, no borders
            return None, (), True
        axes = conv_axes(op, shape)
        return axes, _out_shape(axes), borders == "ignore" or trivial(axes)

    def rule(mean, var, shape):
        if torch.compiler.is_compiling():  # the compiler traces the geometry, not a cache
            axes, out, plain = geometry(shape)
        else:
            axes, out, plain = known.get(shape) or known.setdefault(shape, geometry(shape))
        if plain:
            if relu and groups == 1:  # the fused node (and C++ kernel)
                return (*relu_affine_moments(mean, var, op.weight, op.bias), out)
            if relu:
                mean, var = relu_moments(mean, var)
            return (*affine_moments(mean, var, dense_weight(op.weight, groups), op.bias), out)
        if relu:  # the fused node of borders.py
            return (*relu_conv_moments(mean, var, op.weight, op.bias, axes, groups), out)
        return (*conv_moments(mean, var, op.weight, op.bias, axes, groups), out)
    return rule


def _pool(op, borders: str):
    def rule(mean, var, shape):
        axes = pool_axes(op, shape)
        if borders == "ignore" and isinstance(op, POOLS):  # full windows, no overlap
            area = 1
            for k in _per_dim(op.kernel_size, len(shape)):
                area *= k
            return mean, var / area, _out_shape(axes)
        return (*pool_moments(mean, var, axes, getattr(op, "divisor_override", None)),
                _out_shape(axes))
    return rule


def _relu(mean, var, shape):
    return (*relu_moments(mean, var), shape)


def _same(mean, var, shape):
    return mean, var, shape


def _flatten(mean, var, shape):
    return mean, var, ()


def analytic_rule(op: nn.Module, borders: str = "exact"):
    """The moment rule ``(mean, var, shape) -> (mean, var, shape)`` of one module, or None.
    A module may define ``moments(mean, var, shape)`` itself (the ResNet shortcut does)."""
    if hasattr(op, "moments"):
        return op.moments
    if isinstance(op, nn.ReLU):
        return _relu
    if isinstance(op, (nn.Linear,) + CONVS):
        return _affine(op, borders, relu=False)
    if isinstance(op, POOLS + ADAPTIVE):
        return _pool(op, borders)
    if isinstance(op, nn.Flatten):
        return _flatten
    if isinstance(op, (nn.Identity, nn.Dropout)):
        return _same
    return None


def op_moments(op: nn.Module, mean, var, shape=(), borders: str = "exact"):
    """Push per-channel moments (G, C) of a map of spatial ``shape`` through one module
    analytically: (mean, var, shape) after it."""
    rule = analytic_rule(op, borders)
    if rule is None:
        raise TypeError(f"no analytic moments for {op}; use transition=sampled")
    return rule(mean, var, shape)


def chain_rules(ops, borders: str = "exact") -> list:
    """The analytic rule of each op, a ReLU followed by a linear or convolution layer
    taken as one rule (the fused node where borders change nothing); an op without a rule
    raises `op_moments`' TypeError when used. (Identity between them changes nothing, and
    a Flatten before a Linear only ends the shape, which the Linear's rule does too.)"""
    ops = [op for op in ops if not isinstance(op, (nn.Flatten, nn.Identity))]
    rules, i = [], 0
    while i < len(ops):
        if (isinstance(ops[i], nn.ReLU) and i + 1 < len(ops)
                and isinstance(ops[i + 1], (nn.Linear,) + CONVS)):
            rules.append(_affine(ops[i + 1], borders, relu=True))
            i += 2
            continue
        op = ops[i]
        rules.append(analytic_rule(op, borders)
                     or (lambda mean, var, shape, op=op: op_moments(op, mean, var, shape)))
        i += 1
    return rules


def exact_without_sampling(ops) -> bool:
    """Whether ops have no parameters and analytic rules: their moments are exact (a
    shortcut, a ReLU, pooling), so the sampled transition passes them exactly, as the
    authors pass statistics through the shortcut."""
    return all(analytic_rule(op) is not None and next(op.parameters(), None) is None
               for op in ops)


# ---------------------------------------------------------------- sampled
def standard_normal(shape, dtype, device) -> torch.Tensor:
    """The sampled transition's draws (tests/models/test_authors.py replaces this function
    to feed the draws the authors' code was fed)."""
    return torch.randn(shape, dtype=dtype, device=device)


def sampled_moments(mean, var, ops, in_shape, draws: int):
    """Monte-Carlo transition (the authors' estimator): draw ``draws`` inputs per group of
    shape (C, *spatial) from N(mean, var), apply the ops with their current weights
    (gradients flow), return the per-channel mean and biased variance of the result over
    draws and positions. mean, var: (G, C) -> (G, C_out), (G, C_out)."""
    g, c = mean.shape
    spatial = tuple(in_shape)
    view = (g, 1, c) + (1,) * len(spatial)
    noise = standard_normal((g, draws, c) + spatial, mean.dtype, mean.device)
    # sd = sqrt(max(var, 0)), with gradient 0 (not 0 * inf = NaN) where var = 0: one value
    # per statistic (one_value=allow) hands on var = 0
    positive = var > 0
    sd = torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)
    z = torch.addcmul(mean.view(view), sd.view(view), noise)
    z = z.reshape((g * draws, c) + spatial)
    for op in ops:
        z = op(z)
    return group_moments(z, g)
