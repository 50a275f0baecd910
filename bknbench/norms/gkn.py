"""Group Kalman Normalization (the NeurIPS 2018 version of Kalman Normalization): the BKN
prediction fused with Group Normalization statistics instead of batch statistics.

Everything is per sample, as in GroupNorm, so training and evaluation compute the same thing
and the batch size plays no role. Per sample n and channel c the observation (m, s) is the
mean and biased variance over positions; it is fused with the prediction from the preceding
layer exactly as in BKN (`kalman_update`). The fused per-channel moments are then pooled
over the channels of each GroupNorm group as a mixture:

    mu_j  = mean_{c in j} mu_c
    var_j = mean_{c in j} (var_c + mu_c^2) - mu_j^2

With p = 0 (or when the guard rejects the prediction) these are GroupNorm's statistics
exactly, so `gkn:p=0` is `gn`. Without positions (an MLP) the per-channel variance is 0, the
guard never trusts the prediction, and the layer is GroupNorm.
"""
from __future__ import annotations

import torch

from ..kernels.fused import group_moments
from ..kernels.reference import kalman_update
from .batch import gn_groups
from .common import statistics_precision
from .kalman import BATCH_ONLY, BKN_OPTIONS, BatchKalmanNorm, Posterior
from .registry import Option, register


class GroupKalmanNorm(BatchKalmanNorm):
    """Args as BatchKalmanNorm (but ``running``: no running statistics), plus ``groups``
    (channel groups, the GroupNorm rule of `gn_groups`). Eval computes what training computes,
    except that a sampled transition is replaced by its expectation (the analytic one) so
    that evaluation is deterministic.
    Input (N, C, *spatial) or (N, C); output the same shape."""

    analytic_in_eval = True  # models.chain.check_chain verifies the ops have analytic rules
    batch_dependent = False  # per-sample statistics: training is evaluation

    def __init__(self, num_features, norm_batch, groups=8, **options):
        super().__init__(num_features, norm_batch, **options)
        self.groups = gn_groups(num_features, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        self.in_shape = tuple(x.shape[2:])
        # (N, C): every sample is its own statistics group; float32 under autocast, as the
        # prediction (kalman.py) and every other normalizer's statistics
        m, s = group_moments(statistics_precision(x), n)
        mu, var, mu_hat, var_hat = m, s, None, None
        if self.prior is not None:
            transition = self.transition if self.training else "analytic"
            mu_hat, var_hat = self.prior.predict(self.propagate, transition, self.draws_for(),
                                                 self.borders)
            # guard_scope "group": each sample (its own statistics group) decides
            mu, var = kalman_update(m, s, mu_hat, var_hat,
                                    self.weight_on_prediction(x[0, 0].numel()), self.guard,
                                    self.guard_scope)
        self.posterior = Posterior(m, s, mu, var, mu_hat, var_hat)
        # pool the per-channel mixture over each channel group: (N, J, C / J)
        mu_g = mu.view(n, self.groups, -1)
        mean_j = mu_g.mean(-1, keepdim=True)
        var_j = (var.view(n, self.groups, -1) + mu_g * mu_g).mean(-1, keepdim=True) - mean_j ** 2
        scale = (torch.rsqrt(var_j.clamp_min(0) + self.eps).expand_as(mu_g).reshape(n, c)
                 * self.weight)
        shift = self.bias - mean_j.expand_as(mu_g).reshape(n, c) * scale
        view = (n, c) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(view), x, scale.view(view)).to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}"


@register("gkn", "Group Kalman Normalization: per-sample GroupNorm statistics fused with "
          "the prediction from the preceding layers (NeurIPS version)",
          {**{k: o for k, o in BKN_OPTIONS.items() if k not in BATCH_ONLY},
           "groups": Option(int, 8, lambda v: v >= 1, ">= 1", "number of channel groups")},
          chained=True)
def _gkn(num_features, norm_batch, **options):
    return GroupKalmanNorm(num_features, norm_batch, **options)
