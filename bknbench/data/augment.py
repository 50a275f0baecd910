"""Batch augmentation on the training device: the standard CIFAR random crop and flip.

Vectorized over the batch (two gathers, no per-image loop) so it costs a few kernel launches
per step wherever the data lives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None,
              flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per sample.

    x: (N, C, H, W). Each sample is zero-padded by ``pad`` pixels on every side and an
    H x W window at a uniform offset (dy, dx) in [0, 2 pad]^2 is cut out; with probability
    1/2 (when ``flip``) the window is mirrored left-right:
        out[n, c, i, j] = padded[n, c, dy_n + i, dx_n + (W - 1 - j if flip_n else j)].
    The random draws come from ``generator`` (on its device) or the global generator of
    x's device. Returns a new (N, C, H, W) tensor on x's device, same dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"crop_flip expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    dev = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=dev)
    flips = torch.randint(0, 2, (n,), generator=generator, device=dev).bool() & flip
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x  # (N, C, H + 2p, W + 2p)
    i = torch.arange(h, device=x.device)
    j = torch.arange(w, device=x.device)
    rows = offsets[0, :, None] + i  # (N, H)
    # mirroring is a reversed column order: fold it into the gather index
    cols = offsets[1, :, None] + torch.where(flips[:, None], w - 1 - j, j)  # (N, W)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
