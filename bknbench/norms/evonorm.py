"""EvoNorm-B0 and EvoNorm-S0 (Liu et al., NeurIPS 2020), each with its nonlinearity.

B0 (batch-dependent), per micro-batch group, sample n and channel c:
    y = x / max(sqrt(var_B + eps), v x + sqrt(var_I + eps)) * weight + bias
var_B the group's biased variance over samples and positions, var_I the sample's over its
positions (0 without positions), v per channel (init 1). Eval: the running variance (EMA of
var_B, momentum 0.1) replaces var_B. Official TF code: eps 1e-5, biased running variance,
decay 0.9; timm's EvoNorm2dB0: eps 1e-3 and the running variance updated with var_B n/(n-1)
(``evonorm-b0:eps=1e-3,unbiased=1``).

S0 (per sample): y = x sigmoid(v x) / sqrt(var_G + eps) * weight + bias, var_G the biased
variance over a group of channels and the positions (GroupNorm's), no centring of the
numerator. Groups: the largest divisor of C not above ``groups`` (32, the official code's
fallback; timm asserts C % groups == 0). With one value per group (C / groups = 1 on
(N, C) features) var_G = 0 and y = x sigmoid(v x) / sqrt(eps).

Both replace "norm + ReLU": the model builder adds no ReLU after them (Neighbours).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.fused import group_moments
from ..kernels.reference import ema_over_groups
from .batch import GroupNorm, StatsNorm, gn_groups
from .common import statistics_precision
from .registry import EPS, MOMENTUM, Neighbours, Option, register


def moments(x: torch.Tensor, groups: int):
    """Per-sample (instance) variances (N, C) over the positions, and the groups' batch
    variances (G, C) over samples and positions, from one pass of per-sample moments:
    var_B = mean over the group of (var_I + (mean_I - mean_B)^2), the law of total variance.
    (group_moments with a group per sample: torch.var over a short last dimension is
    several times slower on a CPU.) Differentiable."""
    n, c = x.shape[:2]
    mean_i, var_i = group_moments(x, n)  # (N, C); for (N, C) input: x and 0
    mi = mean_i.view(groups, n // groups, c)
    between = (mi - mi.mean(1, keepdim=True)).square()
    return var_i, (var_i.view(groups, n // groups, c) + between).mean(1)


def evonorm_b0(x, var_b, v, weight, bias, eps: float, var_i=None) -> torch.Tensor:
    """x (N, C, *S); var_b (G, C), G groups of N / G samples (or (1, C)); var_i (N, C) the
    instance variances (None: computed here) -> (N, C, *S)."""
    g, c = var_b.shape
    if var_i is None:
        var_i = moments(x, 1)[0]
    ones = (1,) * (x.dim() - 2)
    xs = x.reshape((g, x.shape[0] // g) + x.shape[1:])  # (G, B, C, *S)
    inst = torch.sqrt(var_i + eps).reshape(xs.shape[:3] + ones)
    shape = (c,) + ones
    batch = torch.sqrt(var_b + eps).reshape((g, 1) + shape)
    den = batch + torch.relu(torch.addcmul(inst, xs, v.reshape(shape)) - batch)  # max(.,.)
    return torch.addcmul(bias.reshape(shape), xs / den, weight.reshape(shape)).reshape(x.shape)


class _ResetsV:
    """reset_parameters resets v, the nonlinearity's parameter, to its initial 1 too."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "v", None) is not None:  # nn.GroupNorm resets before v exists
            nn.init.ones_(self.v)


class EvoNormB0(_ResetsV, StatsNorm):
    """Args: num_features C; norm_batch; unbiased 1: running variance updated with
    var_B n / (n - 1) (timm); eps; momentum. Input (N, C) or (N, C, *spatial)."""

    label = "EvoNorm-B0"

    def __init__(self, num_features, norm_batch, unbiased=0, eps=1e-5, momentum=0.1):
        super().__init__(num_features, norm_batch, eps=eps, momentum=momentum)
        self.unbiased = unbiased
        self.v = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_mean", None)  # B0 divides, it never centres

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def population_forward(self, x: torch.Tensor) -> torch.Tensor:
        var = self.population_moments(x)[1]
        return evonorm_b0(x, var, self.v, self.weight, self.bias, self.eps)

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        return evonorm_b0(x, self.running_var[None], self.v, self.weight, self.bias, self.eps)

    def train_forward(self, x: torch.Tensor, g: int, n: int) -> torch.Tensor:
        x32 = statistics_precision(x)
        var_i, var = moments(x32, g)  # (N, C), (G, C), differentiable
        y = evonorm_b0(x32, var, self.v, self.weight, self.bias, self.eps, var_i).to(x.dtype)
        if self.probe is not None:
            self.probe.stats["used"] = (torch.zeros_like(var), var.detach())
            return y
        with torch.no_grad():
            scale = n / (n - 1) if self.unbiased else 1.0
            self.running_var.copy_(ema_over_groups(self.running_var, var.detach(),
                                                   self.momentum, scale))
        self.num_batches_tracked.add_(1)
        return y

    # ---------------------------------------------------------------- diagnostics (probe.py)
    def eval_statistics(self):
        return torch.zeros_like(self.running_var), self.running_var

    @torch.no_grad()
    def set_population(self, mean, var) -> None:
        self.running_var.copy_(var)

    def reference(self, mean, var):
        return torch.zeros_like(mean), var

    def extra_repr(self) -> str:
        return super().extra_repr() + f", unbiased={self.unbiased}"


class EvoNormS0(_ResetsV, GroupNorm):
    """Args: groups (the rule of gn_groups), C, eps. Input (N, C) or (N, C, *spatial)."""

    def __init__(self, num_groups, num_features, eps=1e-5):
        super().__init__(num_groups, num_features, eps=eps)
        self.v = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        var = group_moments(x.reshape(n, self.num_groups, -1), n)[1]  # (N, groups)
        inv = torch.rsqrt(var + self.eps).repeat_interleave(c // self.num_groups, dim=1)
        shape = (c,) + (1,) * (x.dim() - 2)
        scale = (inv * self.weight).reshape((n,) + shape)  # (N, C, 1, ...)
        return torch.addcmul(self.bias.reshape(shape), x * torch.sigmoid(x * self.v.reshape(
            shape)), scale)


ACT = Neighbours(activation=False)


@register("evonorm-b0", "EvoNorm-B0 (Liu 2020): x / max(batch std, v x + instance std), "
          "includes its nonlinearity (no ReLU after it)",
          {"unbiased": Option(int, 0, lambda v: v in (0, 1), "0 or 1",
                              "running variance x n/(n-1) (official 0; timm 1)"),
           "eps": Option(float, 1e-5, lambda v: v > 0, "> 0",
                         "added to both variances (official 1e-5; timm 1e-3)"),
           "momentum": MOMENTUM},
          neighbours=ACT)
def _evonorm_b0(num_features, norm_batch, **options):
    return EvoNormB0(num_features, norm_batch, **options)


@register("evonorm-s0", "EvoNorm-S0 (Liu 2020): x sigmoid(v x) / group std, includes its "
          "nonlinearity (no ReLU after it); groups = largest divisor of C not above `groups`",
          {"groups": Option(int, 32, lambda v: v >= 1, ">= 1",
                            "channel groups (official 32)"),
           "eps": EPS},
          neighbours=ACT)
def _evonorm_s0(num_features, norm_batch, groups, eps):
    return EvoNormS0(gn_groups(num_features, groups), num_features, eps=eps)
