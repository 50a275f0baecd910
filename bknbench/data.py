"""Datasets as tensors on the training device; nothing is downloaded.

Every loader has one shape: ``loader(data_dir) -> Dataset`` (CPU tensors, float32 inputs
standardized with training-split statistics, int64 labels). Register new ones in DATASETS.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import ConfigError


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
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
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


# ---------------------------------------------------------------- embedded datasets
@register_dataset("mnist1d")
def mnist1d(data_dir=None) -> Dataset:
    """MNIST-1D (Greydanus 2020): 4000 train / 1000 test signals of length 40, 10 classes,
    generated procedurally by mnist1d.make_dataset (never the downloading get_dataset) and
    cached as .npz under the cache directory."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    key = hashlib.sha1(json.dumps({k: v for k, v in vars(args).items() if k != "url"},
                                  sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = cache_dir() / f"mnist1d-{key}.npz"
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, KeyError, ValueError):
        # make_dataset reseeds numpy's and random's global RNGs: keep the caller's
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {k: d[k] for k in ("x", "y", "x_test", "y_test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
    return as_dataset("mnist1d", arrays["x"][:, None, :], arrays["y"],
                      arrays["x_test"][:, None, :], arrays["y_test"], 10)


@register_dataset("digits")
def digits(data_dir=None) -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1347 train / 450 test, stratified, fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 1, 8, 8) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=450, stratify=y, random_state=0)
    return as_dataset("digits", x_tr, y_tr, x_te, y_te, 10, image=True)


@register_dataset("synthetic")
def synthetic(data_dir=None) -> Dataset:
    """Tiny generated data for tests: 4 classes of noisy 1-D templates, length 16,
    512 train / 256 test, fixed seed."""
    g = np.random.default_rng(0)
    templates = g.normal(size=(4, 16))
    y = g.integers(0, 4, size=768)
    x = templates[y] + 0.8 * g.normal(size=(768, 16))
    x = (3.0 * x + 1.0)[:, None, :]  # an offset and scale for the normalizers to remove
    return as_dataset("synthetic", x[:512], y[:512], x[512:], y[512:], 4)


# Local-copy datasets register themselves; imported last because they build on the above.
from . import cifar  # noqa: E402,F401
