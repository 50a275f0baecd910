"""Moving Average Batch Normalization (Yan et al., ICLR 2020; megvii-model/MABN, MABN.py).

No mean subtraction: the statistic is chi = mean of x^2 per channel. Per micro-batch t (the
G groups of a forward are G sequential micro-batches), with K = max(1, batch / norm_batch):
    chi_t = mean over the micro-batch of x^2
    chi_S = SMA of chi over the last K micro-batches, current included (chi_t before that)
    z = x / sqrt(chi_S + eps);  r = clip(sqrt(chi_S + eps) / sqrt(chi_E + eps), 1/5, 5)
    y = weight r z + bias;  chi_E = EMA of chi_S (momentum 0.02 = MABN's 0.98 kept)
with chi_E before the micro-batch's update, r = 1 during the r warm-up. Backward (custom):
    g = dL/dy weight r;  psi_t = mean(g z);  psi = SMA of psi over the last K backward calls
    dL/dx = (g - z psi) / sqrt(chi_S + eps)
the exact gradient of x / sqrt(mean(x^2) + eps) with psi replaced by its moving average.
Eval: y = weight x / sqrt(chi_E + eps) + bias.

Phases (MABN.py: current statistics while t <= K or t < warmup_iters = 100; r = 1 while
t <= max(1000, warmup_iters); the det run has 180k iterations), as fractions of the run:
the SMAs from micro-batch max(K + 1, warmup) on, r from max(that, r_warmup + 1) on. Defaults
100/180k and 1000/180k (5.56e-4, 5.56e-3): the SMAs from micro-batch 100 and r from 1001 of
180k exactly, as MABN.py; 180k micro-batches is the run assumed outside a bknbench run.

``center=1`` asks the model builder to centre the weight of the layer feeding each MABN layer
(W minus its mean over input channels and kernel, per output channel: MABN's CenConv2d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fused import to_channels
from ..kernels.reference import ema_over_groups
from .batch import StatsNorm
from .registry import EPS, TOTAL, Carries, Neighbours, Option, register
from .common import (CountsMicroBatches, agreed, choose, eager_when_compiled, ema_before_each, push,
                     rms_normalize, second_moment, statistics_precision, window_sums)

R_CLIP = 5.0  # r in [1/5, 5] (MABN.py)
REFERENCE_RUN = 180_000  # micro-batches of the MABN detection run
WARMUP = 100 / REFERENCE_RUN  # the SMAs from micro-batch 100 of it (MABN.py warmup_iters)
R_WARMUP = 1000 / REFERENCE_RUN  # r = 1 through micro-batch 1000 of it


class Centred(nn.Module):
    """Parametrization: W minus its mean over everything but the output channel (dim 0)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True)


class MovingAverageBatchNorm(CountsMicroBatches, StatsNorm):
    """Args: num_features C; norm_batch; batch the samples the moving averages stand for
    (K = batch / norm_batch micro-batches); warmup, r_warmup fractions of the run; total
    the run length in micro-batches; ema_init "first" (chi_E starts at the first
    micro-batch's chi) | "one"; center (read by the model builder); eps; momentum.
    Input (N, C) or (N, C, *spatial); output the same shape."""

    reference_run = REFERENCE_RUN
    label = "MABN"
    min_values = 1  # a second moment is defined on one value

    def __init__(self, num_features, norm_batch, batch=32, warmup=WARMUP, r_warmup=R_WARMUP,
                 total=0, ema_init="first", center=1, eps=1e-5,
                 momentum=0.02):
        super().__init__(num_features, norm_batch, eps=eps, momentum=momentum)
        self.window = max(1, batch // (norm_batch or batch))  # K
        self.batch, self.warmup, self.r_warmup, self.total = batch, warmup, r_warmup, total
        self.ema_init, self.center = ema_init, center
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, None)
        self.register_buffer("running_chi", torch.ones(num_features))  # chi_E
        self.register_buffer("ring_chi", torch.zeros(self.window - 1, num_features))
        self.register_buffer("ring_psi", torch.zeros(self.window - 1, num_features))
        self.init_counter()

    def reset_running_stats(self) -> None:
        self.running_chi.fill_(1.0)
        self.ring_chi.zero_()
        self.ring_psi.zero_()
        self.micro_batches.zero_()
        self._seen = 0

    def phases(self) -> tuple[int, int]:
        """(first micro-batch, 1-based, of the SMAs; first with r active)."""
        sma = max(self.window + 1, self.at(self.warmup))
        return sma, max(sma, self.at(self.r_warmup) + 1)

    def population_forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.population_moments(x)
        return self.normalize_by(x, var[0] + mean[0].square())

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize_by(x, self.running_chi)

    @eager_when_compiled
    def train_forward(self, x: torch.Tensor, g: int, n_values: int) -> torch.Tensor:
        with torch.no_grad():
            chi_t = second_moment(statistics_precision(to_channels(x.detach(), g))).view(g, -1)
            t = [self.seen() + j + 1 for j in range(g)]  # 1-based micro-batch numbers
            sma_from, r_from = self.phases()
            k = self.window
            average = agreed([i >= sma_from for i in t], x.device)
            chi_s = choose(average, (window_sums(self.ring_chi, chi_t, k - 1) + chi_t) / k,
                           chi_t)
            chi_e = (chi_s[0] if t[0] == 1 and self.ema_init == "first"
                     else self.running_chi)
            r_on = agreed([i >= r_from for i in t], x.device)
            if r_on is False:
                r = torch.ones_like(chi_s)
            else:
                before = ema_before_each(chi_e, chi_s, self.momentum)
                r = torch.sqrt((chi_s + self.eps) / (before + self.eps)).clamp_(1 / R_CLIP,
                                                                                R_CLIP)
                r = choose(r_on, r, torch.ones_like(r))
        probing = self.probe is not None
        y = rms_normalize(x, self.weight, self.bias, chi_s, r, g, self.eps, average,
                          None if probing else self.ring_psi)
        if probing:  # what training uses: y = weight x / sqrt(chi_used + eps) + bias
            self.probe.stats["used"] = (torch.zeros_like(chi_s),
                                        (chi_s + self.eps) / r.square() - self.eps)
            return y
        with torch.no_grad():
            push(self.ring_chi, chi_t)
            self.running_chi.copy_(ema_over_groups(chi_e, chi_s, self.momentum))
        self.advance(g)
        return y

    def normalize_by(self, x, chi):
        """y = weight x / sqrt(chi + eps) + bias, chi (C,)."""
        return F.batch_norm(x, torch.zeros_like(chi), chi, self.weight, self.bias, False, 0.0,
                            self.eps)

    # ---------------------------------------------------------------- diagnostics (probe.py)
    def eval_statistics(self):
        return torch.zeros_like(self.running_chi), self.running_chi

    @torch.no_grad()
    def set_population(self, mean, var) -> None:
        self.running_chi.copy_(var + mean.square())

    def reference(self, mean, var):
        return torch.zeros_like(mean), var + mean.square()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, norm_batch={self.norm_batch}, window={self.window}, "
                f"warmup={self.warmup:.3g}, r_warmup={self.r_warmup:.3g}, total={self.total}, "
                f"center={self.center}, eps={self.eps}, momentum={self.momentum}")


def _neighbours(options) -> Neighbours:
    return Neighbours(weight=Centred if options["center"] else None)


@register("mabn", "Moving Average BN (Yan 2020): no centring, SMA statistics in the forward "
          "and of the gradient term in the backward, EMA-based correction r",
          {"batch": Option(int, 32, lambda v: v >= 1, ">= 1",
                           "samples the SMAs stand for: K = batch / micro-batch (MABN: 32)"),
           "warmup": Option(float, WARMUP, lambda v: 0 <= v <= 1, "in [0, 1]",
                            "fraction of the run before the SMAs (MABN: 100 of 180k)"),
           "r_warmup": Option(float, R_WARMUP, lambda v: 0 <= v <= 1, "in [0, 1]",
                              "fraction of the run with r = 1 (MABN: 1000 of 180k)"),
           "total": TOTAL,
           "ema_init": Option(("first", "one"), "first",
                              help="chi_E starts at the first micro-batch's (cls/) or at 1"),
           "center": Option(int, 1, lambda v: v in (0, 1), "0 or 1",
                            "centre the feeding layer's weight (MABN's CenConv)"),
           "eps": EPS,
           "momentum": Option(float, 0.02, lambda v: 0 < v <= 1, "in (0, 1]",
                              "EMA rate of chi_E (MABN: 0.98 kept)")},
          neighbours=_neighbours,
          carries=Carries("SMA of the last K micro-batches' chi, and chi_E in r"))
def _mabn(num_features, norm_batch, **options):
    return MovingAverageBatchNorm(num_features, norm_batch, **options)
