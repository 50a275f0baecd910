"""CIFAR-10 and CIFAR-100 from a local copy of the "python version" archives; no download.

Layout (data_dir may be the parent folder or the dataset folder itself):
    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/     train, test, meta
Each data file is a Python 2 pickle (protocol 2) of a dict with bytes keys: b'data' is a
uint8 array (N, 3072) holding the red, green and blue 32x32 planes row-major, so a row
reshapes to (3, 32, 32); labels are b'labels' (CIFAR-10) or b'fine_labels' (CIFAR-100).
A copy re-saved by Python 3 has the same keys as str ('data', 'labels'): read alike.

Pickles can run arbitrary code when loaded, so they are read with `_CifarUnpickler`, which
rebuilds only numpy arrays, dtypes and plain containers and refuses every other global
before anything from the file is called.
"""
from __future__ import annotations

import codecs
import hashlib
import pickle
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .registry import Dataset, as_dataset, register_dataset

# name -> (title, folder, train files, test file, label key, classes, meta file)
_LAYOUT = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                "labels", 10, "batches.meta"),
    "cifar100": ("CIFAR-100", "cifar-100-python", ("train",), "test",
                 "fine_labels", 100, "meta"),
}
_EXPECTED = {
    "cifar10": "data_batch_1..5, test_batch (the 'CIFAR-10 python version')",
    "cifar100": "train, test (the 'CIFAR-100 python version')",
}

# MD5 sums of the files in the official archives (cs.toronto.edu/~kriz/cifar.html).
MD5 = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}


# ---------------------------------------------------------------- restricted unpickling
def _latin1_encode(text, encoding="latin1"):
    """What a Python 3 pickle at protocol 2 calls to rebuild a bytes object:
    codecs.encode(text, 'latin1'). Only that one encoding is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


# The only globals a CIFAR pickle needs. Objects, not names: nothing is imported by name,
# so a file cannot make us import (and thereby run) any module.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's array rebuilder, any version
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy < 2 and Python 2 files
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # written by Python 3 re-pickles at protocol 2 (bytes and empty bytes)
    ("_codecs", "encode"): _latin1_encode,
    ("codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in _ALLOWED. Every call a pickle can make
    (REDUCE, NEWOBJ, INST, OBJ) needs a callable that only find_class can supply, so a
    refused global means no code from the file ever runs."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as CIFAR needs
        self.path = path

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise ConfigError(f"refusing to load {self.path}: it asks to run "
                              f"{module}.{name}, which a CIFAR file never does")
        return obj

    def persistent_load(self, pid):
        raise ConfigError(f"refusing to load {self.path}: it asks for a persistent object, "
                          "which a CIFAR file never does")


def load_pickle(path: Path):
    """Read one CIFAR pickle safely; a refused or corrupt file raises ConfigError."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, path).load()
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated or not a pickle: UnpicklingError, EOFError, ...
        raise ConfigError(f"cannot read {path}: not a CIFAR pickle "
                          f"({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- layout
def find_folder(name: str, data_dir: str | None) -> Path:
    """The folder holding the dataset's files: data_dir/<folder> or data_dir itself."""
    title, folder, train, test, *_ = _LAYOUT[name]
    if not data_dir:
        raise ConfigError(f"{name} needs a local copy: set --data-dir to the folder that "
                          f"holds {folder}/")
    root = Path(data_dir).expanduser()
    needed = train + (test,)
    for candidate in (root / folder, root):
        if all((candidate / f).is_file() for f in needed):
            return candidate
    for candidate in (root / folder, root):  # a partial copy: name what is missing
        present = [f for f in needed if (candidate / f).is_file()]
        if present:
            missing = ", ".join(f for f in needed if f not in present)
            raise ConfigError(f"incomplete {title} in {candidate}: missing {missing}")
    raise ConfigError(f"no {title} in {root}: expected {root / folder}/{_EXPECTED[name]}")


def read_split(path: Path, label_key: str, num_classes: int):
    """One data file -> images (N, 3, 32, 32) uint8, labels (N,) int64, checked. Keys may
    be bytes (the official Python 2 files) or str (a copy re-saved by Python 3)."""
    d = load_pickle(path)
    if isinstance(d, dict):
        d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    if not isinstance(d, dict) or "data" not in d or label_key not in d:
        keys = ", ".join(sorted(map(repr, d))) if isinstance(d, dict) else type(d).__name__
        raise ConfigError(f"{path} is not a CIFAR batch: expected keys 'data' and "
                          f"{label_key!r} (bytes or str), found {keys}")
    x, y = d["data"], np.asarray(d[label_key])
    if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2
            or x.shape[1] != 3072 or y.shape != (x.shape[0],)):
        raise ConfigError(f"{path}: expected uint8 data (N, 3072) and N labels, found "
                          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')} "
                          f"and {y.shape[0] if y.ndim else 0} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"{path}: labels outside 0..{num_classes - 1}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_cifar(name: str, data_dir: str | None) -> Dataset:
    """CIFAR as a standardized Dataset: x (N, 3, 32, 32) float32, per-channel standardized
    with training statistics; y int64 (CIFAR-100: the 100 fine labels)."""
    title, folder, train, test, label_key, classes, _ = _LAYOUT[name]
    where = find_folder(name, data_dir)
    parts = [read_split(where / f, label_key, classes) for f in train]
    x_test, y_test = read_split(where / test, label_key, classes)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return as_dataset(name, x_train, y_train, x_test, y_test, classes, image=True)


@register_dataset("cifar10")
def cifar10(data_dir=None) -> Dataset:
    """CIFAR-10: 50000 train / 10000 test colour images 32x32, 10 classes."""
    return load_cifar("cifar10", data_dir)


@register_dataset("cifar100")
def cifar100(data_dir=None) -> Dataset:
    """CIFAR-100: 50000 train / 10000 test colour images 32x32, 100 fine classes."""
    return load_cifar("cifar100", data_dir)


# ---------------------------------------------------------------- integrity
def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_cifar(name: str, data_dir: str | None) -> None:
    """Check every file of the official archive against its MD5 sum; raise ConfigError
    naming the first missing or mismatching file."""
    if name not in _LAYOUT:
        raise ConfigError(f"unknown CIFAR dataset {name!r}; known: {', '.join(_LAYOUT)}")
    title = _LAYOUT[name][0]
    where = find_folder(name, data_dir)
    for fname, expected in MD5[name].items():
        path = where / fname
        if not path.is_file():
            raise ConfigError(f"{title} file {path} is missing")
        got = md5_of(path)
        if got != expected:
            raise ConfigError(f"{title} file {path} has MD5 {got}, expected {expected}: "
                              "it is not the original file (corrupt or re-saved)")
