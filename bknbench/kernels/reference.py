"""The reference formulas of the normalization math, as pure functions of tensors.

These define the values: the fused autograd nodes (fused.py) and the C++ kernels (native.py)
compute the same, and tests hold them to these. Under torch.compile these are what is traced.
"""
from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
VAR_FLOOR = 1e-12  # below this a ReLU input is treated as a constant (sd fixed at 1e-6)


# ---------------------------------------------------------------- statistics and normalization
def group_moments_reference(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group, per-channel mean and biased variance, plainly: x (N, C, *S) with N
    divisible by ``groups`` -> mean, var (groups, C) over each group's samples and positions."""
    n, c = x.shape[:2]
    var, mean = torch.var_mean(x.reshape(groups, n // groups, c, -1), dim=(1, 3), correction=0)
    return mean, var


def normalize(x, mean, var, weight, bias, eps):
    """y = weight * (x - mean) / sqrt(var + eps) + bias with per-group statistics: the
    reference definition (training uses `fused.group_normalize`, which equals it).

    x: (N, C, *S); mean, var: (G, C); weight, bias: (C,) or None -> (N, C, *S).
    """
    g, c = mean.shape
    xs = x.reshape(g, x.shape[0] // g, c, -1)  # (G, B, C, P)
    y = (xs - mean[:, None, :, None]) * torch.rsqrt(var + eps)[:, None, :, None]
    if weight is not None:
        y = y * weight[:, None]
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(x.shape)


def trusted(s, var_hat, guard: float, scope: str = "layer"):
    """The guard (from the authors' code): whether the prediction is trusted, a 0-d bool
    tensor over all groups and channels (scope "layer", the authors') or (G, 1), one
    decision per group from its own channel average (scope "group"). Trusted when the
    average of var_hat / s is below ``guard``; NaN (0 / 0) compares False: not trusted."""
    ratio = var_hat / s
    if scope == "group":
        return ratio.mean(dim=-1, keepdim=True) < guard
    return ratio.mean() < guard


def guarded_gain(p, s, var_hat, guard: float, scope: str = "layer"):
    """The weight on the prediction after the guard: p where trusted, else 0; a 0-d
    tensor (scope "layer") or (G, 1) (scope "group") of s's dtype. A tensor p (a learnable
    gain) keeps its gradient path. Decided on the device: no host sync."""
    ok = trusted(s, var_hat, guard, scope)
    if isinstance(p, torch.Tensor):
        return torch.where(ok, p.to(s.dtype), 0.0)
    return ok.to(s.dtype) * p


def kalman_update(m, s, mu_hat, var_hat, p, guard: float = 100.0, scope: str = "layer"):
    """Fuse a prediction with an observation (mean and variance of a 2-component mixture).

        mu  = p * mu_hat  + (1 - p) * m
        var = p * var_hat + (1 - p) * s + p * (1 - p) * (m - mu_hat)^2

    m, s: observed mean and biased variance, (G, C). mu_hat, var_hat: prediction, (G, C).
    p: weight on the prediction (the Kalman gain is q = 1 - p), a float or a tensor
    broadcastable to (G, C). Guard: where `trusted` says no (for the whole layer or, with
    scope "group", per group), p is 0 and (m, s) are returned. Returns mu, var: (G, C).
    """
    pe = guarded_gain(p, s, var_hat, guard, scope)
    d = m - mu_hat
    mu = torch.lerp(m, mu_hat, pe)  # m + p (mu_hat - m)
    var = torch.addcmul(torch.lerp(s, var_hat, pe), d.square(), pe * (1.0 - pe))
    return mu, var


RUNNING_RULES = ("observed", "posterior", "authors")


def running_variance(var, s, pe, n_values: int, rule: str = "observed"):
    """What a BKN layer's running variance averages, per group: (G, C).

    var: the posterior p var_hat + (1-p) s + p(1-p)(m - mu_hat)^2; s: the observed biased
    variance of n_values values; pe: the weight the prediction got (`guarded_gain`).
    - "observed": an unbiased estimate of the mixture's population variance: s is replaced
      by s n / (n-1), and (m - mu_hat)^2, whose mean exceeds (mu - mu_hat)^2 by Var(m) =
      sigma^2 / n, by (m - mu_hat)^2 - s / (n-1); together var + (1-pe)^2 s / (n-1). With a
      right prediction its mean is the population variance for every p; pe = 0 gives
      s n / (n-1), exactly BatchNorm's.
    - "posterior": var n / (n-1), the sample-variance factor on the whole posterior.
    - "authors": var, no factor (the authors' code averages the posterior as it is).
    """
    if rule == "observed":
        return torch.addcmul(var, s, (1.0 - pe).square(), value=1.0 / (n_values - 1))
    if rule == "posterior":
        return var * (n_values / (n_values - 1))
    return var


@lru_cache(maxsize=64)
def _ema_weights(g: int, momentum: float, dtype: torch.dtype, device: torch.device):
    # weight of group k's statistics after G sequential updates: momentum * decay^(G-1-k)
    decay = 1.0 - momentum
    return momentum * decay ** torch.arange(g - 1, -1, -1, dtype=dtype, device=device)


def full_precision(device_type: str):
    """A context without autocast, where it is on: statistics are computed in the dtype of
    the statistics they start from. CUDA's autocast runs addmv, mm, matmul and einsum in
    bf16 (CPU's only some of them), which would round a running average every step."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def to_device(values, device, dtype=None) -> torch.Tensor:
    """Host values (a list, nested lists) as a tensor on ``device`` without waiting for it:
    a non-blocking copy (from pageable memory CUDA stages the values at once and does not
    synchronize), where torch.tensor(values, device=cuda) waits for the device."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def ema_over_groups(running, stats, momentum, scale: float = 1.0):
    """Running average after G sequential EMA updates, one per group, in closed form.

    Equals G updates ``r = (1 - momentum) * r + momentum * scale * stats[g]`` in order, so
    one grouped forward keeps the same running statistics as G separate micro-batch
    forwards. running: (C,); stats: (G, C) -> (C,), in running's dtype, autocast off
    (`full_precision`). One fused op (addmv).
    """
    g = stats.shape[0]
    weights = _ema_weights.__wrapped__ if torch.compiler.is_compiling() else _ema_weights
    w = weights(g, float(momentum), running.dtype, running.device)  # (the compiler cannot cache)
    with full_precision(running.device.type):
        return torch.addmv(running, stats.to(running.dtype).t(), w,
                           beta=(1.0 - momentum) ** g, alpha=scale)



# ---------------------------------------------------------------- moments through ops
def relu_terms(mean, var):
    """sd, Phi(a), phi(a), E[ReLU z] and the unclamped Var[ReLU z] for z ~ N(mean, var)."""
    sd = var.clamp_min(VAR_FLOOR).sqrt()
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
    *_, m1, v1_raw = relu_terms(mean, var)
    return m1, v1_raw.clamp_min(0.0)


def kernel_sums(weight, c_in: int):
    """(W summed over kernel positions, W^2 summed), each (C_out, C_in)."""
    w = weight.reshape(weight.shape[0], c_in, -1)
    return w.sum(-1), w.square().sum(-1)


def affine_moments(mean, var, weight, bias=None):
    """Per-channel moments after a convolution or linear layer.

    mean, var: (G, C_in). weight: (C_out, C_in, *kernel) for a convolution, or
    (C_out, C_in * P) for a linear layer fed by a flattened (C_in, P) map.
    mean_out = (W summed over kernel positions) @ mean + b; var_out = (W^2 summed) @ var.
    Approximations: inputs independent across channels and positions, identically
    distributed over positions. Exact for a linear layer; for a convolution it ignores
    zero padding at the borders (`borders=ignore`; borders.py counts them).
    Returns (G, C_out), (G, C_out).
    """
    w_sum, w2_sum = kernel_sums(weight, mean.shape[1])
    out_mean = mean @ w_sum.t()
    if bias is not None:
        out_mean = out_mean + bias
    return out_mean, var @ w2_sum.t()


def positions_mixture(mean_pos, var_pos, weights=None):
    """Per-channel moments over all positions from per-position ones: mean = average of the
    means; var = average of the variances + variance of the means over positions.
    mean_pos, var_pos: (G, C, R); weights: (R,) summing to 1, or None (uniform)."""
    if weights is None:
        mean = mean_pos.mean(-1)
        spread = (mean_pos - mean[..., None]).square().mean(-1)
        return mean, var_pos.mean(-1) + spread
    mean = mean_pos @ weights
    return mean, var_pos @ weights + (mean_pos - mean[..., None]).square() @ weights


def conv_moments_by_maps(mean, var, shape, weight, bias, stride, padding, dilation,
                         groups=1):
    """Per-channel moments after a convolution over all its output positions, zero padding
    included, computed plainly: two convolutions of constant input maps (mean_in and var_in,
    zero in the padding) with W and W^2 give each output position's mean and variance
    (inputs independent across channels and positions), then `positions_mixture`.

    mean, var: (G, C_in); shape: the input's spatial shape (1 to 3 dims); padding: (lo, hi)
    per spatial dim; stride, dilation: per spatial dim. Returns (G, C_out), (G, C_out).
    The reference for `borders.conv_moments`, which computes the same from the few distinct
    border patterns instead of every position.
    """
    dims = len(shape)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    view = tuple(mean.shape) + (1,) * dims
    pad = [n for lo_hi in reversed(padding) for n in lo_hi]  # F.pad: last dim first
    maps = [F.pad(t.reshape(view).expand(view[:2] + tuple(shape)), pad) for t in (mean, var)]
    mean_pos = conv(maps[0], weight, bias, stride, 0, dilation, groups)
    var_pos = conv(maps[1], weight.square(), None, stride, 0, dilation, groups)
    return positions_mixture(mean_pos.flatten(2), var_pos.flatten(2))
