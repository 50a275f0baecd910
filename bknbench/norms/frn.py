"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

Per sample n and channel c, nu2 the mean of x^2 over the positions:
    y = weight x / sqrt(nu2 + eps) + bias;  z = max(y, tau)
No centring, no batch statistics: training is evaluation. FRN replaces "norm + ReLU": the
model builder adds no ReLU after it (Neighbours). With one position per channel ((N, C)
features, 1x1 maps) nu2 = x^2 and y is weight sign(x) + bias unless eps is large: there eps
is learned, eps + |eps_l| with eps_l one scalar per layer initialised at 1e-4 (the paper;
TF Addons' learned_epsilon). ``learned_eps``: auto (there only), on (always), off (never,
as timm, which has no learned eps and uses eps 1e-5: ``frn:eps=1e-5,learned_eps=off``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.fused import to_channels
from .common import rms_normalize, second_moment, statistics_precision
from .registry import Neighbours, Option, register


class FilterResponseNorm(nn.Module):
    """Args: num_features C; eps (1e-6, the paper's); learned_eps auto | on | off.
    Input (N, C) or (N, C, *spatial); output the same shape."""

    batch_dependent = False

    def __init__(self, num_features, eps=1e-6, learned_eps="auto"):
        super().__init__()
        self.num_features, self.eps, self.learned_eps = num_features, eps, learned_eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features))
        self.eps_l = nn.Parameter(torch.full((1,), 1e-4))

    def epsilon(self, positions: int):
        learned = self.learned_eps == "on" or (self.learned_eps == "auto" and positions == 1)
        return self.eps + self.eps_l.abs() if learned else self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        per_c = (c,) + (1,) * (x.dim() - 2)
        eps = self.epsilon(x[0, 0].numel())
        tau = self.tau.reshape(per_c)
        if isinstance(eps, float):  # each sample its own group: MABN's node, exact gradient
            with torch.no_grad():
                nu2 = second_moment(statistics_precision(to_channels(x.detach(), n))).view(n, c)
            # max(y, tau) = relu(y - tau) + tau, tau folded into the shift (one pass less)
            y = rms_normalize(x, self.weight, self.bias - self.tau, nu2, torch.ones_like(nu2),
                              n, eps)
        else:  # a learned eps needs its gradient: plain autograd
            nu2 = x.reshape(n, c, -1).square().mean(-1)  # (N, C)
            scale = (torch.rsqrt(nu2 + eps) * self.weight).reshape((n,) + per_c)
            y = torch.addcmul((self.bias - self.tau).reshape(per_c), x, scale)
        return torch.relu(y) + tau  # the backward of torch.maximum is several passes

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learned_eps={self.learned_eps}"


@register("frn", "Filter Response Normalization + TLU (Singh 2020): x / rms over positions, "
          "max(y, tau); includes its nonlinearity (no ReLU after it)",
          {"eps": Option(float, 1e-6, lambda v: v > 0, "> 0",
                         "added to nu^2 (paper 1e-6; timm 1e-5)"),
           "learned_eps": Option(("auto", "on", "off"), "auto",
                                 help="eps + |eps_l| where one position per channel (paper)")},
          neighbours=Neighbours(activation=False))
def _frn(num_features, norm_batch, eps, learned_eps):
    return FilterResponseNorm(num_features, eps=eps, learned_eps=learned_eps)
