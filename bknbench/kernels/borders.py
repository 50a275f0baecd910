"""Exact per-channel moments through convolutions and average pooling, borders included.

The input of the op has moments constant per channel, (G, C) (as every BKN transition
starts: a posterior, or a ReLU of one). Under the analytic transition's independence
assumption (values independent across channels and positions) each output position has

    mean = sum over the taps that read inside the input of W mean_in (+ b)
    var  = sum over the same taps of W^2 var_in

(zero padding contributes 0 to both), and the statistics over all output positions, which
are what the next layer observes, are the mixture over positions: the average of the means,
and the average of the variances plus the variance of the means (`positions_mixture`).
`reference.conv_moments_by_maps` computes this with two convolutions of constant maps;
here output positions are grouped by which taps they read (along each axis: the interior
and a few border patterns), so a 32x32 map with a 3x3 kernel is 3 x 3 patterns, not 1024
positions, and the cost does not grow with the map.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from . import native
from .relu import relu_moments_backward
from .reference import positions_mixture, relu_moments, relu_terms, to_device


# ---------------------------------------------------------------- geometry of one axis
def cached(fn):
    """An lru_cache'd function, or under torch.compile the function itself (the compiler
    traces through, and warns about, a cache wrapper; see also `reference.ema_over_groups`)."""
    wrapped = fn.__wrapped__

    def call(*args):
        return wrapped(*args) if torch.compiler.is_compiling() else fn(*args)
    call.__doc__ = fn.__doc__
    return call


@cached
@lru_cache(maxsize=1024)
def conv_axis(length: int, kernel: int, stride: int, lo: int, hi: int, dilation: int,
              zero_padding: bool = True):
    """The output positions of one axis of a convolution, grouped by which taps read inside
    the input: (patterns, counts, out_length), patterns a tuple of 0/1 tuples of length
    ``kernel``. Without zero padding (reflect, replicate, circular) every tap reads a value
    of the input: one pattern (the variance then ignores that the copies are correlated)."""
    out = (length + lo + hi - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(f"convolution output would be empty (input length {length})")
    found: dict[tuple[int, ...], int] = {}
    for i in range(out):
        taps = tuple(int(not zero_padding or 0 <= i * stride - lo + j * dilation < length)
                     for j in range(kernel))
        found[taps] = found.get(taps, 0) + 1
    return tuple(found), tuple(found.values()), out


@cached
@lru_cache(maxsize=1024)
def pool_axis(length: int, kernel: int, stride: int, pad: int, ceil_mode: bool,
              count_include_pad: bool):
    """One axis of average pooling as torch computes it: ((valid, divisor) per pattern,
    counts, out_length); valid = inputs in the window, divisor = its size counted with the
    padding (or without, ``count_include_pad=False``)."""
    span = length + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= length + pad:
        out -= 1  # the last window must start inside the input or the left padding
    if out < 1:
        raise ValueError(f"pooling output would be empty (input length {length})")
    found: dict[tuple[int, int], int] = {}
    for i in range(out):
        start = i * stride - pad
        end = min(start + kernel, length + pad)
        size = end - start
        valid = min(end, length) - max(start, 0)
        key = (valid, size if count_include_pad else valid)
        found[key] = found.get(key, 0) + 1
    return tuple(found), tuple(found.values()), out


@cached
@lru_cache(maxsize=1024)
def adaptive_axis(length: int, out: int):
    """One axis of adaptive average pooling: window i is [floor(i L / o), ceil((i+1) L / o))."""
    found: dict[tuple[int, int], int] = {}
    for i in range(out):
        size = -(-(i + 1) * length // out) - (i * length) // out
        found[(size, size)] = found.get((size, size), 0) + 1
    return tuple(found), tuple(found.values()), out


@cached
@lru_cache(maxsize=256)
def _axes_tensors(axes, dtype: torch.dtype, device: torch.device):
    """The tap mask (R, K) of the combined patterns of `conv_axis` axes (a row: one pattern
    of every axis, row-major; a column: a kernel tap, in the order of
    weight.reshape(C_out, C_in, -1)), and each row's share of the output positions (R,).
    Read-only, shared."""
    mask = torch.ones((1, 1), dtype=dtype, device=device)
    share = torch.ones(1, dtype=dtype, device=device)
    for patterns, counts, out in axes:
        mask = torch.kron(mask, to_device(patterns, device, dtype))
        share = torch.kron(share, to_device(counts, device, dtype) / out)
    return mask, share


# ---------------------------------------------------------------- moments
def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped convolution's weight (C_out, C_in / groups, *k) as the dense (C_out, C_in,
    *k) one with zeros between groups (differentiable)."""
    if groups == 1:
        return weight
    c_out, c_in_g = weight.shape[:2]
    w = weight.reshape(groups, c_out // groups, c_in_g, -1)
    eye = torch.eye(groups, dtype=weight.dtype, device=weight.device)
    dense = torch.einsum("gock,gh->gohck", w, eye)
    return dense.reshape((c_out, groups * c_in_g) + tuple(weight.shape[2:]))


def _per_pattern(stats, taps):
    """(G, C) statistics through per-pattern tap sums (C_out, C_in, R): (G, C_out, R)."""
    o, c, r = taps.shape
    return (stats @ taps.permute(1, 0, 2).reshape(c, o * r)).view(-1, o, r)


def conv_moments(mean, var, weight, bias, axes, groups: int = 1):
    """Per-channel moments after a convolution over all output positions, borders
    included (see the module docstring). mean, var: (G, C_in); weight (C_out, C_in / groups,
    *k); axes: a `conv_axis` result per spatial dim. Returns (G, C_out), (G, C_out).
    Equals `reference.conv_moments_by_maps`."""
    w = dense_weight(weight, groups)
    w = w.reshape(w.shape[0], w.shape[1], -1)
    mask, share = _axes_tensors(tuple(axes), mean.dtype, mean.device)
    mean_pos = _per_pattern(mean, w @ mask.t())  # (G, C_out, R)
    if bias is not None:
        mean_pos = mean_pos + bias[:, None]
    return positions_mixture(mean_pos, _per_pattern(var, w.square() @ mask.t()), share)


class _ReluConv(torch.autograd.Function):
    """``conv_moments(*relu_moments(mean, var), weight, bias, axes)`` as one autograd node
    (dense weight), for the same reason as `relu._ReluAffine`: a few large ops instead of
    ~60 small ones. Backward: the mixture over positions R with shares w_r, mean = sum_r w_r
    mp_r, var = sum_r w_r (vp_r + (mp_r - mean)^2), gives d/d mp_r = w_r (g_mean + 2 g_var
    (mp_r - mean)) and d/d vp_r = w_r g_var; then through the tap sums and the ReLU."""

    @staticmethod
    def forward(ctx, mean, var, weight, bias, mask, share):
        sd, cdf, pdf, m1, v1_raw = relu_terms(mean, var)
        v1 = v1_raw.clamp_min(0.0)
        w = weight.reshape(weight.shape[0], weight.shape[1], -1)  # (C_out, C_in, K)
        taps, taps2 = w @ mask.t(), w.square() @ mask.t()  # (C_out, C_in, R)
        mp = _per_pattern(m1, taps)
        if bias is not None:
            mp = mp + bias[:, None]
        out_mean = mp @ share
        dev = mp - out_mean[..., None]
        out_var = _per_pattern(v1, taps2) @ share + dev.square() @ share
        ctx.save_for_backward(var, sd, cdf, pdf, m1, v1_raw, v1, w, taps, taps2, dev, mask,
                              share)
        ctx.has_bias, ctx.weight_shape = bias is not None, weight.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return out_mean, out_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean, g_var):
        var, sd, cdf, pdf, m1, v1_raw, v1, w, taps, taps2, dev, mask, share = ctx.saved_tensors
        g, (o, c, r) = m1.shape[0], taps.shape
        if g_mean is None:
            g_mean = dev.new_zeros(g, o)
        if g_var is None:
            g_var = dev.new_zeros(g, o)
        g_mp = torch.addcmul(g_mean[..., None], dev, g_var[..., None], value=2.0) * share
        g_vp = g_var[..., None] * share  # (G, C_out, R)
        flat = lambda t: t.permute(1, 0, 2).reshape(c, o * r)  # noqa: E731 (C_in, C_out R)
        g_m1 = g_mp.reshape(g, o * r) @ flat(taps).t()
        g_v1 = g_vp.reshape(g, o * r) @ flat(taps2).t()
        # d/d taps = stats^T g_p, then taps = w mask^T, taps2 = w^2 mask^T
        g_taps = (m1.t() @ g_mp.reshape(g, o * r)).view(c, o, r).permute(1, 0, 2)
        g_taps2 = (v1.t() @ g_vp.reshape(g, o * r)).view(c, o, r).permute(1, 0, 2)
        g_w = torch.addcmul(g_taps @ mask, w, g_taps2 @ mask, value=2.0)
        g_bias = g_mp.sum((0, 2)) if ctx.has_bias else None
        g_in_mean, g_in_var = relu_moments_backward(g_m1, g_v1, var, sd, cdf, pdf, m1, v1_raw)
        return g_in_mean, g_in_var, g_w.reshape(ctx.weight_shape), g_bias, None, None


# Above this many (group, input channel, output channel, pattern) quadruples the node's
# matrix products on BLAS beat the C++ kernel's loops; below it the kernel's single call wins.
# Measured on one thread, forward and backward (benchmarks/relu_affine_crossover.py, median
# of 5, kernel / node): 0.25x for the 1-D CNN's 32 -> 32 on 40 positions (2 patterns), 0.42x
# for the 2-D CNN's 64 -> 64 on 2x2 (4 patterns); 0.60x at 8 groups x 64 x 64 x 3 patterns,
# 0.76x at 8 x 64 x 64 x 4, 0.89x at 16 x 64 x 64 x 3 (196,608); 1.09x at 8 x 64 x 64 x 9,
# 1.14x at 16 x 64 x 64 x 4, 2.7x at 64 x 64 x 64 x 4 (bn-accum's 64 groups).
NATIVE_RELU_CONV_MAX = 3 << 16


def relu_conv_moments(mean, var, weight, bias, axes, groups: int = 1):
    """Moments after ReLU then a convolution, borders included: (G, C_in) -> (G, C_out) x2,
    the values of `relu_moments` then `conv_moments`, as one autograd node: the C++ kernel
    of `native` where it applies and the problem is small (NATIVE_RELU_CONV_MAX), else
    `_ReluConv`; the plain composition under torch.compile, which fuses it."""
    if torch.compiler.is_compiling():
        return conv_moments(*relu_moments(mean, var), weight, bias, axes, groups)
    w = dense_weight(weight, groups)
    mask, share = _axes_tensors(tuple(axes), mean.dtype, mean.device)
    if (mean.shape[0] * mean.shape[1] * w.shape[0] * mask.shape[0] <= NATIVE_RELU_CONV_MAX
            and native.usable(mean, var, w, bias)):
        return tuple(native.module().relu_conv(mean, var, w, bias, mask, share))
    return _ReluConv.apply(mean, var, w, bias, mask, share)


def pool_moments(mean, var, axes, divisor_override: int | None = None):
    """Per-channel moments after average pooling over all output positions: a window of
    ``valid`` independent inputs and divisor D has mean valid / D mean_in and variance
    valid / D^2 var_in. axes: a `pool_axis` or `adaptive_axis` result per spatial dim.
    mean, var: (G, C) -> (G, C), (G, C)."""
    valid = div = share = mean.new_ones(1)
    for patterns, counts, out in axes:  # per combined pattern, row-major: products over axes
        pv, pd = zip(*patterns)
        valid, div = torch.kron(valid, mean.new_tensor(pv)), torch.kron(div, mean.new_tensor(pd))
        share = torch.kron(share, mean.new_tensor(counts) / out)
    if divisor_override:
        div = torch.full_like(div, float(divisor_override))
    mean_pos = mean[..., None] * (valid / div)
    var_pos = var[..., None] * (valid / div.square())
    return positions_mixture(mean_pos, var_pos, share)


def trivial(axes) -> bool:
    """Whether every output position reads every tap: borders change nothing, and the
    moments are the kernel-summed ones (`reference.affine_moments`)."""
    return all(len(patterns) == 1 and all(patterns[0]) for patterns, _, _ in axes)
