"""The normalizer registry: one place to add a normalizer, one constructor shape.

Every factory is called as ``factory(num_features, norm_batch, **options)`` and returns a
drop-in ``nn.Module`` (``forward(x) -> Tensor``, x of shape (N, C) or (N, C, *spatial)).
``norm_batch`` is the number of samples behind each statistic: a forward batch of N samples
is split into N / norm_batch groups with their own statistics (None: the whole batch).

Specs are strings: ``name`` or ``name:key=value,key=value`` (``:`` also separates options).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from .config import ConfigError
from .fused import group_moments, group_normalize  # noqa: F401 (group_moments: public here)


# ---------------------------------------------------------------- math (pure functions)
# The training-mode math, fused into autograd nodes for speed, is in fused.py.

def values_per_stat(x: torch.Tensor, groups: int) -> int:
    """How many values stand behind each (group, channel) statistic."""
    return (x.shape[0] // groups) * math.prod(x.shape[2:])


def normalize(x, mean, var, weight, bias, eps):
    """y = weight * (x - mean) / sqrt(var + eps) + bias with per-group statistics: the
    reference definition (training uses `fused.group_normalize`, which equals it).

    x: (N, C, *S); mean, var: (G, C); weight, bias: (C,) or None -> (N, C, *S).
    """
    g, c = mean.shape
    xs = x.reshape(g, x.shape[0] // g, c, -1)  # (G, B, C, P)
    y = (xs - mean[:, None, :, None]) * torch.rsqrt(var + eps)[:, None, :, None]
    if weight is not None:
        y = y * weight[:, None]
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(x.shape)


@lru_cache(maxsize=64)
def _ema_weights(g: int, momentum: float, dtype: torch.dtype, device: torch.device):
    # weight of group k's statistics after G sequential updates: momentum * decay^(G-1-k)
    decay = 1.0 - momentum
    return momentum * decay ** torch.arange(g - 1, -1, -1, dtype=dtype, device=device)


def ema_over_groups(running, stats, momentum, scale: float = 1.0):
    """Running average after G sequential EMA updates, one per group, in closed form.

    Equals G updates ``r = (1 - momentum) * r + momentum * scale * stats[g]`` in order, so
    one grouped forward keeps the same running statistics as G separate micro-batch
    forwards. running: (C,); stats: (G, C) -> (C,). One fused op (addmv).
    """
    g = stats.shape[0]
    weights = _ema_weights.__wrapped__ if torch.compiler.is_compiling() else _ema_weights
    w = weights(g, float(momentum), stats.dtype, stats.device)  # (the compiler cannot cache)
    return torch.addmv(running, stats.t(), w, beta=(1.0 - momentum) ** g, alpha=scale)


def check_defined(n_values: int, layer: str) -> None:
    if n_values < 2:
        raise ValueError(
            f"{layer} is undefined with 1 value per channel per statistic "
            "(micro-batch 1 without spatial positions)"
        )


# ---------------------------------------------------------------- layers
class StatsNorm(nn.Module):
    """Shared state of batch-statistics normalizers: affine parameters, running buffers,
    and the split of a forward batch into statistics groups."""

    def __init__(self, num_features: int, norm_batch: int | None, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.norm_batch = norm_batch
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def groups_of(self, x: torch.Tensor) -> int:
        n = x.shape[0]
        if self.norm_batch is None or self.norm_batch >= n:
            return 1
        if n % self.norm_batch:
            raise ValueError(f"batch of {n} is not a multiple of norm_batch {self.norm_batch}")
        return n // self.norm_batch

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    @torch.no_grad()
    def update_running(self, mean, var, n_values: int) -> None:
        """EMA of per-group statistics; variance made unbiased as torch.nn.BatchNorm does."""
        unbiased = n_values / (n_values - 1)
        self.running_mean.copy_(ema_over_groups(self.running_mean, mean, self.momentum))
        self.running_var.copy_(ema_over_groups(self.running_var, var, self.momentum, unbiased))
        self.num_batches_tracked.add_(1)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, norm_batch={self.norm_batch}, eps={self.eps}, "
                f"momentum={self.momentum}")


class GroupedBatchNorm(StatsNorm):
    """BatchNorm with statistics per group of ``norm_batch`` samples.

    Training: y = weight * (x - m_g) / sqrt(s_g + eps) + bias, (m_g, s_g) the mean and biased
    variance of group g over its samples and spatial positions. Eval: running statistics,
    exactly as torch.nn.BatchNorm. With one group this is torch.nn.BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.eval_forward(x)
        g = self.groups_of(x)
        n_values = values_per_stat(x, g)
        check_defined(n_values, "BatchNorm")
        if g == 1:  # the fused kernel; it updates the running buffers itself
            self.num_batches_tracked += 1
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, True, self.momentum, self.eps)
        y, mean, var, _, _ = group_normalize(x, None, None, None, self.weight, self.bias, g,
                                             eps=self.eps)
        self.update_running(mean.detach(), var.detach(), n_values)
        return y


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm; ``norm_batch`` is irrelevant (statistics are per sample)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def gn_groups(num_features: int, groups: int) -> int:
    """The rule for few channels: the largest divisor of C that is <= the requested groups
    (GroupNorm needs C divisible by the group count), so C=12, groups=8 gives 6."""
    g = max(1, min(groups, num_features))
    while num_features % g:
        g -= 1
    return g


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Option:
    kind: type | tuple  # float, int, or a tuple of allowed strings
    default: Any
    check: Callable[[Any], bool] = lambda v: True
    rule: str = ""  # shown when check fails, e.g. "in [0, 1]"
    help: str = ""

    def parse(self, key: str, text: str):
        if isinstance(self.kind, tuple):
            if text not in self.kind:
                raise ConfigError(f"option {key}={text}: expected one of {', '.join(self.kind)}")
            return text
        try:
            value = self.kind(text)
        except ValueError:
            raise ConfigError(f"option {key}={text}: expected {self.kind.__name__}") from None
        if not self.check(value):
            raise ConfigError(f"option {key}={text}: must be {self.rule}")
        return value


@dataclass(frozen=True)
class NormEntry:
    name: str
    factory: Callable[..., nn.Module]
    help: str
    options: dict[str, Option] = field(default_factory=dict)
    accumulates: bool = False  # trains with gradient accumulation (SGD batch > norm_batch)
    chained: bool = False  # BKN-style: the model builder wires a prediction into it


REGISTRY: dict[str, NormEntry] = {}

_EPS = Option(float, 1e-5, lambda v: v > 0, "> 0", "added to the variance")
_MOMENTUM = Option(float, 0.1, lambda v: 0 < v <= 1, "in (0, 1]", "running-statistics EMA weight")


def register(name: str, help: str, options: dict[str, Option] | None = None, **flags):
    def deco(factory):
        REGISTRY[name] = NormEntry(name, factory, help, options or {}, **flags)
        return factory
    return deco


@dataclass(frozen=True)
class NormSpec:
    text: str  # canonical spec string: the row label in every result
    entry: NormEntry
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.entry.name

    def build(self, num_features: int, norm_batch: int | None) -> nn.Module:
        return self.entry.factory(num_features, norm_batch, **self.options)


def _text(value) -> str:
    """Shortest faithful text of an option value: 0.50 -> 0.5, 0.0 -> 0."""
    text = repr(value) if isinstance(value, float) else str(value)
    return text[:-2] if text.endswith(".0") else text


def parse_spec(text: str) -> NormSpec:
    """``"bkn:p=0.5,transition=sampled"`` -> NormSpec; unknown names or options raise
    ConfigError naming what is allowed."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in REGISTRY:
        raise ConfigError(f"unknown normalizer {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    options = {k: o.default for k, o in entry.options.items()}
    given = []
    for item in rest.replace(":", ",").split(","):
        if not item.strip():
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise ConfigError(f"bad option {item!r} in {text!r}: expected key=value")
        if key not in entry.options:
            known = ", ".join(sorted(entry.options)) or "none"
            raise ConfigError(f"unknown option {key!r} for {name}; options: {known}")
        if key in given:
            raise ConfigError(f"option {key!r} given twice in {text!r}")
        options[key] = entry.options[key].parse(key, value)
        given.append(key)
    # one label per configuration: options in registry order, values as parsed (0.50 -> 0.5)
    canonical = name + (":" + ",".join(f"{k}={_text(options[k])}" for k in entry.options
                                       if k in given) if given else "")
    return NormSpec(canonical, entry, options)


def split_specs(text: str) -> list[str]:
    """Split ``--norms`` on commas; a piece with ``=`` but no name continues the previous
    spec, so ``bn,bkn:p=0.5,transition=sampled,gn`` is three specs."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece and specs:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    if not specs:
        raise ConfigError("no normalizer given")
    return [parse_spec(s).text for s in specs]


@register("bn", "BatchNorm, statistics over each micro-batch",
          {"eps": _EPS, "momentum": _MOMENTUM})
def _bn(num_features, norm_batch, eps, momentum):
    return GroupedBatchNorm(num_features, norm_batch, eps=eps, momentum=momentum)


@register("bn-accum", "BatchNorm on micro-batches with gradient accumulation to "
          "--accumulate-to samples per step (one grouped forward)",
          {"eps": _EPS, "momentum": _MOMENTUM}, accumulates=True)
def _bn_accum(num_features, norm_batch, eps, momentum):
    return GroupedBatchNorm(num_features, norm_batch, eps=eps, momentum=momentum)


@register("gn", "GroupNorm; groups = largest divisor of C not above `groups`",
          {"groups": Option(int, 8, lambda v: v >= 1, ">= 1", "number of channel groups"),
           "eps": _EPS})
def _gn(num_features, norm_batch, groups, eps):
    return GroupNorm(gn_groups(num_features, groups), num_features, eps=eps)


@register("ln", "LayerNorm over channels and positions (GroupNorm with one group)",
          {"eps": _EPS})
def _ln(num_features, norm_batch, eps):
    return GroupNorm(1, num_features, eps=eps)


@register("none", "no normalization (identity)")
def _none(num_features, norm_batch):
    return nn.Identity()


def names() -> list[str]:
    return sorted(REGISTRY)


# BKN and its variants register themselves; imported last because they build on the above.
from . import kalman  # noqa: E402,F401
