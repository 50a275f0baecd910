"""Small networks built from a norm spec: an MLP, and a CNN for 1-D or 2-D inputs."""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .chain import norm_after, wire_sequence
from .registry import register_model


# ---------------------------------------------------------------- builders
@register_model("mlp")
def mlp(spec, norm_batch, in_shape, num_classes, width=128, depth=3):
    """Flatten -> [Linear -> Norm -> ReLU] x depth -> Linear (no ReLU after a norm that
    includes its nonlinearity; what a norm asks of its Linear: models/chain.py)."""
    bias = spec.name == "none"  # a norm's shift makes the linear bias redundant
    layers: list[nn.Module] = [nn.Flatten()]
    d = 1
    for s in in_shape:
        d *= s
    for _ in range(depth):
        linear = nn.Linear(d, width, bias=bias)
        layers += [linear] + norm_after(spec, linear, width, norm_batch)
        d = width
    layers.append(nn.Linear(d, num_classes))
    wire_sequence(layers)
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(spec, norm_batch, in_shape, num_classes, width=32):
    """Four conv layers (1-D or 2-D by the input), two of them stride 2, each followed by
    Norm -> ReLU (as the norm asks: models/chain.py); global average pooling; a linear
    classifier.

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
        op = conv(c_in, c_out, k, stride=stride, padding=k // 2, bias=bias)
        layers += [op] + norm_after(spec, op, c_out, norm_batch)
    layers += [pool(1), nn.Flatten(), nn.Linear(2 * width, num_classes)]
    wire_sequence(layers)
    return nn.Sequential(*layers)
