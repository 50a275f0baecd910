"""The embedded datasets: generated or bundled with a package, nothing downloaded."""
from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np

from .registry import Dataset, as_dataset, cache_dir, register_dataset


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


def _digits_split():
    """scikit-learn's 8x8 digits in [0, 1], (N, 1, 8, 8), with the fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 1, 8, 8) / 16.0
    return train_test_split(x, y, test_size=450, stratify=y, random_state=0)


@register_dataset("digits")
def digits(data_dir=None) -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1347 train / 450 test, stratified, fixed split."""
    x_tr, x_te, y_tr, y_te = _digits_split()
    return as_dataset("digits", x_tr, y_tr, x_te, y_te, 10, image=True)


DIGITS32 = {"size": 32, "noise": 0.3, "seed": 0}  # pixels a side; noise sd in standardized
# units (issue 13's measurement: bn 98.4% at micro-batch 2, bkn 15.7%); the noise's seed


@register_dataset("digits32")
def digits32(data_dir=None) -> Dataset:
    """digits at CIFAR's size: each 8x8 image upsampled bilinearly to 32x32, standardized
    with the training split's mean and std, plus fixed Gaussian pixel noise (sd 0.3, seed 0;
    DIGITS32), so that a CNN sees maps of 32, 16 and 8 pixels. The same images, labels and
    split as digits. Generated once, cached as .npz under the cache directory."""
    key = hashlib.sha1(json.dumps(DIGITS32, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"digits32-{key}.npz"
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, KeyError, ValueError):
        import torch
        import torch.nn.functional as F

        x_tr, x_te, y_tr, y_te = _digits_split()
        size = DIGITS32["size"]
        up = [F.interpolate(torch.from_numpy(x).double(), size=(size, size), mode="bilinear",
                            align_corners=False).numpy() for x in (x_tr, x_te)]
        mean, std = up[0].mean(), up[0].std()
        g = np.random.default_rng(DIGITS32["seed"])
        noisy = [(u - mean) / std + DIGITS32["noise"] * g.standard_normal(u.shape) for u in up]
        arrays = {"x": noisy[0].astype(np.float32), "y": y_tr,
                  "x_test": noisy[1].astype(np.float32), "y_test": y_te}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
    return as_dataset("digits32", arrays["x"], arrays["y"], arrays["x_test"],
                      arrays["y_test"], 10, image=True)


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
