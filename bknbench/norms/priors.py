"""BKN's priors: what feeds a layer (the distribution reaching it from its predecessors,
`Path` and `SumPrior`) and what a layer hands on (`Posterior`). The model builder wires
them (models/chain.py, models/resnet.py); norms/kalman.py holds the layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .transitions import chain_rules, exact_without_sampling, full_precision, sampled_moments


# ---------------------------------------------------------------- priors: what feeds a layer
@dataclass(eq=False)
class Path:
    """The distribution reaching a layer from ``source`` through ``ops``.

    tap="input": the statistics of the source's own (pre-normalization) input, used by
    identity shortcuts. tap="prediction": the source's prediction of them (the authors'
    residual stream). tap="output": what the source hands on; paper-faithful layers use the
    source's raw posterior here (as the authors' code does), ``propagate=output`` layers use
    the moments of the source's normalized output.
    """

    source: "BatchKalmanNorm"
    ops: tuple[nn.Module, ...] = ()
    tap: str = "output"
    _rules: dict = field(default_factory=dict, repr=False, init=False)

    def start(self, propagate: str):
        post = self.source.posterior
        if post is None:
            raise RuntimeError("BKN chain: a predecessor did not run in this forward pass")
        if self.tap == "output" and propagate == "output":
            return post.output_moments(self.source)
        if self.tap == "prediction":
            if post.mu_hat is None:
                raise RuntimeError("BKN chain: tap 'prediction' on a layer without a prior")
            return post.mu_hat, post.var_hat
        return post.mu, post.var

    def rules(self, borders: str) -> list:
        """The analytic moment rules of the ops, looked up once (the ops never change)."""
        if borders not in self._rules:
            self._rules[borders] = chain_rules(self.ops, borders)
        return self._rules[borders]

    @cached_property
    def passes_exactly(self) -> bool:
        return exact_without_sampling(self.ops)

    def predict(self, propagate: str, transition: str, draws: int, borders: str = "exact"):
        """(mu_hat, var_hat), (G, C_out), in the dtype of the source's statistics (float32
        under autocast, as the observed ones)."""
        mean, var = self.start(propagate)
        if transition == "sampled" and not self.passes_exactly:
            out = sampled_moments(mean, var, self.ops, self.source.in_shape, draws)
            return out[0].to(mean.dtype), out[1].to(mean.dtype)
        # sampled: parameter-free ops (a shortcut) pass exactly, borders as the ops see them
        shape = self.source.in_shape
        with full_precision(mean.device.type):
            for rule in self.rules(borders if transition == "analytic" else "exact"):
                mean, var, shape = rule(mean, var, shape)
        return mean, var


@dataclass(eq=False)
class SumPrior:
    """A sum of independent branches (residual block): means add, variances add."""

    terms: tuple[Path, ...]

    def predict(self, propagate, transition, draws, borders="exact"):
        parts = [t.predict(propagate, transition, draws, borders) for t in self.terms]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)


@dataclass
class Posterior:
    m: torch.Tensor  # observed mean (G, C)
    s: torch.Tensor  # observed biased variance (G, C)
    mu: torch.Tensor  # posterior mean (G, C)
    var: torch.Tensor  # posterior variance (G, C)
    mu_hat: torch.Tensor | None = None  # prediction (G, C), None without a prior
    var_hat: torch.Tensor | None = None

    def output_moments(self, layer: "BatchKalmanNorm"):
        """Per-group moments of the layer's normalized output y = w (x - mu) / sqrt(var+eps) + b."""
        scale = layer.weight * torch.rsqrt(self.var + layer.eps)
        return (self.m - self.mu) * scale + layer.bias, self.s * scale * scale


def ops_of(prior) -> list[nn.Module]:
    if prior is None:
        return []
    if isinstance(prior, SumPrior):
        return [op for t in prior.terms for op in t.ops]
    return list(prior.ops)
