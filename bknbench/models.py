"""Small networks built from a norm spec, and the wiring of BKN's prediction chain.

Every builder has one shape: ``builder(spec, norm_batch, in_shape, num_classes) -> Module``
with in_shape = (C, *spatial) of one sample. Register new ones in MODELS.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .config import ConfigError
from .kalman import BatchKalmanNorm, Path, _ops_of
from .transitions import analytic_rule
from .norms import NormSpec

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def make_model(name: str, spec: NormSpec, norm_batch: int, in_shape: tuple[int, ...],
               num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[name](spec, norm_batch, tuple(in_shape), num_classes)
    check_chain(model)
    return model


# ---------------------------------------------------------------- BKN chain wiring
def wire_sequence(layers) -> None:
    """Give each chained norm in a forward-ordered module sequence a Path from the
    previous chained norm through the modules between them (the transition ops)."""
    source, ops = None, []
    for layer in layers:
        if isinstance(layer, BatchKalmanNorm):
            layer.prior = Path(source, tuple(ops)) if source is not None else None
            source, ops = layer, []
        elif source is not None:
            ops.append(layer)


def check_chain(model: nn.Module) -> None:
    """Fail at build time when an analytic transition meets an op it has no rule for, and
    clear every posterior at the start of each forward so a stale one can never be read."""
    layers = [m for m in model.modules() if isinstance(m, BatchKalmanNorm)]
    if not layers:
        return
    for layer in layers:
        if layer.transition == "analytic" or getattr(layer, "analytic_in_eval", False):
            bad = [op for op in _ops_of(layer.prior) if analytic_rule(op) is None]
            if bad:
                raise ConfigError(f"analytic transition has no rule for {bad[0]}; "
                                  "use transition=sampled")

    def clear(module, args):
        for layer in layers:
            layer.posterior = None

    model.register_forward_pre_hook(clear)


# ---------------------------------------------------------------- builders
def _norm(spec: NormSpec, channels: int, norm_batch: int) -> nn.Module:
    return spec.build(channels, norm_batch)


@register_model("mlp")
def mlp(spec, norm_batch, in_shape, num_classes, width=128, depth=3):
    """Flatten -> [Linear -> Norm -> ReLU] x depth -> Linear."""
    bias = spec.name == "none"  # a norm's shift makes the linear bias redundant
    layers: list[nn.Module] = [nn.Flatten()]
    d = 1
    for s in in_shape:
        d *= s
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=bias), _norm(spec, width, norm_batch), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    wire_sequence(layers)
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(spec, norm_batch, in_shape, num_classes, width=32):
    """Four conv layers (1-D or 2-D by the input), two of them stride 2, each followed by
    Norm -> ReLU; global average pooling; a linear classifier.

    (N, C_in, *S) -> conv k5 (width) -> conv k3/s2 (width) -> conv k3/s2 (2 width)
    -> conv k3 (2 width) -> mean over positions -> (N, num_classes)."""
    dims = len(in_shape) - 1
    if dims not in (1, 2):
        raise ConfigError(f"cnn needs 1-D or 2-D inputs, got sample shape {in_shape}")
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    pool = nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d
    bias = spec.name == "none"
    plan = [(in_shape[0], width, 5, 1), (width, width, 3, 2), (width, 2 * width, 3, 2),
            (2 * width, 2 * width, 3, 1)]
    layers: list[nn.Module] = []
    for c_in, c_out, k, stride in plan:
        layers += [conv(c_in, c_out, k, stride=stride, padding=k // 2, bias=bias),
                   _norm(spec, c_out, norm_batch), nn.ReLU()]
    layers += [pool(1), nn.Flatten(), nn.Linear(2 * width, num_classes)]
    wire_sequence(layers)
    return nn.Sequential(*layers)


# The CIFAR ResNets register themselves; imported last because they use register_model.
from . import resnet  # noqa: E402,F401
