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

from .reference import positions_mixture


# ---------------------------------------------------------------- geometry of one axis
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


@lru_cache(maxsize=1024)
def adaptive_axis(length: int, out: int):
    """One axis of adaptive average pooling: window i is [floor(i L / o), ceil((i+1) L / o))."""
    found: dict[tuple[int, int], int] = {}
    for i in range(out):
        size = -(-(i + 1) * length // out) - (i * length) // out
        found[(size, size)] = found.get((size, size), 0) + 1
    return tuple(found), tuple(found.values()), out


def _position_weights(axes, dtype, device) -> torch.Tensor:
    """The share of output positions in each combined pattern: (R,), R = product of the
    axes' pattern counts, in row-major order of the axes."""
    w = torch.ones((), dtype=dtype, device=device)
    for _, counts, out in axes:
        w = torch.outer(w.reshape(-1), torch.tensor(counts, dtype=dtype, device=device) / out)
    return w.reshape(-1)


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


def _tap_sums(w: torch.Tensor, axes) -> torch.Tensor:
    """Sum of w (C_out, C_in, *k) over the taps of each combined pattern: (C_out, C_in, R)."""
    for patterns, _, _ in axes:
        mask = torch.tensor(patterns, dtype=w.dtype, device=w.device)  # (R_d, k_d)
        w = torch.tensordot(w, mask, dims=([2], [1]))  # kernel axis d -> pattern axis, last
    return w.reshape(w.shape[0], w.shape[1], -1)


def conv_moments(mean, var, weight, bias, axes, groups: int = 1):
    """Per-channel moments after a convolution over all output positions, borders
    included (see the module docstring). mean, var: (G, C_in); weight (C_out, C_in / groups,
    *k); axes: a `conv_axis` result per spatial dim. Returns (G, C_out), (G, C_out).
    Equals `reference.conv_moments_by_maps`."""
    w = dense_weight(weight, groups)
    a, b = _tap_sums(w, axes), _tap_sums(w.square(), axes)  # (C_out, C_in, R)
    mean_pos = torch.einsum("gc,ocr->gor", mean, a)
    if bias is not None:
        mean_pos = mean_pos + bias[:, None]
    var_pos = torch.einsum("gc,ocr->gor", var, b)
    return positions_mixture(mean_pos, var_pos, _position_weights(axes, mean.dtype,
                                                                   mean.device))


def pool_moments(mean, var, axes, divisor_override: int | None = None):
    """Per-channel moments after average pooling over all output positions: a window of
    ``valid`` independent inputs and divisor D has mean valid / D mean_in and variance
    valid / D^2 var_in. axes: a `pool_axis` or `adaptive_axis` result per spatial dim.
    mean, var: (G, C) -> (G, C), (G, C)."""
    valid = div = torch.ones((), dtype=mean.dtype, device=mean.device)
    for patterns, _, _ in axes:
        pv, pd = zip(*patterns)
        valid = torch.outer(valid.reshape(-1), mean.new_tensor(pv)).reshape(-1)
        div = torch.outer(div.reshape(-1), mean.new_tensor(pd)).reshape(-1)
    if divisor_override:
        div = torch.full_like(div, float(divisor_override))
    share = _position_weights(axes, mean.dtype, mean.device)
    mean_pos = mean[..., None] * (valid / div)
    var_pos = var[..., None] * (valid / div.square())
    return positions_mixture(mean_pos, var_pos, share)


def trivial(axes) -> bool:
    """Whether every output position reads every tap: borders change nothing, and the
    moments are the kernel-summed ones (`reference.affine_moments`)."""
    return all(len(patterns) == 1 and all(patterns[0]) for patterns, _, _ in axes)
