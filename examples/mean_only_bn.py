"""An example plugin: one normalizer and one dataset, registered from outside bknbench.

    bknbench check mean-bn --plugin examples/mean_only_bn.py
    bknbench run --plugin examples/mean_only_bn.py --norms bn,gn,mean-bn --dataset waves \
        --batch-sizes 2,8,32 --epochs 3 --workers 2 --out results/mean-bn
    bknbench report results/mean-bn

The normalizer is mean-only batch normalization (Salimans & Kingma, "Weight
Normalization", NeurIPS 2016, section 3): each micro-batch is centred by its own mean, not
divided by its standard deviation; eval subtracts the running mean. The dataset is three
classes of noisy waves of different frequency, (N, 1, 64), made here with NumPy.
"""
import numpy as np
import torch
from torch import nn

from bknbench import Option, as_dataset, register_dataset, register_norm


class MeanOnlyBatchNorm(nn.Module):
    """Training, per micro-batch g of ``norm_batch`` samples and channel c:
        y = x - mean_g,c(x) + bias_c   (mean over the micro-batch's samples and positions)
    and the running mean follows each micro-batch's mean in turn (EMA, `momentum`).
    Eval: y = x - running_mean_c + bias_c. Shapes: x (N, C) or (N, C, *spatial)."""

    def __init__(self, num_features: int, norm_batch: int | None, momentum: float = 0.1):
        super().__init__()
        self.norm_batch, self.momentum = norm_batch, momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        if not self.training:
            return x - self.running_mean.reshape(per_channel) + self.bias.reshape(per_channel)
        b = self.norm_batch or len(x)
        if len(x) % b:
            raise ValueError(f"mean-bn: batch {len(x)} is not a multiple of micro-batch {b}")
        groups = x.reshape(len(x) // b, b, *x.shape[1:])  # (G, b, C, *spatial)
        dims = (1,) + tuple(range(3, groups.dim()))
        mean = groups.mean(dims, keepdim=True)  # (G, 1, C, 1, ...)
        with torch.no_grad():  # the micro-batches one after the other, as training sees them
            for m in mean.reshape(len(groups), -1):
                self.running_mean.lerp_(m.to(self.running_mean.dtype), self.momentum)
        return (groups - mean).reshape(x.shape) + self.bias.reshape(per_channel)

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}, norm_batch={self.norm_batch}, momentum={self.momentum}"


@register_norm("mean-bn", "mean-only BN (Salimans 2016): centred by each micro-batch's mean",
               {"momentum": Option(float, 0.1, lambda v: 0 < v <= 1, "in (0, 1]",
                                   "running-mean EMA weight")})
def mean_bn(num_features, norm_batch, momentum):
    return MeanOnlyBatchNorm(num_features, norm_batch, momentum)


@register_dataset("waves")
def waves(data_dir=None):
    """Three classes (frequencies 2, 3, 5 per window) of noisy sine waves with random
    phase and amplitude, 1500 training and 600 test samples of shape (1, 64)."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 3, n)
        t = np.linspace(0, 1, 64, endpoint=False)
        freq = np.array([2.0, 3.0, 5.0])[y][:, None]
        phase, amp = rng.uniform(0, 2 * np.pi, (n, 1)), rng.uniform(0.5, 2.0, (n, 1))
        x = amp * np.sin(2 * np.pi * freq * t + phase) + rng.normal(0, 0.8, (n, 64))
        return x[:, None, :].astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = split(1500), split(600)
    return as_dataset("waves", x_train, y_train, x_test, y_test, num_classes=3)
