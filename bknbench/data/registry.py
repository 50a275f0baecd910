"""The dataset registry and what every loader shares: the Dataset tensors, standardization,
the cache folder.

Every loader has one shape: ``loader(data_dir) -> Dataset`` (CPU tensors, float32 inputs
standardized with training-split statistics, int64 labels), registered with
``@register_dataset(name)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor  # (N_train, C, *spatial) float32
    y_train: torch.Tensor  # (N_train,) int64
    x_test: torch.Tensor  # (N_test, C, *spatial) float32
    y_test: torch.Tensor  # (N_test,) int64
    num_classes: int
    image: bool = False  # 2-D images: crop/flip augmentation applies

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device),
                       self.x_test.to(device), self.y_test.to(device), self.num_classes,
                       self.image)


DATASETS: dict[str, Callable[[str | None], Dataset]] = {}


def register_dataset(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn
    return deco


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_dir)


def standardize(x_train: np.ndarray, x_test: np.ndarray):
    """Per-channel standardization with training statistics. x: (N, C, *S)."""
    axes = (0,) + tuple(range(2, x_train.ndim))
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True) + 1e-8
    return (x_train - mean) / std, (x_test - mean) / std


def as_dataset(name, x_train, y_train, x_test, y_test, num_classes, image=False) -> Dataset:
    x_train, x_test = standardize(x_train.astype(np.float32), x_test.astype(np.float32))
    return Dataset(name, torch.from_numpy(np.ascontiguousarray(x_train, np.float32)),
                   torch.from_numpy(np.asarray(y_train, np.int64)),
                   torch.from_numpy(np.ascontiguousarray(x_test, np.float32)),
                   torch.from_numpy(np.asarray(y_test, np.int64)), num_classes, image)


def cache_dir() -> Path:
    root = os.environ.get("BKNBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bknbench")
    return Path(root)
