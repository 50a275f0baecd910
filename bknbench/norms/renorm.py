"""Batch Renormalization (Ioffe, NeurIPS 2017, arXiv 1702.03275), per micro-batch group.

Training, per group g of ``norm_batch`` samples and channel, with (mu, sigma) the running
mean and running standard deviation *before* the group's update:
    mu_B, sigma_B = mean, sqrt(biased variance + eps) of the group
    r = sg(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = sg(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = weight ((x - mu_B) / sigma_B * r + d) + bias
    mu += a (mu_B - mu),  sigma += a (sigma_B - sigma)          (a = momentum)
sg = stop-gradient: the gradient flows through mu_B and sigma_B as in BatchNorm. The G groups
of one forward are G sequential micro-batches: group g sees the running statistics after
groups 0..g-1. Eval: y = weight (x - mu) / sigma + bias.

Schedule (the paper: plain BN, r_max = 1 and d_max = 0, for the first 5k steps, then relaxed
linearly to r_max = 3 at 40k and d_max = 5 at 25k) as fractions of the run's micro-batches
(common.py): plain BN up to ``warmup``, r_max reaching its final value at ``relax``, d_max at
warmup + 4/7 (relax - warmup) (the paper's 5k, 25k, 40k). The defaults 0.05 and 0.4 are the
paper's steps in a run of 100k, the run length a layer outside a bknbench run assumes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..kernels.fused import affine, from_channels, to_channels
from ..kernels.reference import ema_over_groups
from .batch import StatsNorm
from .registry import EPS, TOTAL, Carries, Option, register
from .common import (CountsMicroBatches, eager_when_compiled, ema_before_each,
                     statistics_precision, to_device)

D_SHARE = 4 / 7  # d_max's relaxation ends this share of the way to r_max's: (25k-5k)/(40k-5k)


def ramp(t: int, start: int, end: int, lo: float, hi: float) -> float:
    """lo until micro-batch ``start``, then linear, hi from ``end`` on."""
    if t <= start:
        return lo
    if t >= end:
        return hi
    return lo + (hi - lo) * (t - start) / (end - start)


class _Renormalize(torch.autograd.Function):
    """BRN's training step for G groups: y, and (G, C) mu_B, sigma_B, r, d (no gradient).

    y = weight (x_hat r + d) + bias with x_hat = (x - mu_B) / sigma_B, r and d constants:
    the forward is torch's batch-norm kernel (x_hat and the statistics) and one affine pass,
    the backward one batch-norm backward with weight r (dL/dx_hat = dL/dy weight r)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_std, r_max, d_max,
                momentum: float, groups: int, eps: float):
        xt = statistics_precision(to_channels(x, groups))  # (B, G * C, P)
        xhat, mean, invstd = torch.native_batch_norm(xt, None, None, None, None, True, 0.0, eps)
        m, sigma = mean.view(groups, -1), invstd.reciprocal().view(groups, -1)
        mu_run = ema_before_each(running_mean, m, momentum)  # what each group sees
        sd_run = ema_before_each(running_std, sigma, momentum)
        r = torch.clamp(sigma / sd_run, 1.0 / r_max, r_max)
        d = torch.clamp((m - mu_run) / sd_run, -d_max, d_max)
        w_k = (weight * r).reshape(-1)
        yt = affine(xhat, w_k, torch.addcmul(bias, weight, d).reshape(-1))
        ctx.save_for_backward(xt, mean, invstd, w_k, r, d)
        ctx.groups, ctx.eps, ctx.shape = groups, eps, x.shape
        ctx.mark_non_differentiable(m, sigma, r, d)
        return from_channels(yt.to(x.dtype), groups, x.shape), m, sigma, r, d

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y, *_):
        xt, mean, invstd, w_k, r, d = ctx.saved_tensors
        g = ctx.groups
        g_xt, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            to_channels(g_y, g).to(xt.dtype), xt, w_k, None, None, mean, invstd, True, ctx.eps,
            [True, True, True])  # g_w = sum(dy x_hat), g_b = sum(dy) per (group, channel)
        g_w, g_b = g_w.view(g, -1), g_b.view(g, -1)
        g_weight = (r * g_w + d * g_b).sum(0)
        return (from_channels(g_xt, g, ctx.shape).to(g_y.dtype), g_weight, g_b.sum(0),
                None, None, None, None, None, None, None)


class BatchRenorm(CountsMicroBatches, StatsNorm):
    """Args: num_features C; norm_batch samples per statistic; r_max, d_max final clipping
    bounds; warmup, relax fractions of the run (module docstring); total the run length in
    micro-batches (0: outside a run, 100k assumed); eps; momentum the EMA rate a.
    Input (N, C) or (N, C, *spatial); output the same shape."""

    label = "BatchRenorm"
    reference_run = 100_000

    def __init__(self, num_features, norm_batch, r_max=3.0, d_max=5.0, warmup=0.05,
                 relax=0.4, total=0, eps=1e-5, momentum=0.1):
        super().__init__(num_features, norm_batch, eps=eps, momentum=momentum)
        self.r_max, self.d_max, self.warmup, self.relax, self.total = (
            r_max, d_max, warmup, relax, total)
        self.register_buffer("running_var", None)  # BRN tracks sigma, not sigma^2
        self.register_buffer("num_batches_tracked", None)  # micro_batches counts
        self.register_buffer("running_std", torch.ones(num_features))
        self.init_counter()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.micro_batches.zero_()
        self._seen = 0

    def limits(self, t: int) -> tuple[float, float]:
        """(r_max, d_max) for the micro-batch after ``t`` seen."""
        start, end = self.at(self.warmup), self.at(self.relax)
        d_end = self.at(self.warmup + D_SHARE * (self.relax - self.warmup))
        return (ramp(t, start, end, 1.0, self.r_max), ramp(t, start, d_end, 0.0, self.d_max))

    def eval_forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_std.square() - self.eps,
                            self.weight, self.bias, False, 0.0, self.eps)

    @eager_when_compiled
    def train_forward(self, x: torch.Tensor, g: int, n_values: int) -> torch.Tensor:
        t0 = self.seen()
        limits = [self.limits(t0 + k) for k in range(g)]
        if any(lim != limits[0] for lim in limits):  # the schedule moves within the forward
            r_max, d_max = to_device(limits, x.device, x.dtype).unbind(1)  # no wait
            limits = (r_max[:, None], d_max[:, None])
        else:
            limits = limits[0]
        y, m, sigma, r, d = _Renormalize.apply(x, self.weight, self.bias, self.running_mean,
                                               self.running_std, *limits, self.momentum, g,
                                               self.eps)
        if self.probe is not None:  # what training uses, nothing updated: the (mean, var)
            sd_eff = sigma / r  # that normalize x as y = weight (x - mean) / sd + bias
            self.probe.stats["used"] = (m - d * sd_eff, sd_eff.square() - self.eps)
            return y
        with torch.no_grad():
            self.running_mean.copy_(ema_over_groups(self.running_mean, m, self.momentum))
            self.running_std.copy_(ema_over_groups(self.running_std, sigma, self.momentum))
        self.advance(g)
        return y

    # ---------------------------------------------------------------- diagnostics (probe.py)
    def eval_statistics(self):
        return self.running_mean, self.running_std.square() - self.eps

    @torch.no_grad()
    def set_population(self, mean, var) -> None:
        self.running_mean.copy_(mean)
        self.running_std.copy_(torch.sqrt(var + self.eps))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup={self.warmup}, relax={self.relax}, total={self.total}")


FRACTION = dict(check=lambda v: 0.0 <= v <= 1.0, rule="in [0, 1]")


@register("brn", "Batch Renormalization (Ioffe 2017): BN corrected towards the running "
          "statistics by r, d (no gradient), per micro-batch",
          {"r_max": Option(float, 3.0, lambda v: v >= 1, ">= 1",
                           "final bound on r (paper 3; GN paper's comparison 1.5)"),
           "d_max": Option(float, 5.0, lambda v: v >= 0, ">= 0",
                           "final bound on d (paper 5; GN paper's comparison 0.5)"),
           "warmup": Option(float, 0.05, help="fraction of the run as plain BN "
                            "(paper: 5k steps)", **FRACTION),
           "relax": Option(float, 0.4, help="fraction of the run where r_max is reached "
                           "(paper: 40k steps; d_max at 25k, 4/7 of the way)", **FRACTION),
           "total": TOTAL,
           "eps": EPS,
           "momentum": Option(float, 0.1, lambda v: 0 < v <= 1, "in (0, 1]",
                              "EMA rate of mu, sigma (as bn; ludvb and Keras: 0.01)")},
          carries=Carries("running mean and std, updated after each micro-batch, in the "
                          "next one's r, d"))
def _brn(num_features, norm_batch, **options):
    if options["relax"] < options["warmup"]:
        raise ConfigError(f"brn: relax={options['relax']} ends before warmup="
                          f"{options['warmup']} does")
    return BatchRenorm(num_features, norm_batch, **options)
