"""What the statistics diagnostics ask of a normalization layer.

A layer whose training output depends on the other samples of its micro-batch says so with
the class attribute ``batch_dependent = True`` and honours ``self.probe`` (None except during
a diagnostic forward, which runs in training mode under a forked RNG):

- ``Probe("population")``: normalize with the mean and biased variance of the input over the
  *whole* batch and all positions, as the eval forward would after ``set_population`` with
  them (for BN-like layers a full-batch BatchNorm; MABN: x / sqrt(var + mean^2 + eps)), and
  record ``stats["input"] = (mean (1, C), var (1, C))``. Run over a probe set in one forward, every
  layer then sees its predecessors normalized by *their* population statistics, as PreciseBN
  computes them.
- ``Probe("train")``: compute the output exactly as a training forward would, for groups of
  ``norm_batch`` samples, but with no side effect (no running statistics, windows, counters
  or step counts change), and record what it used per group:
  ``stats["used"] = (mean (G, C), var (G, C))``, the statistics that normalize the output,
  plus any other named pair of the method (BKN: "observed" and "predicted").

and it provides, with defaults in ``StatsNorm`` (running_mean, running_var):

- ``eval_statistics() -> (mean (C,), var (C,))``: what its eval forward normalizes with;
- ``set_population(mean, var)``: its eval buffers set so that eval uses those statistics;
- ``reference(mean, var) -> (mean, var)``: the statistics it would use if it knew the
  population (mean, var) of its input: the identity for BN-like layers; a layer without mean
  subtraction (MABN) returns (0, var + mean^2). Errors are measured against this.

Optionally, a layer that has per-forward facts worth counting during training (BKN: the
guard's decisions) provides counters, kept on the device so that training never waits:

- ``counting`` (bool, False by default): set by the diagnostics; only then does a training
  forward (never a probed one) add to the counters, so an undiagnosed run pays nothing;
- ``training_counters() -> {name: 0-d tensor}``: the values over the training forwards since
  the last ``reset_counters()``, NaN for one that counted nothing (then it is not reported);
- ``reset_counters()``. The diagnostics read them once per epoch and reset them; the counter
  buffers are not persistent (not in a checkpoint or state_dict).

Batch-independent layers (gn, ln, none, ...) need nothing: their training forward already is
their evaluation, and the diagnostics report them as not applicable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Probe:
    mode: str  # "population" or "train"
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("population", "train"):
            raise ValueError(f"probe mode {self.mode!r}: expected population or train")
