"""The normalizer registry: one place to add a normalizer, one constructor shape.

Every factory is called as ``factory(num_features, norm_batch, **options)`` and returns a
drop-in ``nn.Module`` (``forward(x) -> Tensor``, x of shape (N, C) or (N, C, *spatial)).
``norm_batch`` is the number of samples behind each statistic: a forward batch of N samples
is split into N / norm_batch groups with their own statistics (None: the whole batch).

Specs are strings: ``name`` or ``name:key=value,key=value`` (``:`` also separates options).
The registry is filled by the family modules that `bknbench.norms` imports.

What a normalizer asks of the layers around it (no ReLU after it, a parametrization of the
weight feeding it, a reference to the layer feeding it) is declared on its entry as
`Neighbours`; the model builders honour it (models/chain.py `norm_after`, `connect`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError, did_you_mean


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
class Neighbours:
    """What a normalizer asks of its neighbours in a network; the model builder applies it.

    activation: the builder puts a ReLU after the layer; False: the layer applies its own
        nonlinearity (FRN's TLU, EvoNorm's), nothing is added after it.
    weight: a factory of a parametrization (torch.nn.utils.parametrize) for the weight of
        the convolution or linear layer whose output the layer normalizes (weight
        standardization, centring); readers of ``op.weight`` then see the parametrized one.
    feed: the builder calls ``layer.attach(module)`` with that convolution or linear layer.
    """

    activation: bool = True
    weight: Callable[[], nn.Module] | None = None
    feed: bool = False


@dataclass(frozen=True)
class Carries:
    """State a normalizer carries from one micro-batch of a training forward to others on
    purpose, declared on its entry (`bknbench check` tests micro-batch isolation against it).

    what: the state, in words ("running statistics used in the forward").
    backwards: False, a micro-batch's output may depend on the micro-batches before it only
        (a sequential state); True, on any micro-batch of the forward (one decision for the
        whole layer).
    """

    what: str
    backwards: bool = False


@dataclass(frozen=True)
class NormEntry:
    name: str
    factory: Callable[..., nn.Module]
    help: str
    options: dict[str, Option] = field(default_factory=dict)
    accumulates: bool = False  # trains with gradient accumulation (SGD batch > norm_batch)
    chained: bool = False  # BKN-style: the model builder wires a prediction into it
    # what it asks of its neighbours: a Neighbours, or options -> Neighbours
    neighbours: Neighbours | Callable[[dict], Neighbours] = Neighbours()
    # what it carries between the micro-batches of a training forward: Carries, options ->
    # Carries | None, or None (each micro-batch's output depends on its own samples only)
    carries: Carries | Callable[[dict], Carries | None] | None = None
    compiles: bool = True  # False: torch.compile cannot run it (`bknbench check` says so)


REGISTRY: dict[str, NormEntry] = {}

EPS = Option(float, 1e-5, lambda v: v > 0, "> 0", "added to the variance")
MOMENTUM = Option(float, 0.1, lambda v: 0 < v <= 1, "in (0, 1]", "running-statistics EMA weight")
# the run length of normalizers with schedules (norms/common.py); train.py fills it in
TOTAL = Option(int, 0, lambda v: v >= 0, ">= 0",
               "micro-batches in the run (0: filled in by the run)")


def register(name: str, help: str, options: dict[str, Option] | None = None, **flags):
    """Register ``factory(num_features, norm_batch, **options) -> nn.Module`` as `name`;
    `flags`: the other fields of NormEntry (accumulates, neighbours, carries, compiles).
    A name that exists is a ConfigError: a plugin never replaces a normalizer silently."""
    if name in REGISTRY:
        raise ConfigError(f"normalizer {name!r} is already registered")

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

    @property
    def neighbours(self) -> Neighbours:
        n = self.entry.neighbours
        return n(self.options) if callable(n) else n

    @property
    def carries(self) -> Carries | None:
        c = self.entry.carries
        return c(self.options) if callable(c) else c

    def build(self, num_features: int, norm_batch: int | None) -> nn.Module:
        return self.entry.factory(num_features, norm_batch, **self.options)

    def for_run(self, micro_batches: int) -> "NormSpec":
        """This spec with its ``total`` option (the run length in micro-batches) filled in
        when it has one left at 0; the label (``text``) is unchanged: the run length
        follows from the run's configuration."""
        if "total" not in self.entry.options or self.options["total"]:
            return self
        return NormSpec(self.text, self.entry, {**self.options, "total": micro_batches})


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
        raise ConfigError(f"unknown normalizer {name!r}{did_you_mean(name, REGISTRY)}; known: {', '.join(sorted(REGISTRY))}")
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
            raise ConfigError(f"unknown option {key!r} for {name}"
                              f"{did_you_mean(key, entry.options)}; options: {known}")
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


def names() -> list[str]:
    return sorted(REGISTRY)
