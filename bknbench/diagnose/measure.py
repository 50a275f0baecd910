"""The two error metrics of an estimated (mean, variance) pair against a reference one.

Both are averages over every statistic given (groups and channels), so one number per layer:

    mean_error   = mean over g, c of (m_gc - mu_c)^2 / var_c
    logvar_error = mean over g, c of (log(v_gc / var_c))^2

mean_error is the squared shift of the normalized output, in units of the reference variance;
logvar_error the squared log-ratio of the variances (4 x the squared log-ratio of the scales).
Each splits into a systematic part, the same in every group, and the spread over groups:

    mean_bias    = mean over c of (mean over g of (m_gc - mu_c))^2 / var_c
    logvar_bias  = mean over c of (mean over g of log(v_gc / var_c))^2

error - bias = mean over c of the variance over groups (the noise of one group's estimate).
A bias is the same in training and, through the running averages, in evaluation; the
network's affine parameters can absorb it. The noise changes every step.
For BN with n values behind each statistic and Gaussian input: E[mean_error] = 1 / n, and
E[logvar_error] = trigamma((n-1)/2) + (digamma((n-1)/2) + log(2/n))^2 (n v / var ~ chi^2_{n-1}),
the values `bn_theory` returns and tests/diagnose checks.
"""
from __future__ import annotations

import math

import torch


def mean_error(mean: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor) -> torch.Tensor:
    """mean: (G, C) or (C,); ref_mean, ref_var: (C,) -> 0-d tensor."""
    return ((mean - ref_mean).square() / ref_var).mean()


def logvar_error(var: torch.Tensor, ref_var: torch.Tensor) -> torch.Tensor:
    """var: (G, C) or (C,); ref_var: (C,) -> 0-d tensor. Both must be positive."""
    return torch.log(var / ref_var).square().mean()


def mean_bias(mean: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor) -> torch.Tensor:
    """mean: (G, C); ref_mean, ref_var: (C,) -> 0-d tensor."""
    return ((mean - ref_mean).mean(0).square() / ref_var).mean()


def logvar_bias(var: torch.Tensor, ref_var: torch.Tensor) -> torch.Tensor:
    """var: (G, C); ref_var: (C,) -> 0-d tensor."""
    return torch.log(var / ref_var).mean(0).square().mean()


def bn_theory(n: int) -> tuple[float, float]:
    """(E[mean_error], E[logvar_error]) of a statistic of n i.i.d. Gaussian values (biased
    variance) against the true ones."""
    from scipy.special import digamma, polygamma

    k = (n - 1) / 2
    return 1.0 / n, float(polygamma(1, k) + (digamma(k) + math.log(2.0 / n)) ** 2)
