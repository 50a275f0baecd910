"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021; Howal/Cross-iterationBatchNorm).

Per micro-batch (the G groups of a forward are G sequential micro-batches) and channel c,
with y the layer's input, produced by the convolution or linear layer W that the model
builder attaches (its input x_in is caught by a forward pre-hook):
    mu_t = mean(y_c),  nu_t = mean(y_c^2),
    d mu_c / dW[c] = mean of the input patches,  d nu_c / dW[c] = 2 mean(y_c patch)
For each of the last ``window`` micro-batches tau, its statistics at today's weights by a
first-order Taylor expansion:
    mu_tau(W_t) = mu_tau + rho <d mu_tau / dW, W_t - W_tau>,  nu_tau(W_t) likewise;
a past entry is dropped (per channel) where nu - mu^2 < 0; the current one always counts.
    mu = mean of the kept mu,  var = mean of the kept nu - mu^2
    y = weight (x - mu) / sqrt(var + eps) + bias
Gradients flow through the current mu_t, nu_t only (the past is constant, as in the
reference). Burn-in: plain BN for the first ``burnin`` fraction of the run (0.67: the
reference's 8 of 12 epochs, as meant; its configs as shipped count 8 iterations); entries
are kept only after it. Running statistics (eval): BN's, from the current micro-batch only.
Without an attached layer (a layer alone) the window is averaged uncompensated (rho = 0).
The rings are buffers, so a checkpoint resumes them (the reference keeps Python lists).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels.fused import group_moments
from .batch import StatsNorm
from .registry import EPS, MOMENTUM, TOTAL, Carries, Neighbours, Option, register
from .common import (CountsMicroBatches, agreed, eager_when_compiled, normalize_given, push,
                     statistics_precision, window_sums)

CONV_WEIGHT = ((nn.Conv1d, torch.nn.grad.conv1d_weight), (nn.Conv2d, torch.nn.grad.conv2d_weight))


def conv_weight_grad(feed: nn.Module):
    """torch.nn.grad's weight gradient for a 1-D or 2-D convolution, else None."""
    return next((fn for kind, fn in CONV_WEIGHT if isinstance(feed, kind)), None)


def weight_moments(feed: nn.Module, x_in: torch.Tensor, y: torch.Tensor, groups: int):
    """Per group: d mu_c / d W[c] (the same for every c) and d nu_c / d W[c] of the layer
    ``feed`` (y = feed(x_in) + terms without W), flattened over W's input dimensions.

    x_in (N, C_in, *S) or (N, D); y (N, C, *S') -> pmean (G, D), gnu (G, C, D)."""
    n, c = y.shape[:2]
    b = n // groups
    if isinstance(feed, nn.Linear):
        xg, yg = x_in.reshape(groups, b, -1), y.reshape(groups, b, c)
        return xg.mean(1), torch.einsum("gbc,gbd->gcd", yg, xg).mul_(2.0 / b)
    count = b * y[0, 0].numel()
    # groups become convolution groups: (N, C, *S) -> (B, G * C, *S)
    xs = x_in.reshape(groups, b, *x_in.shape[1:]).transpose(0, 1).flatten(1, 2)
    ys = y.reshape(groups, b, *y.shape[1:]).transpose(0, 1).flatten(1, 2)
    grad_w = conv_weight_grad(feed)
    k = feed.weight.shape[1:]
    opts = dict(stride=feed.stride, padding=feed.padding, dilation=feed.dilation, groups=groups)
    gnu = grad_w(xs, (groups * c,) + k, ys * (2.0 / count), **opts)
    ones = torch.full((b, groups) + ys.shape[2:], 1.0 / count, dtype=y.dtype, device=y.device)
    pmean = grad_w(xs, (groups,) + k, ones, **opts)
    return pmean.reshape(groups, -1), gnu.reshape(groups, c, -1)


class _CatchInput:
    """Forward pre-hook on the attached layer: hands its input to the CBN layer."""

    def __init__(self, layer: "CrossIterationBatchNorm"):
        self.layer = layer

    def __call__(self, module, args):
        if self.layer.training:  # a value, not the graph: the model stays deep-copyable
            self.layer.feed_input = args[0].detach()


class CrossIterationBatchNorm(CountsMicroBatches, StatsNorm):
    """Args: num_features C; norm_batch; window past micro-batches; burnin fraction of the
    run; rho the weight of the compensation (0: the naive cross-iteration average); total
    the run length in micro-batches (0: outside a run, no burn-in); weight_init "one" (BN's
    weight 1) | "uniform" (U(0, 1), the reference's); eps; momentum.
    Input (N, C) or (N, C, *spatial); output the same shape."""

    label = "CBN"

    def __init__(self, num_features, norm_batch, window=3, burnin=0.67, rho=1.0, total=0,
                 weight_init="one", eps=1e-5, momentum=0.1):
        super().__init__(num_features, norm_batch, eps=eps, momentum=momentum)
        self.weight_init = weight_init
        self.window, self.burnin, self.rho, self.total = window, burnin, rho, total
        k = window
        self.register_buffer("ring_mu", torch.zeros(k, num_features))
        self.register_buffer("ring_nu", torch.zeros(k, num_features))
        self.register_buffer("ring_kept", torch.zeros(k, dtype=torch.bool))  # after burn-in
        self.init_counter()
        self._feed: tuple[nn.Module, ...] = ()  # a tuple: not registered as a submodule
        self.feed_input: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight_init == "uniform":  # the reference's nn.init.uniform_
            nn.init.uniform_(self.weight)

    @property
    def feed(self) -> nn.Module | None:
        return self._feed[0] if self._feed else None

    def attach(self, feed: nn.Module) -> None:
        """Compensate for the weight of ``feed``, the layer producing this layer's input."""
        known = isinstance(feed, nn.Linear) or conv_weight_grad(feed) is not None
        if not known or getattr(feed, "groups", 1) != 1 or (
                getattr(feed, "padding_mode", "zeros") != "zeros"):
            raise ConfigError(f"cbn: no closed-form weight gradient for {feed}")
        self._feed = (feed,)
        d = feed.weight[0].numel()
        c = self.num_features
        w = feed.weight.detach()
        self.register_buffer("ring_pmean", w.new_zeros(self.window, d))
        self.register_buffer("ring_gnu", w.new_zeros(self.window, c, d))
        self.register_buffer("ring_weight", w.new_zeros(self.window, c, d))
        feed.register_forward_pre_hook(_CatchInput(self))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        for name, buf in self.named_buffers(recurse=False):
            if name.startswith("ring_"):
                buf.zero_()
        self.micro_batches.zero_()
        self._seen = 0

    def past(self, dtype):
        """The stored micro-batches at today's weights: mu, nu (window, C), and which count."""
        mu, nu = self.ring_mu.to(dtype), self.ring_nu.to(dtype)
        if self.feed is not None and self.rho:
            delta = self.feed.weight.detach().reshape(1, self.num_features, -1) - self.ring_weight
            mu = mu + self.rho * torch.einsum("kcd,kd->kc", delta, self.ring_pmean)
            nu = nu + self.rho * (delta * self.ring_gnu).sum(-1)
        return mu, nu, self.ring_kept[:, None] & (nu - mu.square() >= 0)

    def window_statistics(self, m, s, t0: int):
        """The statistics each group normalizes with, (G, C): the compensated past and the
        earlier groups of this forward (the same weights: exact), and the group itself."""
        g = m.shape[0]
        mu_p, nu_p, kept_p = self.past(m.dtype)
        nu_t = s + m.square()
        burnt = agreed(self.burnt(t0, g), m.device)  # an entry counts after the burn-in
        kept_new = (torch.full_like(m, float(burnt)) if isinstance(burnt, bool)
                    else burnt.to(m.dtype).expand_as(m))
        k = self.window
        cnt = window_sums(kept_p.to(m.dtype), kept_new, k) + 1.0
        sum_mu = window_sums(mu_p * kept_p, m.detach() * kept_new, k)
        sum_nu = window_sums(nu_p * kept_p, nu_t.detach() * kept_new, k)
        mu = (sum_mu + m) / cnt
        return mu, (sum_nu + nu_t) / cnt - mu.square(), nu_t

    def burnt(self, t0: int, g: int) -> list[bool]:
        """Per group of a forward: past the burn-in (its entry counts for later ones)."""
        return [t0 + j >= self.at(self.burnin) for j in range(g)]

    @eager_when_compiled
    def train_forward(self, x: torch.Tensor, g: int, n_values: int) -> torch.Tensor:
        m, s = group_moments(statistics_precision(x), g)  # (G, C), differentiable
        t0 = self.seen()
        if self.window:
            mu, var, nu_t = self.window_statistics(m, s, t0)
            var = var.clamp_min(0.0)
        else:
            mu, var = m, s
        y = normalize_given(x, mu, var, self.weight, self.bias, g, self.eps)
        if self.probe is not None:  # what training uses, nothing updated
            self.probe.stats["used"] = (mu.detach(), var.detach())
            return y
        if self.window:
            self.remember(x, m.detach(), nu_t.detach(), g, t0)
        self.update_running(m.detach(), s.detach(), n_values)
        self.advance(g)
        return y

    @torch.no_grad()
    def remember(self, x, m, nu, g: int, t0: int) -> None:
        """Push the last ``window`` groups of this forward into the rings."""
        j = max(0, g - self.window)  # the first group kept
        push(self.ring_mu, m[j:])
        push(self.ring_nu, nu[j:])
        flags = self.burnt(t0, g)[j:]
        kept = agreed(flags, x.device)  # a fill, not a copy from the host, when they agree
        push(self.ring_kept, torch.full((g - j,), kept, device=x.device)
             if isinstance(kept, bool) else kept[:, 0])
        if self.feed is None:
            return
        if self.feed_input is None:
            raise RuntimeError("cbn: the attached layer did not run before this layer")
        n = x.shape[0] // g * (g - j)  # samples of the groups kept
        if any(flags) and self.rho:  # nothing to compensate in burn-in
            pmean, gnu = weight_moments(self.feed, statistics_precision(self.feed_input[-n:]),
                                        statistics_precision(x[-n:].detach()), g - j)
        else:
            pmean = self.ring_pmean.new_zeros((g - j,) + self.ring_pmean.shape[1:])
            gnu = self.ring_gnu.new_zeros((g - j,) + self.ring_gnu.shape[1:])
        self.feed_input = None  # used: not kept alive until the next step
        push(self.ring_pmean, pmean)
        push(self.ring_gnu, gnu)
        w = self.feed.weight.detach().reshape(1, self.num_features, -1)
        push(self.ring_weight, w.expand(g - j, -1, -1))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", window={self.window}, burnin={self.burnin}, "
                f"rho={self.rho}, total={self.total}, weight_init={self.weight_init}, "
                f"attached={self.feed is not None}")


@register("cbn", "Cross-Iteration BN (Yao 2021): statistics over the last micro-batches, "
          "compensated for the weight change of the layer feeding it",
          {"window": Option(int, 3, lambda v: v >= 0, ">= 0",
                            "past micro-batches averaged (reference: 3)"),
           "burnin": Option(float, 0.67, lambda v: 0 <= v <= 1, "in [0, 1]",
                            "fraction of the run as plain BN (reference: 8 of 12 epochs)"),
           "rho": Option(float, 1.0, lambda v: v >= 0, ">= 0",
                         "weight of the Taylor compensation (0: naive average)"),
           "total": TOTAL,
           "weight_init": Option(("one", "uniform"), "one",
                                 help="the norm's weight starts at 1 (as bn) or U(0, 1) "
                                      "(reference)"),
           "eps": EPS,
           "momentum": MOMENTUM},
          neighbours=Neighbours(feed=True),
          carries=Carries("statistics of the last `window` micro-batches"))
def _cbn(num_features, norm_batch, **options):
    return CrossIterationBatchNorm(num_features, norm_batch, **options)
