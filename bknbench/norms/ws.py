"""Weight Standardization + GroupNorm (Qiao et al., arXiv 1903.10520).

The layer is GroupNorm; what makes it WS+GN is what it asks of its neighbours: the model
builder puts `Standardized` on the weight of the convolution or linear layer feeding it,
    W_hat[o] = (W[o] - mean W[o]) / sqrt(var W[o] + eps)   per output channel o
(biased variance, eps 1e-6 inside the square root: timm's StdConv2d; the authors' PyTorch
code takes the unbiased std plus 1e-5. Every filter of a layer has the same fan-in, so the
two differ by a common factor that the GroupNorm after it removes, up to eps.)
Groups: the rule of `gn` (largest divisor of C not above ``groups``), default 8 as `gn`, so
that ws-gn against gn is weight standardization alone (the paper: 32, on ImageNet ResNets).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .batch import GroupNorm, gn_groups
from .registry import EPS, Neighbours, Option, register


class Standardized(nn.Module):
    """Parametrization: each output channel's weights (dim 0) to mean 0 and variance 1."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), keepdim=True,
                                   correction=0)
        return (w - mean) * torch.rsqrt(var + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@register("ws-gn", "Weight Standardization of the feeding conv/linear + GroupNorm (Qiao "
          "2019); groups = largest divisor of C not above `groups`",
          {"groups": Option(int, 8, lambda v: v >= 1, ">= 1",
                            "channel groups (as gn; the paper 32)"),
           "eps": EPS,
           "ws_eps": Option(float, 1e-6, lambda v: v > 0, "> 0",
                            "added to each filter's variance (timm 1e-6)")},
          neighbours=lambda o: Neighbours(weight=partial(Standardized, o["ws_eps"])))
def _ws_gn(num_features, norm_batch, groups, eps, ws_eps):
    return GroupNorm(gn_groups(num_features, groups), num_features, eps=eps)
