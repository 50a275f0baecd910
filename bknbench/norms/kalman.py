"""Batch Kalman Normalization (arXiv 1802.03133): the layer, `bkn` and `bkn-authors`.

A BKN layer observes per-group statistics (m, s) of its input, predicts them from the
posterior of the preceding normalization layer pushed through the operations between the
two (the transition, transitions.py; the priors in priors.py), and fuses both as a
two-component mixture. The model
builder wires each layer's `prior` (`wire_sequence` in models/chain.py, `wire_kalman` in
models/resnet.py); a layer without one uses (m, s) alone. The training step runs the fused
node of kernels/fused.py, which equals `kalman_update` (kernels/reference.py) composed with
the observation and `normalize`.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..kernels.fused import group_normalize, update_running
from ..kernels.reference import RUNNING_RULES, guarded_gain
from ..kernels.reference import trusted as reference_trusted
from .batch import StatsNorm
from .registry import EPS, MOMENTUM, Carries, Option, register
from .priors import Path, Posterior, SumPrior, ops_of  # noqa: F401 (the layer's API)
from .transitions import BORDERS


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
    transition, see transitions.py); stream "authors" | "posterior" and shortcut_pad "group"
    | "flat" (ResNets: models/resnet.py); running_groups "all" | "first" (`update_own`);
    stem_var "biased" | "unbiased" and stem_grad "flows" | "stopped" (a layer without a
    prior: `handed_on`); one_value "refuse" | "allow" (one value per statistic). The
    authors' choice of each is the default of `bkn-authors` (AUTHORS).
    Input (N, C) or (N, C, *spatial); output the same shape.
    """

    label = "BKN"

    def __init__(self, num_features, norm_batch, p=0.9, gain="fixed", n0=64.0,
                 transition="analytic", draws=0, propagate="raw", guard=100.0,
                 guard_scope="layer", running="observed", borders="exact", stream="authors",
                 running_groups="all", stem_var="biased", stem_grad="flows",
                 shortcut_pad="group", one_value="refuse", eps=1e-5, momentum=0.1):
        super().__init__(num_features, norm_batch, eps=eps, momentum=momentum)
        self.running_groups, self.stem_var, self.stem_grad = running_groups, stem_var, stem_grad
        self.shortcut_pad = shortcut_pad
        self.min_values = 1 if one_value == "allow" else 2
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
        # the authors' rule (running_groups="first") and a single value (s = 0) update here
        own = self.running_groups == "first" or n_values == 1
        running = (None if self.probe is not None or own
                   else self.running_buffers(self.running))
        y, m, s, mu, var = group_normalize(x, mu_hat, var_hat, p, self.weight, self.bias, g,
                                           self.guard, self.eps, self.guard_scope, running)
        if self.probe is not None:
            self.probe.stats.update(observed=(m, s), used=(mu, var))
            if mu_hat is not None:
                self.probe.stats["predicted"] = (mu_hat, var_hat)
        else:
            self.num_batches_tracked.add_(1)
            if own:
                self.update_own(mu, var, s, var_hat, p, n_values)
            if self.counting and mu_hat is not None:
                self.count_guard(s, var_hat, p)
        self.posterior = Posterior(m, s, mu, var, mu_hat, var_hat)
        if self.prior is None:
            self.posterior = self.handed_on(self.posterior, n_values)
        return y

    @torch.no_grad()
    def update_own(self, mu, var, s, var_hat, p, n_values: int) -> None:
        """The running update outside the fused node: of group 0 only, once per forward
        (running_groups "first", the authors' `batch_mean[:n_out]`), or of every group;
        with one value per statistic (s = 0) the n / (n - 1) factors multiply 0 (TF's
        fused_batch_norm returns variance 0 there too), so n = 2 stands in for n = 1."""
        pe = None if var_hat is None else guarded_gain(p, s, var_hat, self.guard,
                                                       self.guard_scope)
        k = 1 if self.running_groups == "first" else mu.shape[0]
        if pe is not None and pe.dim():
            pe = pe[:k]
        update_running(self.running_buffers(self.running), mu[:k], var[:k], s[:k], pe,
                       max(n_values, 2))

    def handed_on(self, post: Posterior, n_values: int) -> Posterior:
        """What a layer without a prior (the stem) hands on. The authors' first layer is
        tf.nn.fused_batch_norm, whose variance output is unbiased (stem_var "unbiased":
        var n / (n - 1)) and whose gradient ignores its statistics outputs (stem_grad
        "stopped": they are constants for backpropagation)."""
        if self.stem_var == "unbiased":
            n = max(n_values, 2)
            post = replace(post, var=post.var * (n / (n - 1)))
        if self.stem_grad == "stopped":
            post = Posterior(*(t.detach() for t in (post.m, post.s, post.mu, post.var)))
        return post

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
    "running_groups": Option(("all", "first"), "all",
                             help="running statistics: one EMA update per group, or of "
                             "group 0 only, once per forward (authors)"),
    "stem_var": Option(("biased", "unbiased"), "biased",
                       help="variance a layer without prior hands on: biased, or times "
                       "n/(n-1) as the authors' fused_batch_norm returns it"),
    "stem_grad": Option(("flows", "stopped"), "flows",
                        help="gradient through the statistics a layer without prior hands "
                        "on; stopped: constants (authors' fused_batch_norm)"),
    "shortcut_pad": Option(("group", "flat"), "group",
                           help="resnet stride-2 stream: zero channels padded in every "
                           "group, or around the flat (G*C) vector (authors)"),
    "one_value": Option(("refuse", "allow"), "refuse",
                        help="one value per statistic (micro-batch 1, no positions): "
                        "refuse, or run as the authors (guard rejects, output = bias)"),
    "eps": EPS,
    "momentum": MOMENTUM,
}
# BKN as the authors' code computes it (kalman_norm.py, cifar-kn-microbatch.py, checked
# against it by tests/models/test_authors.py); in a resnet, with --model resnetN:padding=tf
AUTHORS = {"transition": "sampled", "running": "authors", "running_groups": "first",
           "stem_var": "unbiased", "stem_grad": "stopped", "shortcut_pad": "flat",
           "one_value": "allow"}
# the options a per-sample GKN has no use for (no running statistics, no batch)
BATCH_ONLY = ("running", "running_groups", "stem_var", "stem_grad", "one_value")


@register("bkn", "Batch Kalman Normalization: micro-batch statistics fused with a "
          "prediction from the preceding layers", BKN_OPTIONS, chained=True,
          carries=lambda options: Carries("guard_scope=layer: one guard decision over all "
                                          "micro-batches of the forward", backwards=True)
          if options["guard_scope"] == "layer" else None)
def _bkn(num_features, norm_batch, **options):
    return BatchKalmanNorm(num_features, norm_batch, **options)


@register("bkn-authors", "BKN exactly as the authors' code: bkn with "
          + ",".join(f"{k}={v}" for k, v in AUTHORS.items()),
          {k: (replace(o, default=AUTHORS[k]) if k in AUTHORS else o)
           for k, o in BKN_OPTIONS.items()}, chained=True)
def _bkn_authors(num_features, norm_batch, **options):
    return BatchKalmanNorm(num_features, norm_batch, **options)
