"""A user's data: ``--dataset npz:PATH``, a NumPy .npz file read without pickle.

Arrays: ``x_train``, ``y_train``, ``x_test``, ``y_test`` and, optionally, ``x_val``,
``y_val`` (both or neither). Inputs (N, C), (N, C, L) or (N, C, H, W), finite numbers;
labels integers 0..K-1, K = the largest training label + 1, at least 2 classes. Every
defect is a ConfigError of one line naming the file.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .registry import Dataset, as_dataset, register_scheme

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_val", "y_val")


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of `path` (no pickle), or a ConfigError saying why not."""
    where = f"npz:{path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise ConfigError(f"{where}: not an .npz archive (a single .npy array)")
        if not magic.startswith(b"PK"):  # np.load would take it for a pickle
            raise ConfigError(f"{where}: not an .npz archive (np.savez writes a zip file)")
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in REQUIRED if k not in npz.files]
            if missing:
                raise ConfigError(f"{where}: no {', '.join(missing)} array (it has: "
                                  f"{', '.join(npz.files) or 'none'})")
            return {k: npz[k] for k in REQUIRED + OPTIONAL if k in npz.files}
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{where}: not a readable NumPy .npz file ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]})") from None


def check_arrays(where: str, arrays: dict[str, np.ndarray]) -> int:
    """Validate the split arrays; returns the number of classes K."""
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise ConfigError(f"{where}: x_val and y_val come together (only one is there)")
    splits = [s for s in ("train", "test", "val") if f"x_{s}" in arrays]
    sample = arrays["x_train"].shape[1:]
    for s in splits:
        x, y = arrays[f"x_{s}"], arrays[f"y_{s}"]
        if x.ndim not in (2, 3, 4):
            raise ConfigError(f"{where}: x_{s} has shape {x.shape}; expected (N, C), "
                              "(N, C, L) or (N, C, H, W)")
        if x.shape[1:] != sample:
            raise ConfigError(f"{where}: x_{s} samples are {x.shape[1:]}, x_train's {sample}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ConfigError(f"{where}: x_{s} is {x.dtype}, not numbers")
        if not np.isfinite(x).all():
            raise ConfigError(f"{where}: x_{s} has {int((~np.isfinite(x)).sum())} non-finite "
                              "value(s)")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"{where}: y_{s} must be a 1-d array of integer labels, got "
                              f"{y.dtype} of shape {y.shape}")
        if len(x) != len(y):
            raise ConfigError(f"{where}: x_{s} has {len(x)} samples, y_{s} {len(y)} labels")
        if not len(x):
            raise ConfigError(f"{where}: x_{s} has no samples")
    k = int(arrays["y_train"].max()) + 1
    for s in splits:
        y = arrays[f"y_{s}"]
        if y.min() < 0 or y.max() >= k:
            raise ConfigError(f"{where}: y_{s} has labels outside 0..{k - 1} (the training "
                              f"labels' range): min {y.min()}, max {y.max()}")
    if len(np.unique(arrays["y_train"])) < 2:
        raise ConfigError(f"{where}: y_train has fewer than 2 classes")
    return k


@register_scheme("npz")
def load_npz(path: str, data_dir: str | None = None) -> Dataset:
    arrays = read_npz(path)
    k = check_arrays(f"npz:{path}", arrays)
    # the file's own validation split, when it has one (else load_dataset carves one)
    return as_dataset(f"npz:{path}", arrays["x_train"], arrays["y_train"], arrays["x_test"],
                      arrays["y_test"], k, image=arrays["x_train"].ndim == 4,
                      x_val=arrays.get("x_val"), y_val=arrays.get("y_val"))
