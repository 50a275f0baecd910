"""Batch Kalman Normalization (arXiv 1802.03133): the pure update, the priors, the layer.

A BKN layer observes per-group statistics (m, s) of its input, predicts them from the
posterior of the preceding normalization layer pushed through the operations between the
two (the transition, transitions.py), and fuses both as a two-component mixture. The model
builder wires each layer's `prior` (`wire_sequence` in models/chain.py, `wire_kalman` in
models/resnet.py); a layer without one uses (m, s) alone. The training step runs the fused
node of kernels/fused.py, which equals `kalman_update` (kernels/reference.py) composed with
the observation and `normalize`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from ..kernels.fused import group_normalize
from ..kernels.reference import RUNNING_RULES
from ..kernels.reference import trusted as reference_trusted
from .batch import StatsNorm
from .registry import EPS, MOMENTUM, Carries, Option, register
from .transitions import (BORDERS, chain_rules, exact_without_sampling, full_precision,
                          sampled_moments)


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


# ---------------------------------------------------------------- the layer
class BatchKalmanNorm(StatsNorm):
    """Batch Kalman Normalization.

    Training, per group g of ``norm_batch`` samples and channel c:
      1. observe (m, s): mean and biased variance over the group's samples and positions;
      2. predict (mu_hat, var_hat) = T(posterior of the preceding layer) via ``prior``;
      3. fuse with ``kalman_update`` (weight p on the prediction, guard);
      4. y = weight * (x - mu) / sqrt(var + eps) + bias;
      5. running statistics: EMA (momentum) of mu and of `running_variance` (n values per
         statistic): by default var + (1 - p)^2 s / (n - 1), unbiased for the population
         variance when the prediction is right, and s n / (n - 1) at p = 0, so p = 0 is BN
         (torch.nn.BatchNorm's convention) in both modes.
    Eval: running statistics, as BatchNorm. Without a prior (first layer): BN per group.

    Args: num_features C; norm_batch samples per statistic; p weight on the prediction;
    gain "fixed" | "learnable" (q = sigmoid(theta), initialised at 1 - p) | "adaptive"
    (p = n0 / (n0 + n): the prediction counts as n0 observed values, so a large group trusts
    itself); transition "analytic" | "sampled"; draws samples per group for "sampled"
    (0: 1 when the output has positions, else 16); propagate "raw" (paper-faithful: the
    predecessor's pre-normalization posterior) | "output" (its normalized output's moments);
    guard (see kalman_update); guard_scope "layer" (one decision over all groups, the
    authors') | "group" (each group decides from its own channel average); running "observed"
    | "posterior" | "authors" (see running_variance); borders "exact" | "ignore" (analytic
    transition, see transitions.py); stream "authors" | "posterior" (ResNets:
    models/resnet.py).
    Input (N, C) or (N, C, *spatial); output the same shape.
    """

    label = "BKN"

    def __init__(self, num_features, norm_batch, p=0.9, gain="fixed", n0=64.0,
                 transition="analytic", draws=0, propagate="raw", guard=100.0,
                 guard_scope="layer", running="observed", borders="exact", stream="authors",
                 eps=1e-5, momentum=0.1):
        super().__init__(num_features, norm_batch, eps=eps, momentum=momentum)
        self.p, self.gain, self.n0 = p, gain, n0
        self.transition, self.draws, self.propagate, self.guard = (
            transition, draws, propagate, guard)
        self.guard_scope, self.running, self.borders, self.stream = (
            guard_scope, running, borders, stream)
        if gain == "learnable":
            q = min(max(1.0 - p, 1e-4), 1 - 1e-4)
            self.gain_logit = nn.Parameter(torch.tensor(math.log(q / (1 - q))))
        self.prior: Path | SumPrior | None = None  # set by the model builder
        # diagnostics (probe.py): while counting, each training forward with a prediction adds
        # whether the guard trusted it (and, for a learnable gain, p then), on the device;
        # training forwards are num_batches_tracked - counted_from
        self.counting = False
        self.register_buffer("guard_trusted", torch.zeros(()), persistent=False)
        self.register_buffer("guard_p_sum", torch.zeros(()), persistent=False)
        self.register_buffer("counted_from", torch.zeros((), dtype=torch.long), persistent=False)
        self.counted_p = math.nan  # a fixed or adaptive gain's p in the counted forwards
        self.posterior: Posterior | None = None  # this forward's, for successors
        self.in_shape: tuple[int, ...] = ()  # spatial shape of the input, for sampling

    # per-forward state, set a few times per layer and step (the model's pre-hook clears it
    # too): plain attributes, past nn.Module.__setattr__, which would look each name up among
    # the parameters, buffers and submodules first (none of these values is one of them)
    _PLAIN = frozenset({"posterior", "in_shape"})

    def __setattr__(self, name, value):
        if name in BatchKalmanNorm._PLAIN:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def weight_on_prediction(self, n_values: int):
        if self.gain == "learnable":
            return 1.0 - torch.sigmoid(self.gain_logit)
        if self.gain == "adaptive":
            return self.n0 / (self.n0 + n_values)
        return self.p

    def draws_for(self) -> int:
        if self.draws:
            return self.draws
        flat = any(isinstance(op, (nn.Linear, nn.Flatten)) for op in ops_of(self.prior))
        return 16 if flat or not self.in_shape else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.posterior = None
        return super().forward(x)

    def train_forward(self, x: torch.Tensor, g: int, n_values: int) -> torch.Tensor:
        self.in_shape = tuple(x.shape[2:])
        mu_hat = var_hat = p = None
        if self.prior is not None:
            draws = self.draws_for() if self.transition == "sampled" else 0
            mu_hat, var_hat = self.prior.predict(self.propagate, self.transition, draws,
                                                 self.borders)
            p = self.weight_on_prediction(n_values)
        # = group_moments, kalman_update (without a prior: none) and normalize, fused, and
        # the running statistics' update (step 5) from the same guard decision; a probe
        # sees what training uses and updates nothing
        running = None if self.probe is not None else self.running_buffers(self.running)
        y, m, s, mu, var = group_normalize(x, mu_hat, var_hat, p, self.weight, self.bias, g,
                                           self.guard, self.eps, self.guard_scope, running)
        if self.probe is not None:
            self.probe.stats.update(observed=(m, s), used=(mu, var))
            if mu_hat is not None:
                self.probe.stats["predicted"] = (mu_hat, var_hat)
        else:
            self.num_batches_tracked.add_(1)
            if self.counting and mu_hat is not None:
                self.count_guard(s, var_hat, p)
        self.posterior = Posterior(m, s, mu, var, mu_hat, var_hat)
        return y

    # ---------------------------------------------------------------- diagnostics counters
    def count_guard(self, s, var_hat, p) -> None:
        """Count one training forward in a few 0-d ops (a step has hundreds), without a host
        sync. The decision is the update's (kernels/reference.py `trusted`); with
        guard_scope "group" a forward counts the fraction of its groups that trusted the
        prediction. A float p is the same in every forward of a run (it depends on the layer
        and the micro-batch only), so only a learnable one is summed."""
        trusted = reference_trusted(s.detach(), var_hat.detach(), self.guard,
                                    self.guard_scope).to(s.dtype).mean()
        self.guard_trusted.add_(trusted)
        if torch.is_tensor(p):
            self.guard_p_sum.add_(trusted * p.detach())
        else:
            self.counted_p = p

    def training_counters(self) -> dict[str, torch.Tensor]:
        """Over the training forwards since reset_counters (NaN when there were none): the
        fraction in which the guard rejected the prediction, and the mean weight p on the
        prediction (0 when rejected). Nothing for a layer without a prediction."""
        if self.prior is None:
            return {}
        n = self.num_batches_tracked - self.counted_from
        p_sum = (self.guard_p_sum if self.gain == "learnable"
                 else self.guard_trusted * self.counted_p)
        return {"guard_rejected": 1.0 - self.guard_trusted / n, "p_effective": p_sum / n}

    def reset_counters(self) -> None:
        self.guard_trusted.zero_()
        self.guard_p_sum.zero_()
        self.counted_from.copy_(self.num_batches_tracked)
        self.counted_p = math.nan

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", p={self.p}, gain={self.gain}, "
                f"transition={self.transition}, propagate={self.propagate}, "
                f"borders={self.borders}, guard_scope={self.guard_scope}, "
                f"running={self.running}, stream={self.stream}, "
                f"chained={self.prior is not None}")


def ops_of(prior) -> list[nn.Module]:
    if prior is None:
        return []
    if isinstance(prior, SumPrior):
        return [op for t in prior.terms for op in t.ops]
    return list(prior.ops)


BKN_OPTIONS = {
    "p": Option(float, 0.9, lambda v: 0.0 <= v <= 1.0, "in [0, 1]",
                "weight on the prediction (Kalman gain q = 1 - p)"),
    "gain": Option(("fixed", "learnable", "adaptive"), "fixed", help="how p is set"),
    "n0": Option(float, 64.0, lambda v: v > 0, "> 0",
                 "adaptive gain: the prediction counts as n0 observed values"),
    "transition": Option(("analytic", "sampled"), "analytic",
                         help="closed-form moments or the authors' Monte-Carlo estimate"),
    "draws": Option(int, 0, lambda v: v >= 0, ">= 0", "samples per group for sampled (0: auto)"),
    "propagate": Option(("raw", "output"), "raw",
                        help="raw: predecessor's pre-norm posterior (paper); output: its output"),
    "guard": Option(float, 100.0, lambda v: v > 0, "> 0",
                    "distrust the prediction when mean(var_hat / s) reaches this"),
    "guard_scope": Option(("layer", "group"), "layer",
                          help="layer: one guard decision over all groups (authors); "
                          "group: each group decides"),
    "running": Option(RUNNING_RULES, "observed",
                      help="running variance: observed: n/(n-1) on the observed part only "
                      "(unbiased); posterior: on the whole posterior; authors: no factor"),
    "borders": Option(BORDERS, "exact",
                      help="analytic transition: exact: zero padding and borders counted; "
                      "ignore: every position sees a full kernel"),
    "stream": Option(("authors", "posterior"), "authors",
                     help="resnet shortcut term: authors: the prediction passed into the "
                     "block; posterior: the block input's posterior"),
    "eps": EPS,
    "momentum": MOMENTUM,
}


@register("bkn", "Batch Kalman Normalization: micro-batch statistics fused with a "
          "prediction from the preceding layers", BKN_OPTIONS, chained=True,
          carries=lambda options: Carries("guard_scope=layer: one guard decision over all "
                                          "micro-batches of the forward", backwards=True)
          if options["guard_scope"] == "layer" else None)
def _bkn(num_features, norm_batch, **options):
    return BatchKalmanNorm(num_features, norm_batch, **options)
