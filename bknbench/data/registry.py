"""The dataset registry and what every loader shares: the Dataset tensors, the validation
split, standardization, the cache folder.

Every loader has one shape: ``loader(data_dir) -> Dataset`` (CPU tensors, float32 inputs
standardized with training-split statistics, int64 labels), registered with
``@register_dataset(name)``. A loader gives train and test (and may give its own validation
split); ``load_dataset`` carves the validation split out of the training split when the
loader gave none (``split_validation``) and standardizes again with what remains.
"""
from __future__ import annotations

import dataclasses
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
    x_val: torch.Tensor | None = None  # (N_val, C, *spatial) float32; None: no validation split
    y_val: torch.Tensor | None = None  # (N_val,) int64

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def has_val(self) -> bool:
        return self.x_val is not None and len(self.x_val) > 0

    def to(self, device) -> "Dataset":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(self.name, move(self.x_train), move(self.y_train), move(self.x_test),
                       move(self.y_test), self.num_classes, self.image, move(self.x_val),
                       move(self.y_val))


DATASETS: dict[str, Callable[[str | None], Dataset]] = {}


def register_dataset(name: str):
    """Register a loader ``(data_dir) -> Dataset`` as `name`; a name that exists is a
    ConfigError."""
    if name in DATASETS:
        raise ConfigError(f"dataset {name!r} is already registered")

    def deco(fn):
        DATASETS[name] = fn
        return fn
    return deco


# "scheme:ARGUMENT" datasets (npz:PATH): scheme -> loader(argument, data_dir)
SCHEMES: dict[str, Callable[[str, str | None], Dataset]] = {}


def register_scheme(scheme: str):
    def deco(fn):
        SCHEMES[scheme] = fn
        return fn
    return deco


VAL_FRACTION = 0.1  # share of the training split held out for validation (--val-fraction)
VAL_SEED = 0  # the validation split's own seed: the same samples for every run and seed
MAX_VAL_FRACTION = 0.5  # more would leave less to train on than to select with


def load_dataset(name: str, data_dir: str | None = None,
                 val_fraction: float = VAL_FRACTION) -> Dataset:
    """The dataset with three splits: train, validation (val_fraction of the loader's
    training split, stratified, VAL_SEED; none at 0; the loader's own when it gave one)
    and test; inputs standardized with the statistics of what remains for training."""
    check_val_fraction(val_fraction)
    scheme, colon, argument = name.partition(":")
    if colon and scheme in SCHEMES:
        data = SCHEMES[scheme](argument, data_dir)
    elif name in DATASETS:
        data = DATASETS[name](data_dir)
    else:
        raise ConfigError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; known: "
                          f"{', '.join(sorted(DATASETS))}, or npz:PATH")
    if data.x_val is not None or val_fraction == 0:
        return data
    return split_validation(data, val_fraction)


def check_val_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction <= MAX_VAL_FRACTION:
        raise ConfigError(f"--val-fraction must be in [0, {MAX_VAL_FRACTION}], got {val_fraction}")


def split_validation(data: Dataset, val_fraction: float, seed: int = VAL_SEED) -> Dataset:
    """Carve round(val_fraction N_train) samples out of the training split, stratified by
    class (scikit-learn's train_test_split, random_state=seed), then standardize all three
    splits per channel with the remaining training samples' mean and std. The loader
    standardized with the whole training split; standardizing that again with the
    remaining part's statistics gives the same numbers as standardizing the raw inputs
    with them (an affine map of an affine map), up to rounding."""
    from sklearn.model_selection import train_test_split

    y = data.y_train.numpy()
    n_val = round(val_fraction * len(y))
    if n_val < data.num_classes or len(y) - n_val < data.num_classes:
        raise ConfigError(f"--val-fraction {val_fraction} leaves {n_val} validation samples "
                          f"of {data.name}: fewer than its {data.num_classes} classes")
    train, val = train_test_split(np.arange(len(y)), test_size=n_val, stratify=y,
                                  random_state=seed)
    train, val = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))
    x_train = data.x_train[train]
    axes = (0,) + tuple(range(2, x_train.ndim))
    mean = x_train.double().mean(dim=axes, keepdim=True)
    std = x_train.double().std(dim=axes, keepdim=True, correction=0) + 1e-8
    norm = lambda x: ((x.double() - mean) / std).float().contiguous()  # noqa: E731
    return dataclasses.replace(data, x_train=norm(x_train), y_train=data.y_train[train],
                               x_test=norm(data.x_test), x_val=norm(data.x_train[val]),
                               y_val=data.y_train[val])


def standardize(x_train: np.ndarray, *others: np.ndarray):
    """Per-channel standardization with training statistics. x: (N, C, *S)."""
    axes = (0,) + tuple(range(2, x_train.ndim))
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True) + 1e-8
    return tuple((x - mean) / std for x in (x_train, *others))


def as_dataset(name, x_train, y_train, x_test, y_test, num_classes, image=False,
               x_val=None, y_val=None) -> Dataset:
    """Tensors from arrays, standardized with the training split's statistics. x_val,
    y_val: a validation split the source defines (None: load_dataset carves one)."""
    xs = [x_train, x_test] + ([] if x_val is None else [x_val])
    xs = standardize(*(x.astype(np.float32) for x in xs))
    tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x, np.float32))  # noqa: E731
    label = lambda y: torch.from_numpy(np.asarray(y, np.int64))  # noqa: E731
    return Dataset(name, tensor(xs[0]), label(y_train), tensor(xs[1]), label(y_test),
                   num_classes, image, None if x_val is None else tensor(xs[2]),
                   None if y_val is None else label(y_val))


def cache_dir() -> Path:
    root = os.environ.get("BKNBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bknbench")
    return Path(root)
