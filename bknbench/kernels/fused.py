"""The training step of the batch-statistics normalizers as one autograd node.

observe (per-group mean and biased variance) -> optional Kalman fusion with a prediction
(`reference.kalman_update`) -> normalize, forward and backward written out; and the
Gaussian moments through ReLU and an affine map (BKN's analytic transition). The reference
definitions are in reference.py; tests check these nodes against them, values and gradients.

Why one node: at micro-batch sizes the cost of BKN is the number of tensor ops, not
arithmetic, and at large batches it is passes over the activations. Here the per-group
problem is laid out as BatchNorm over G * C channels, (N, C, *S) -> (B, G * C, P) with B
samples per group (a copy only when G > 1 and B > 1), so that the two passes that touch
every value run on PyTorch's own batch-norm kernels in inference form (a per-channel
affine map with given statistics) and their backward. Everything else is on (G, C) tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import native
from .reference import (RUNNING_RULES, ema_over_groups, group_moments_reference, guarded_gain,
                        kalman_update, normalize, running_variance)


def eval_form_backward(g_yt, xt, weight, mean, var, eps: float):
    """The backward of `F.batch_norm(xt, mean, var, weight, None, False, 0.0, eps)` (the
    inference form, statistics given): g_xt = g_y weight r, and per channel
    sum(g_y (x - mean) r), sum(g_y), with r = (var + eps)^-1/2. xt, g_yt: (B, K, P);
    weight, mean, var: (K,).

    The saved mean and inverse std are passed although the CPU kernel reads only mean and
    var in this form (the same bits): CUDA's kernel skips its eval-form path for inputs
    contiguous with stride 1 on the channel dim ((N, C) features, 1x1 maps) and then
    asserts "save_mean should always be defined"."""
    return torch.ops.aten.native_batch_norm_backward(
        g_yt, xt, weight, mean, var, mean, torch.rsqrt(var + eps), False, eps,
        [True, True, True])


@lru_cache(maxsize=64)
def _zeros_ones(k: int, dtype: torch.dtype, device: torch.device):
    # constant (mean 0, var 1) statistics for `affine`: read-only, shared
    return torch.zeros(k, dtype=dtype, device=device), torch.ones(k, dtype=dtype, device=device)


def affine(xt: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """xt * scale[k] + shift[k] per channel k; xt: (B, K, P). On the batch-norm kernel in
    inference form (mean 0, var 1, eps 0), several times faster on CPU than a broadcast
    addcmul."""
    zeros, ones = _zeros_ones(xt.shape[1], xt.dtype, xt.device)
    return F.batch_norm(xt, zeros, ones, scale, shift, False, 0.0, 0.0)


def to_channels(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *S) -> (B, G * C, P), B = N / G: group g's channel c becomes channel g C + c."""
    n, c = x.shape[:2]
    xg = x.reshape(groups, n // groups, c, -1)
    if groups == 1:
        return xg[0]
    return xg.transpose(0, 1).reshape(n // groups, groups * c, -1)


def from_channels(xt: torch.Tensor, groups: int, shape) -> torch.Tensor:
    """The inverse of `to_channels`."""
    if groups == 1:
        return xt.reshape(shape)
    b, k, p = xt.shape
    return xt.view(b, groups, k // groups, p).transpose(0, 1).reshape(shape)


class _GroupMoments(torch.autograd.Function):
    """Per-group mean and biased variance with a one-pass backward.

    torch.var_mean over non-adjacent dims is several times slower on CPU than a sum, and
    its autograd backward takes several passes; here the forward is two passes (exact
    two-pass variance, as torch's batch norm kernel computes it) and the backward one:
    dm/dx = 1 / n, ds/dx = 2 (x - m) / n.
    """

    @staticmethod
    def forward(ctx, x, groups):
        n, c = x.shape[:2]
        xg = x.reshape(groups, n // groups, c, -1)  # (G, B, C, P)
        count = xg.shape[1] * xg.shape[3]
        mean = xg.sum((1, 3), keepdim=True).div_(count)  # (G, 1, C, 1)
        var = (xg - mean).square_().sum((1, 3)).div_(count)  # (G, C)
        mean = mean.view(groups, c)
        ctx.save_for_backward(x, mean)
        ctx.groups = groups
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        n, c = x.shape[:2]
        xg = x.reshape(ctx.groups, n // ctx.groups, c, -1)
        count = xg.shape[1] * xg.shape[3]
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_var is None:
            grad = (grad_mean / count)[:, None, :, None].expand_as(xg)
        else:
            slope = grad_var * (2.0 / count)  # (G, C)
            offset = torch.addcmul(grad_mean / count, slope, mean, value=-1.0)
            grad = torch.addcmul(offset[:, None, :, None], xg, slope[:, None, :, None])
        return grad.reshape(x.shape), None


def group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group, per-channel mean and biased variance.

    x: (N, C, *spatial) with N divisible by ``groups`` -> mean, var: (groups, C), computed
    over the N / groups samples of each group and all spatial positions. Differentiable.
    """
    if torch.compiler.is_compiling():  # the compiler fuses the plain form itself
        return group_moments_reference(x, groups)
    return _GroupMoments.apply(x, groups)


@dataclass(frozen=True)
class Running:
    """The running statistics a training forward updates (`update_running`): the layer's
    buffers mean, var (C,), updated in place; the EMA's momentum; the rule of
    `running_variance` for a layer with a prediction."""

    mean: torch.Tensor
    var: torch.Tensor
    momentum: float
    rule: str = "observed"


@torch.no_grad()
def update_running(running: Running, mu, var, s, pe, n_values: int) -> None:
    """One training forward's update of ``running``, group after group (`ema_over_groups`):
    the mean takes in mu, the variance `running_variance(var, s, pe, n_values, rule)`, or
    without a prediction (pe None; then var = s) BatchNorm's s n / (n - 1). mu, var, s:
    (G, C), n_values behind each; pe: the weight the prediction got (`guarded_gain`)."""
    if pe is None:
        target, scale = var, n_values / (n_values - 1)
    else:
        target, scale = running_variance(var, s, pe, n_values, running.rule), 1.0
    running.mean.copy_(ema_over_groups(running.mean, mu, running.momentum))
    running.var.copy_(ema_over_groups(running.var, target, running.momentum, scale))


class GroupNormalize(torch.autograd.Function):
    """Inputs: x (N, C, *S); mu_hat, var_hat (G, C) or None (no prediction: per-group BN);
    p, the weight on the prediction, a float or a 0-d tensor (a learnable gain); weight,
    bias (C,); groups G; guard; eps; scope of the guard ("layer" or "group", see
    `reference.trusted`); running: a `Running` to update (`update_running`), or None.
    Outputs y (N, C, *S) and the (G, C) statistics m, s (observed), mu, var (used):
    y = weight (x - mu) / sqrt(var + eps) + bias per group.
    Low-precision inputs (autocast) are normalized in float32 and y is returned in their
    dtype."""

    @staticmethod
    def forward(ctx, x, mu_hat, var_hat, p, weight, bias, groups: int, guard: float,
                eps: float, scope: str = "layer", running: Running | None = None):
        c = x.shape[1]
        xt = to_channels(x, groups)  # (B, K, P)
        if xt.dtype in (torch.float16, torch.bfloat16):
            xt = xt.float()
        count = xt.shape[0] * xt.shape[2]
        m = xt.sum((0, 2)).div_(count)  # (K,)
        s = (xt - m[:, None]).square_().sum((0, 2)).div_(count)  # two-pass, as torch's BN
        m, s = m.view(groups, c), s.view(groups, c)
        if mu_hat is None:
            mu, var, pe, d = m, s, None, None
        else:  # kalman_update, inlined to keep d and the guarded p for the backward
            pe = guarded_gain(p, s, var_hat, guard, scope)  # () or (G, 1)
            d = m - mu_hat
            mu = torch.lerp(m, mu_hat, pe)
            var = torch.addcmul(torch.lerp(s, var_hat, pe), d.square(), pe * (1.0 - pe))
        w_k, b_k = (weight, bias) if groups == 1 else (weight.repeat(groups),
                                                        bias.repeat(groups))
        yt = F.batch_norm(xt, mu.reshape(-1), var.reshape(-1), w_k, b_k, False, 0.0, eps)
        if running is not None:
            update_running(running, mu, var, s, pe, count)
        ctx.save_for_backward(xt, m, s, mu, var, var_hat, pe, d, w_k)
        ctx.groups, ctx.eps, ctx.shape = groups, eps, x.shape
        ctx.p_is_tensor = torch.is_tensor(p)
        ctx.set_materialize_grads(False)  # unused outputs' gradients stay None, not zeros
        if yt.dtype != x.dtype:
            yt = yt.to(x.dtype)
        return from_channels(yt, groups, x.shape), m, s, mu, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y, g_m, g_s, g_mu, g_var):
        xt, m, s, mu, var, var_hat, pe, d, w_k = ctx.saved_tensors
        groups, c = m.shape
        count = xt.shape[0] * xt.shape[2]
        if g_y is None:  # y unused: only the statistics were (cannot happen in a model)
            g_y = torch.zeros(ctx.shape, dtype=xt.dtype, device=xt.device)
        g_yt = to_channels(g_y, groups)
        if g_yt.dtype != xt.dtype:
            g_yt = g_yt.to(xt.dtype)
        # y = w_k (x - mu) r + b_k, r = (var + eps)^-1/2: the kernel returns g_y w_k r and the
        # per-channel sums  sum(g_y (x - mu)) r  and  sum(g_y)
        g_xt, g_wk, g_bk = eval_form_backward(g_yt, xt, w_k, mu.reshape(-1), var.reshape(-1),
                                              ctx.eps)
        g_weight, g_bias = ((g_wk, g_bk) if groups == 1 else
                            (g_wk.view(groups, c).sum(0), g_bk.view(groups, c).sum(0)))
        w_r = w_k.view(groups, c) * torch.rsqrt(var + ctx.eps)
        g_mu_t = g_bk.view(groups, c) * -w_r
        g_var_t = g_wk.view(groups, c) * w_r * (-0.5 / torch.sqrt(var + ctx.eps))
        if g_mu is not None:
            g_mu_t = g_mu_t + g_mu
        if g_var is not None:
            g_var_t = g_var_t + g_var
        g_mu_hat = g_var_hat = g_p = None
        if pe is None:  # mu = m, var = s
            g_m_t, g_s_t = g_mu_t, g_var_t
        else:
            # mu = m - pe d;  var = s + pe (var_hat - s) + pe (1 - pe) d^2;  d = m - mu_hat
            q = 1.0 - pe
            g_d = 2.0 * pe * q * d * g_var_t
            g_m_t = q * g_mu_t + g_d
            g_s_t = q * g_var_t
            g_mu_hat = pe * g_mu_t - g_d
            g_var_hat = pe * g_var_t
            if ctx.p_is_tensor and ctx.needs_input_grad[3]:
                g_pe = (var_hat - s + (1.0 - 2.0 * pe) * d * d) * g_var_t - d * g_mu_t
                g_p = (g_pe * (pe != 0)).sum()  # where the guard rejected, p was unused
        if g_m is not None:
            g_m_t = g_m_t + g_m
        if g_s is not None:
            g_s_t = g_s_t + g_s
        # through m and s: dm/dx = 1 / n, ds/dx = 2 (x - m) / n, an affine map of x
        slope = g_s_t.reshape(-1) * (2.0 / count)
        offset = torch.addcmul(g_m_t.reshape(-1) / count, slope, m.reshape(-1), value=-1.0)
        g_xt += affine(xt, slope, offset)
        g_x = from_channels(g_xt, groups, ctx.shape)
        if g_x.dtype != g_y.dtype:
            g_x = g_x.to(g_y.dtype)
        return g_x, g_mu_hat, g_var_hat, g_p, g_weight, g_bias, None, None, None, None, None


def group_normalize(x, mu_hat, var_hat, p, weight, bias, groups: int, guard: float = 100.0,
                    eps: float = 1e-5, scope: str = "layer", running: Running | None = None):
    """y, m, s, mu, var of `GroupNormalize` (see there), on the C++ kernel of `native` when
    it is built and applies (CPU, float32/64); ``running``, when given, updated in place
    from the same forward (`update_running`, with the guard's own decision). Under
    torch.compile the reference composition is traced instead: the compiler fuses it, and it
    does not trace the hand-written node."""
    if torch.compiler.is_compiling():
        m, s = group_moments(x, groups)
        mu, var = ((m, s) if mu_hat is None
                   else kalman_update(m, s, mu_hat, var_hat, p, guard, scope))
        if running is not None:
            pe = None if mu_hat is None else guarded_gain(p, s, var_hat, guard, scope)
            update_running(running, mu, var, s, pe, x.numel() // (groups * x.shape[1]))
        return normalize(x, mu, var, weight, bias, eps), m, s, mu, var
    p_tensor = p if torch.is_tensor(p) else None
    buffers = (None, None) if running is None else (running.mean, running.var)
    if native.usable(x, mu_hat, var_hat, p_tensor, weight, bias, *buffers):
        return tuple(native.module().group_normalize(
            x, mu_hat, var_hat, p_tensor, 0.0 if p is None or p_tensor is not None else p,
            weight, bias, groups, guard, eps, scope == "group", *buffers,
            0.0 if running is None else running.momentum,
            0 if running is None else RUNNING_RULES.index(running.rule)))
    return GroupNormalize.apply(x, mu_hat, var_hat, p, weight, bias, groups, guard, eps, scope,
                                running)
