"""The model registry: one builder shape, ``builder(spec, norm_batch, in_shape, num_classes)
-> nn.Module`` with in_shape = (C, *spatial) of one sample."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError, did_you_mean
from ..norms import NormSpec
from .chain import check_chain

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def make_model(name: str, spec: NormSpec, norm_batch: int, in_shape: tuple[int, ...],
               num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}{did_you_mean(name, MODELS)}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[name](spec, norm_batch, tuple(in_shape), num_classes)
    check_chain(model)
    return model
