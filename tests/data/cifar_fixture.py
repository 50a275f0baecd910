"""Small fake CIFAR copies in the exact on-disk format of the official "python version",
or of a copy re-saved by Python 3.

The official files were written by Python 2's cPickle at protocol 2: every str (keys,
the dtype code, the raw array bytes) is a byte string (opcodes SHORT_BINSTRING / BINSTRING)
and the array is rebuilt by numpy.core.multiarray._reconstruct. Python 3's pickler would
write bytes as calls to codecs.encode instead, so `Py2Pickler` writes them as Python 2 did.
A Python 3 re-save (`pickle.dump(d, f, protocol)` after loading with encoding="latin1", as
tools that convert the files do) has str keys and strings.
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes str and bytes as Python 2 byte strings and names the
    array rebuilder by its Python 2 era module, as in the official CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def _batch(rng, n, label_key, num_classes, title):
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, num_classes, size=n)
    d = {b"batch_label": title.encode(), label_key: [int(v) for v in y],
         b"data": x.reshape(n, 3072), b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [int(v) // 5 for v in y]
    return d, x, y


def as_py3(obj):
    """What loading with encoding="latin1" gives: every byte string a str."""
    if isinstance(obj, dict):
        return {as_py3(k): as_py3(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_py3(v) for v in obj]
    return obj.decode("latin1") if isinstance(obj, bytes) else obj


def write_fixture(root, name: str = "cifar10", n_train_per_batch: int = 8, n_test: int = 8,
                  seed: int = 0, protocol: int | None = None) -> dict:
    """Write a fake CIFAR-10 (5 train batches of n_train_per_batch images) or CIFAR-100
    (one train file of 5 * n_train_per_batch images, so both have the same size) under
    root/<official folder>, with random uint8 images and labels. protocol None: the
    official Python 2 files (bytes keys); 2 to 5: a Python 3 re-save at that protocol
    (str keys).

    Returns {"dir": folder, "x_train": (N, 3, 32, 32) uint8, "y_train": (N,), "x_test",
    "y_test"}: what a correct loader must read back."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    if name == "cifar10":
        folder, key, classes = root / "cifar-10-batches-py", b"labels", 10
        train = [(f"data_batch_{i}", n_train_per_batch) for i in range(1, 6)]
        test, meta = "test_batch", ("batches.meta", {
            b"num_cases_per_batch": n_train_per_batch, b"num_vis": 3072,
            b"label_names": [f"class{i}".encode() for i in range(10)]})
    elif name == "cifar100":
        folder, key, classes = root / "cifar-100-python", b"fine_labels", 100
        train = [("train", 5 * n_train_per_batch)]
        test, meta = "test", ("meta", {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    else:
        raise ValueError(name)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(obj, path):
        if protocol is None:
            dump_py2(obj, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(as_py3(obj), f, protocol=protocol)

    xs, ys = [], []
    for fname, n in train:
        d, x, y = _batch(rng, n, key, classes, f"training batch {fname}")
        dump(d, folder / fname)
        xs.append(x)
        ys.append(y)
    d, x_test, y_test = _batch(rng, n_test, key, classes, "testing batch 1 of 1")
    dump(d, folder / test)
    dump(meta[1], folder / meta[0])
    return {"dir": folder, "x_train": np.concatenate(xs), "y_train": np.concatenate(ys),
            "x_test": x_test, "y_test": y_test}
