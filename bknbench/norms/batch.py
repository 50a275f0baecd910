"""Normalizers with batch statistics or per-sample statistics, and their shared state.

``StatsNorm`` holds what every batch-statistics normalizer has (affine parameters, running
buffers, the split of a batch into statistics groups); ``GroupedBatchNorm`` is BatchNorm per
group of ``norm_batch`` samples. Registered here: bn, bn-accum, gn, ln, none.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from ..kernels.fused import Running, group_moments, group_normalize, update_running
from .probe import Probe
from .registry import EPS, MOMENTUM, Option, register


# ---------------------------------------------------------------- helpers
def values_per_stat(x: torch.Tensor, groups: int) -> int:
    """How many values stand behind each (group, channel) statistic."""
    return (x.shape[0] // groups) * math.prod(x.shape[2:])


def check_defined(n_values: int, layer: str, needed: int = 2) -> None:
    if n_values < needed:
        raise ValueError(
            f"{layer} is undefined with {n_values} value per channel per statistic "
            "(micro-batch 1 without spatial positions)"
        )


# ---------------------------------------------------------------- layers
class StatsNorm(nn.Module):
    """Shared state of batch-statistics normalizers: affine parameters, running buffers,
    the split of a forward batch into statistics groups, and the diagnostics protocol
    (probe.py) for layers that evaluate with running_mean and running_var."""

    batch_dependent = True
    label = "BatchNorm"  # the layer's name in messages
    min_values = 2  # values behind each (group, channel) statistic that training needs

    def __init__(self, num_features: int, norm_batch: int | None, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.norm_batch = norm_batch
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.probe: Probe | None = None  # set by the diagnostics for one forward

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def groups_of(self, x: torch.Tensor) -> int:
        n = x.shape[0]
        if self.norm_batch is None or self.norm_batch >= n:
            return 1
        if n % self.norm_batch:
            raise ValueError(f"batch of {n} is not a multiple of norm_batch {self.norm_batch}")
        return n // self.norm_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mode decides: a population probe, eval (running statistics) or training,
        which each normalizer defines in `train_forward`."""
        if self.probe is not None and self.probe.mode == "population":
            return self.population_forward(x)
        if not self.training:
            return self.eval_forward(x)
        g = self.groups_of(x)
        n_values = values_per_stat(x, g)
        check_defined(n_values, self.label, self.min_values)
        return self.train_forward(x, g, n_values)

    def train_forward(self, x: torch.Tensor, groups: int, n_values: int) -> torch.Tensor:
        """x (N, C, *) in G = ``groups`` statistics groups of ``n_values`` values per
        channel -> the same shape."""
        raise NotImplementedError

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    # ---------------------------------------------------------------- diagnostics (probe.py)
    def population_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probe "population": a full-batch BatchNorm, its statistics recorded."""
        # torch's kernel, in one pass over a large probe batch (about twice as fast as
        # group_moments and normalize); it leaves the unbiased variance in the buffer given
        mean, var = x.new_zeros(x.shape[1]), x.new_ones(x.shape[1])
        y = F.batch_norm(x, mean, var, self.weight, self.bias, True, 1.0, self.eps)
        n = x.numel() // x.shape[1]
        self.probe.stats["input"] = (mean[None], var[None] * ((n - 1) / n))  # (1, C)
        return y

    def population_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe "population" for a layer that normalizes its own way: the probe batch's
        (1, C) mean and biased variance, recorded."""
        mean, var = group_moments(x, 1)
        self.probe.stats["input"] = (mean, var)
        return mean, var

    def eval_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.running_mean, self.running_var

    @torch.no_grad()
    def set_population(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)

    def reference(self, mean: torch.Tensor, var: torch.Tensor):
        return mean, var

    def running_buffers(self, rule: str = "observed") -> Running:
        """The running buffers as a training forward updates them (`fused.update_running`;
        `group_normalize` does it in the same call)."""
        return Running(self.running_mean, self.running_var, self.momentum, rule)

    @torch.no_grad()
    def update_running(self, mean, var, n_values: int) -> None:
        """EMA of per-group (mean, biased variance), the variance made unbiased
        (n / (n - 1)) as torch.nn.BatchNorm does."""
        update_running(self.running_buffers(), mean, var, var, None, n_values)
        self.num_batches_tracked.add_(1)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, norm_batch={self.norm_batch}, eps={self.eps}, "
                f"momentum={self.momentum}")


class GroupedBatchNorm(StatsNorm):
    """BatchNorm with statistics per group of ``norm_batch`` samples.

    Training: y = weight * (x - m_g) / sqrt(s_g + eps) + bias, (m_g, s_g) the mean and biased
    variance of group g over its samples and spatial positions. Eval: running statistics,
    exactly as torch.nn.BatchNorm. With one group this is torch.nn.BatchNorm.
    """

    def train_forward(self, x: torch.Tensor, g: int, n_values: int) -> torch.Tensor:
        if self.probe is not None:  # what training would use, without updating anything
            y, mean, var, _, _ = group_normalize(x, None, None, None, self.weight, self.bias,
                                                 g, eps=self.eps)
            self.probe.stats["used"] = (mean, var)
            return y
        if g == 1:  # the fused kernel; it updates the running buffers itself
            self.num_batches_tracked += 1
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, True, self.momentum, self.eps)
        y = group_normalize(x, None, None, None, self.weight, self.bias, g, eps=self.eps,
                            running=self.running_buffers())[0]
        self.num_batches_tracked.add_(1)
        return y


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm; ``norm_batch`` is irrelevant (statistics are per sample)."""

    batch_dependent = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def gn_groups(num_features: int, groups: int) -> int:
    """The rule for few channels: the largest divisor of C that is <= the requested groups
    (GroupNorm needs C divisible by the group count), so C=12, groups=8 gives 6."""
    g = max(1, min(groups, num_features))
    while num_features % g:
        g -= 1
    return g


@register("bn", "BatchNorm, statistics over each micro-batch",
          {"eps": EPS, "momentum": MOMENTUM})
def _bn(num_features, norm_batch, eps, momentum):
    return GroupedBatchNorm(num_features, norm_batch, eps=eps, momentum=momentum)


@register("bn-accum", "BatchNorm on micro-batches with gradient accumulation to "
          "--accumulate-to samples per step (one grouped forward)",
          {"eps": EPS, "momentum": MOMENTUM}, accumulates=True)
def _bn_accum(num_features, norm_batch, eps, momentum):
    return GroupedBatchNorm(num_features, norm_batch, eps=eps, momentum=momentum)


@register("gn", "GroupNorm; groups = largest divisor of C not above `groups`",
          {"groups": Option(int, 8, lambda v: v >= 1, ">= 1", "number of channel groups"),
           "eps": EPS})
def _gn(num_features, norm_batch, groups, eps):
    return GroupNorm(gn_groups(num_features, groups), num_features, eps=eps)


@register("ln", "LayerNorm over channels and positions (GroupNorm with one group)",
          {"eps": EPS})
def _ln(num_features, norm_batch, eps):
    return GroupNorm(1, num_features, eps=eps)


@register("none", "no normalization (identity)")
def _none(num_features, norm_batch):
    return nn.Identity()
