"""The pre-activation CIFAR ResNet of the BKN authors (resnet20/32/56/110), any normalizer.

Architecture (He et al. 2016, "Identity Mappings", as in the authors' cifar-kn-microbatch.py,
itself tensorpack's cifar10-resnet example), depth = 6 n + 2:
    conv3x3(16) -> Norm -> ReLU                                  stem, (N, 16, 32, 32)
    3 stages of n blocks, 16/32/64 channels, the 2nd and 3rd start with stride 2:
        block(x) = conv2(ReLU(Norm2(conv1(ReLU(Norm1(x)))))) + shortcut(x)
        (the network's first block skips ReLU(Norm1): its input already went through the stem's)
    Norm -> ReLU -> global average pooling -> linear              (N, num_classes)
Shortcut: identity, or where a stage starts, 2x2 average pooling (stride 2) and zero channels
padded equally on both sides (C -> 2C): no parameters.
Every norm is followed by a ReLU (none after a norm with its own nonlinearity: FRN,
EvoNorm) and fed by one convolution, which is connected as the norm asks
(`connect_neighbours`: weight standardization or centring, CBN's feeding layer).

BKN chain (the statistics of a sum are the sum of the branches' means and variances):
    stem norm: no prior
    block's Norm2 <- Path(Norm feeding conv1, (ReLU, conv1))
    next Norm1 and the final Norm <- SumPrior(stream, Path(Norm2, (ReLU, conv2)))
where stream is the statistics of the block's input x pushed through the shortcut, chosen by
the norms' ``stream`` option:
- "authors" (default; cifar-kn-microbatch.py's `residual` returns m + m3, v + v3 with m, v
  the statistics passed into the block): the *prediction* of x's statistics that fed Norm1,
  Path(Norm1, (PaddedStream(shortcut),), tap="prediction"); for the first block the stem
  norm's raw posterior, no ReLU, Path(stem norm, (shortcut,), tap="input"). At a stride-2
  shortcut the variance is kept (the authors pad m and v and do not pool them).
- "posterior": x's posterior as Norm1 estimated it, Path(Norm1, (shortcut,), tap="input");
  for the first block, x = ReLU(stem output): Path(stem norm, (ReLU, shortcut)). At a
  stride-2 shortcut the 2x2 average of independent values: variance / 4, exact under the
  independence assumption (full windows, no padding: borders change nothing).
The sum rule adds variances; it is exact for the mixture over positions too, because the
stream's per-position mean is the same at every position (a shortcut has no zero padding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..norms import NormSpec, Option
from ..norms.kalman import BatchKalmanNorm, Path, SumPrior
from .chain import activation, connect
from .registry import register_model

PADDINGS = ("torch", "tf")
RESNET_OPTIONS = {
    "padding": Option(PADDINGS, "torch",
                      help="stride-2 convolutions: torch: 1 on both sides; tf: TensorFlow's "
                      "SAME, 0 before and 1 after (the authors')"),
}
DEPTHS = {20: 3, 32: 5, 56: 9, 110: 18}  # depth -> blocks per stage n (depth = 6 n + 2)
WIDTHS = (16, 32, 64)  # channels of the three stages


class Shortcut(nn.Module):
    """Parameter-free shortcut: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride).

    stride x stride average pooling, then C_out - C_in zero channels, lo = (C_out - C_in) // 2
    before and the rest after the real ones (the authors pad in_channel // 2 on both sides).
    Identity when stride 1 and C_out = C_in.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"shortcut cannot shrink channels ({c_in} -> {c_out})")
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.lo = (c_out - c_in) // 2
        self.hi = c_out - c_in - self.lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        if self.lo or self.hi:
            x = F.pad(x, (0, 0, 0, 0, self.lo, self.hi))  # pads dim 1 (channels)
        return x

    def moments(self, mean: torch.Tensor, var: torch.Tensor, shape: tuple[int, ...],
                pool_variance: bool = True, flat: bool = False):
        """Per-group channel moments through the shortcut (a transition rule). mean, var:
        (G, C_in) -> (G, C_out), and the spatial shape after it. Pooling keeps the mean and
        divides the variance by the window area (values independent across positions; the
        windows are full, floor mode without padding), unless ``pool_variance`` is False
        (the authors' stream); padded channels are constant 0: mean 0, var 0. The padding
        is along dim 1, i.e. inside every group, so group g's real channels stay group g's
        (padding a flattened (G * C) vector would not). ``flat``: the authors' padding of
        the flat (G * C) vector, (C_out - C_in) G / 2 zeros on each end, then cut into G
        groups of C_out: with G > 1 channels land in other groups."""
        if self.stride > 1:
            shape = tuple(n // self.stride for n in shape)
            if pool_variance:
                var = var / (self.stride * self.stride)
        if flat:
            g = mean.shape[0]
            lo = (self.c_out - self.c_in) * g // 2
            pad = (lo, (self.c_out - self.c_in) * g - lo)
            return (F.pad(mean.reshape(-1), pad).view(g, -1),
                    F.pad(var.reshape(-1), pad).view(g, -1), shape)
        return F.pad(mean, (self.lo, self.hi)), F.pad(var, (self.lo, self.hi)), shape

    def extra_repr(self) -> str:
        return f"{self.c_in}, {self.c_out}, stride={self.stride}"


class PaddedStream(nn.Module):
    """The authors' residual stream through a shortcut: channels padded (aligned in every
    group, or with ``flat`` as the authors pad the flat vector), the variance not divided
    by the pooling area. Parameter-free, with exact moments of its own, so it is never
    sampled."""

    def __init__(self, shortcut: Shortcut, flat: bool = False):
        super().__init__()
        self.shortcut, self.flat = shortcut, flat

    def moments(self, mean, var, shape):
        return self.shortcut.moments(mean, var, shape, pool_variance=False, flat=self.flat)


def tf_same_pads(shape, kernel_size, stride) -> tuple[tuple[int, int], ...]:
    """TensorFlow's padding "SAME" per spatial dim: total = max((ceil(n / s) - 1) s + k - n,
    0), total // 2 before, the rest after. 3x3 stride 2 on an even map: (0, 1)."""
    pads = []
    for n, k, s in zip(shape, kernel_size, stride):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


class SamePadConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "SAME" (`tf_same_pads`), the authors' Conv2D.
    The padding is a forward pre-hook, so whatever reads the convolution's input (CBN's
    hook, registered later) sees the padded map that the unpadded convolution reads; the
    transitions read the pads from `same_pads`."""

    def __init__(self, c_in: int, c_out: int, stride: int, bias: bool):
        super().__init__(c_in, c_out, 3, stride=stride, padding=0, bias=bias)
        self.register_forward_pre_hook(_pad_same)

    def same_pads(self, shape) -> tuple[tuple[int, int], ...]:
        return tf_same_pads(shape, self.kernel_size, self.stride)


def _pad_same(conv: SamePadConv2d, args):
    x = args[0]
    pads = conv.same_pads(x.shape[2:])
    return (F.pad(x, [v for lo_hi in reversed(pads) for v in lo_hi]),) + args[1:]


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False,
            padding: str = "torch") -> nn.Conv2d:
    """3x3 convolution, zero padding 1 on both sides ("torch"), or TensorFlow's SAME ("tf"),
    which differs only at stride 2 (0 before, 1 after on an even map)."""
    if padding == "tf" and stride > 1:
        return SamePadConv2d(c_in, c_out, stride, bias)
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class PreActBlock(nn.Module):
    """out = conv2(ReLU(norm2(conv1(ReLU(norm1(x)))))) + shortcut(x); (N, C_in, H, W) ->
    (N, C_out, H / stride, W / stride). ``first``: no norm1/relu1 (the stem's are used)."""

    def __init__(self, spec: NormSpec, norm_batch, c_in, c_out, stride, first=False,
                 bias=False, padding="torch"):
        super().__init__()
        self.first = first
        self.norm1 = None if first else spec.build(c_in, norm_batch)
        self.relu1 = None if first else activation(spec)
        self.conv1 = conv3x3(c_in, c_out, stride, bias, padding)
        self.norm2 = spec.build(c_out, norm_batch)
        self.relu2 = activation(spec)
        self.conv2 = conv3x3(c_out, c_out, 1, bias)
        self.shortcut = Shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else self.relu1(self.norm1(x))
        h = self.conv2(self.relu2(self.norm2(self.conv1(h))))
        return h + self.shortcut(x)


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 images (any H, W divisible by 4): (N, C, H, W) ->
    logits (N, num_classes). See the module docstring for the layout and the BKN chain."""

    def __init__(self, spec: NormSpec, norm_batch, n: int, in_channels: int,
                 num_classes: int, widths=WIDTHS, padding: str = "torch"):
        super().__init__()
        bias = spec.name == "none"  # a norm's shift makes the conv bias redundant
        self.stem_conv = conv3x3(in_channels, widths[0], 1, bias)
        self.stem_norm = spec.build(widths[0], norm_batch)
        self.stem_relu = activation(spec)
        blocks, c_in = [], widths[0]
        for stage, c_out in enumerate(widths):
            for k in range(n):
                stride = 2 if stage > 0 and k == 0 else 1
                blocks.append(PreActBlock(spec, norm_batch, c_in, c_out, stride,
                                          first=(stage == 0 and k == 0), bias=bias,
                                          padding=padding))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = spec.build(c_in, norm_batch)
        self.final_relu = activation(spec)
        self.fc = nn.Linear(c_in, num_classes)
        self.reset_parameters()
        self.connect_neighbours(spec)  # after the init: a parametrization wraps the weights
        if all(isinstance(m, BatchKalmanNorm) for m in self.norms()):
            self.wire_kalman()

    def reset_parameters(self) -> None:
        # the authors' conv init: variance scaling 2.0, fan_out (He init for ReLU)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def connect_neighbours(self, spec: NormSpec) -> None:
        """What each norm asks of the convolution whose output it normalizes
        (models/chain.py): the stem conv feeds the stem norm, a block's conv1 its norm2, its
        conv2 (through the residual sum) the next block's norm1 or the final norm."""
        connect(spec, self.stem_conv, self.stem_norm)
        prev = None
        for b in self.blocks:
            if not b.first:
                connect(spec, prev, b.norm1)
            connect(spec, b.conv1, b.norm2)
            prev = b.conv2
        connect(spec, prev, self.final_norm)

    def norms(self) -> list[nn.Module]:
        """Every normalization layer, in forward order."""
        out = [self.stem_norm]
        for b in self.blocks:
            out += ([] if b.first else [b.norm1]) + [b.norm2]
        return out + [self.final_norm]

    def _stream(self, block: PreActBlock) -> Path:
        """Statistics of block(x)'s shortcut branch: x's, pushed through the shortcut
        (the ``stream`` option: see the module docstring)."""
        if self.stem_norm.stream == "authors":
            if block.first:
                return Path(self.stem_norm, (block.shortcut,), tap="input")
            flat = self.stem_norm.shortcut_pad == "flat"
            return Path(block.norm1, (PaddedStream(block.shortcut, flat),), tap="prediction")
        if block.first:  # x is the stem's ReLU output
            return Path(self.stem_norm, (self.stem_relu, block.shortcut), tap="output")
        return Path(block.norm1, (block.shortcut,), tap="input")

    def _block_sum(self, block: PreActBlock) -> SumPrior:
        """Statistics of block(x) = residual branch + shortcut, branches independent."""
        return SumPrior((self._stream(block),
                         Path(block.norm2, (block.relu2, block.conv2), tap="output")))

    def wire_kalman(self) -> None:
        """Set every BKN layer's prior (see the module docstring)."""
        self.stem_norm.prior = None
        prev = None
        for b in self.blocks:
            if b.first:
                feed = Path(self.stem_norm, (self.stem_relu, b.conv1), tap="output")
            else:
                b.norm1.prior = self._block_sum(prev) if prev is not None else None
                feed = Path(b.norm1, (b.relu1, b.conv1), tap="output")
            b.norm2.prior = feed
            prev = b
        self.final_norm.prior = self._block_sum(prev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_relu(self.stem_norm(self.stem_conv(x)))  # (N, 16, H, W)
        h = self.blocks(h)  # (N, 64, H / 4, W / 4)
        h = self.final_relu(self.final_norm(h))
        return self.fc(h.mean(dim=(2, 3)))  # global average pooling -> (N, num_classes)


def build_resnet(depth: int, spec: NormSpec, norm_batch, in_shape, num_classes,
                 padding: str = "torch"):
    if depth not in DEPTHS:
        raise ConfigError(f"no resnet{depth}; depths: {', '.join(map(str, DEPTHS))}")
    if len(in_shape) != 3 or in_shape[1] % 4 or in_shape[2] % 4:
        raise ConfigError(f"resnet{depth} needs images (C, H, W) with H, W divisible by 4, "
                          f"got sample shape {tuple(in_shape)}")
    return PreActResNet(spec, norm_batch, DEPTHS[depth], in_shape[0], num_classes,
                        padding=padding)


def _register(depth: int) -> None:
    def builder(spec, norm_batch, in_shape, num_classes, padding):
        return build_resnet(depth, spec, norm_batch, in_shape, num_classes, padding)
    builder.__doc__ = (f"Pre-activation ResNet-{depth} (n = {DEPTHS[depth]} blocks per "
                       "stage, 16/32/64 channels), the authors' CIFAR network.")
    register_model(f"resnet{depth}", RESNET_OPTIONS)(builder)


for _depth in DEPTHS:
    _register(_depth)
