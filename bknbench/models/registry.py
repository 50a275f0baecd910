"""The model registry: one builder shape, ``builder(spec, norm_batch, in_shape, num_classes,
**options) -> nn.Module`` with in_shape = (C, *spatial) of one sample.

A model is named as ``name`` or ``name:key=value,...`` (``--model resnet20:padding=tf``), its
options declared on the registry entry (``register_model(name, options)``), parsed and
checked as a normalizer's are (norms.registry.Option).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError, did_you_mean
from ..norms import NormSpec, Option
from .chain import check_chain

MODELS: dict[str, Callable[..., nn.Module]] = {}
MODEL_OPTIONS: dict[str, dict[str, Option]] = {}


def register_model(name: str, options: dict[str, Option] | None = None):
    """Register a builder ``(spec, norm_batch, in_shape, num_classes, **options) ->
    nn.Module`` as `name`, with its model options; a name that exists is a ConfigError."""
    if name in MODELS:
        raise ConfigError(f"model {name!r} is already registered")

    def deco(fn):
        MODELS[name] = fn
        MODEL_OPTIONS[name] = options or {}
        return fn
    return deco


def parse_model(text: str) -> tuple[str, dict]:
    """``"resnet20:padding=tf"`` -> ("resnet20", every option of resnet20 with its value);
    unknown names, options or values raise ConfigError naming what is allowed."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}{did_you_mean(name, MODELS)}; known: "
                          f"{', '.join(sorted(MODELS))}")
    declared = MODEL_OPTIONS[name]
    options = {k: o.default for k, o in declared.items()}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise ConfigError(f"bad model option {item!r} in {text!r}: expected key=value")
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(f"unknown option {key!r} for model {name}; options: {known}")
        options[key] = declared[key].parse(key, value)
    return name, options


def make_model(name: str, spec: NormSpec, norm_batch: int, in_shape: tuple[int, ...],
               num_classes: int) -> nn.Module:
    base, options = parse_model(name)
    model = MODELS[base](spec, norm_batch, tuple(in_shape), num_classes, **options)
    check_chain(model)
    return model
