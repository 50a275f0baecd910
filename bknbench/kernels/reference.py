"""The reference formulas of the normalization math, as pure functions of tensors.

These define the values: the fused autograd nodes (fused.py) and the C++ kernels (native.py)
compute the same, and tests hold them to these. Under torch.compile these are what is traced.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

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


def kalman_update(m, s, mu_hat, var_hat, p, guard: float = 100.0):
    """Fuse a prediction with an observation (mean and variance of a 2-component mixture).

        mu  = p * mu_hat  + (1 - p) * m
        var = p * var_hat + (1 - p) * s + p * (1 - p) * (m - mu_hat)^2

    m, s: observed mean and biased variance, (G, C). mu_hat, var_hat: prediction, (G, C).
    p: weight on the prediction (the Kalman gain is q = 1 - p), a float or a tensor
    broadcastable to (G, C). Guard (from the authors' code): when the average over all groups
    and channels of var_hat / s is ``guard`` or more (or undefined), the prediction is not
    trusted and (m, s) are returned. The decision stays on the device (no host sync).
    Returns mu, var: (G, C).
    """
    trusted = (var_hat / s).mean() < guard  # NaN (0/0) compares False: not trusted
    if isinstance(p, torch.Tensor):  # learnable gain: keep the gradient path into p
        p = torch.where(trusted, p.to(m.dtype), 0.0)
        pq = p * (1.0 - p)
    else:  # a float: fold the guard into two 0-d tensors of m's dtype, no host sync
        keep = trusted.to(m.dtype)
        p, pq = keep * p, keep * (p * (1.0 - p))
    d = m - mu_hat
    mu = torch.lerp(m, mu_hat, p)  # m + p (mu_hat - m)
    var = torch.addcmul(torch.lerp(s, var_hat, p), d.square(), pq)
    return mu, var


@lru_cache(maxsize=64)
def _ema_weights(g: int, momentum: float, dtype: torch.dtype, device: torch.device):
    # weight of group k's statistics after G sequential updates: momentum * decay^(G-1-k)
    decay = 1.0 - momentum
    return momentum * decay ** torch.arange(g - 1, -1, -1, dtype=dtype, device=device)


def ema_over_groups(running, stats, momentum, scale: float = 1.0):
    """Running average after G sequential EMA updates, one per group, in closed form.

    Equals G updates ``r = (1 - momentum) * r + momentum * scale * stats[g]`` in order, so
    one grouped forward keeps the same running statistics as G separate micro-batch
    forwards. running: (C,); stats: (G, C) -> (C,). One fused op (addmv).
    """
    g = stats.shape[0]
    weights = _ema_weights.__wrapped__ if torch.compiler.is_compiling() else _ema_weights
    w = weights(g, float(momentum), stats.dtype, stats.device)  # (the compiler cannot cache)
    return torch.addmv(running, stats.t(), w, beta=(1.0 - momentum) ** g, alpha=scale)


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
    distributed over positions, and zero padding at the borders ignored.
    Returns (G, C_out), (G, C_out).
    """
    w_sum, w2_sum = kernel_sums(weight, mean.shape[1])
    out_mean = mean @ w_sum.t()
    if bias is not None:
        out_mean = out_mean + bias
    return out_mean, var @ w2_sum.t()
