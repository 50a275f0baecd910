"""CIFAR loading from fixture files in the official format; layout errors; MD5 check;
refusal of pickles that would run code."""
import os
import pickle

import numpy as np
import pytest
import torch

import bknbench.data.cifar as cifar
from bknbench.errors import ConfigError
from bknbench.data.registry import standardize
from cifar_fixture import write_fixture


# None: the official Python 2 files, bytes keys; 2 and 4: re-saved by Python 3, str keys
# (4 is the default protocol of Python 3.8 to 3.13)
KEY_STYLES = pytest.mark.parametrize("protocol", [None, 2, 4], ids=["bytes-keys", "str-keys-p2",
                                                                    "str-keys-p4"])


@KEY_STYLES
@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_fixture_loads_with_the_right_images_and_labels(tmp_path, name, classes, protocol):
    ref = write_fixture(tmp_path, name, n_train_per_batch=6, n_test=5, seed=1,
                        protocol=protocol)
    first = ref["dir"] / ("data_batch_1" if name == "cifar10" else "train")
    with open(first, "rb") as f:
        keys = set(pickle.load(f, encoding="bytes"))
    assert keys >= ({b"data", b"batch_label"} if protocol is None else {"data", "batch_label"})
    loader = cifar.cifar10 if name == "cifar10" else cifar.cifar100
    for where in (tmp_path, ref["dir"]):  # the parent or the dataset folder itself
        ds = loader(str(where))
        assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
        assert ds.image and ds.num_classes == classes and ds.name == name
        assert torch.equal(ds.y_train, torch.from_numpy(ref["y_train"]))
        assert torch.equal(ds.y_test, torch.from_numpy(ref["y_test"]))
        # the rows were (R, G, B) planes row-major: pixels land where they were drawn
        x_tr, x_te = standardize(ref["x_train"].astype(np.float32),
                                 ref["x_test"].astype(np.float32))
        assert np.allclose(ds.x_train.numpy(), x_tr, atol=1e-5)
        assert np.allclose(ds.x_test.numpy(), x_te, atol=1e-5)
        # per-channel standardization with training statistics
        assert ds.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_registered_as_datasets():
    from bknbench.data.registry import DATASETS
    assert DATASETS["cifar10"] is cifar.cifar10 and DATASETS["cifar100"] is cifar.cifar100


def test_missing_folder_says_what_is_expected_where(tmp_path):
    with pytest.raises(ConfigError) as e:
        cifar.cifar10(str(tmp_path))
    msg = str(e.value)
    assert f"no CIFAR-10 in {tmp_path}" in msg
    assert str(tmp_path / "cifar-10-batches-py") + "/data_batch_1..5, test_batch" in msg
    with pytest.raises(ConfigError, match="expected .*cifar-100-python/train, test"):
        cifar.cifar100(str(tmp_path))
    with pytest.raises(ConfigError, match="--data-dir"):
        cifar.cifar10(None)


def test_incomplete_copy_names_the_missing_files(tmp_path):
    ref = write_fixture(tmp_path, "cifar10", 2, 2)
    os.remove(ref["dir"] / "data_batch_3")
    os.remove(ref["dir"] / "test_batch")
    with pytest.raises(ConfigError, match="incomplete CIFAR-10 in .*: missing data_batch_3, "
                                          "test_batch$"):
        cifar.cifar10(str(tmp_path))


def test_wrong_content_is_a_config_error(tmp_path):
    ref = write_fixture(tmp_path, "cifar10", 2, 2)
    (ref["dir"] / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="data_batch_2: not a CIFAR pickle"):
        cifar.cifar10(str(tmp_path))
    with open(ref["dir"] / "data_batch_2", "wb") as f:
        pickle.dump({b"data": [1, 2]}, f, protocol=2)
    with pytest.raises(ConfigError, match="data_batch_2 is not a CIFAR batch"):
        cifar.cifar10(str(tmp_path))


def test_verify_names_the_mismatching_file(tmp_path, monkeypatch):
    ref = write_fixture(tmp_path, "cifar10", 2, 2)
    with pytest.raises(ConfigError) as e:  # a fixture is not the original archive
        cifar.verify_cifar("cifar10", str(tmp_path))
    assert "data_batch_1 has MD5" in str(e.value)
    assert "expected c99cafc152244af753f735de768cd75f" in str(e.value)
    # with the fixture's own sums it passes; then one changed byte is caught by name
    sums = {f: cifar.md5_of(ref["dir"] / f) for f in cifar.MD5["cifar10"]}
    monkeypatch.setitem(cifar.MD5, "cifar10", sums)
    cifar.verify_cifar("cifar10", str(tmp_path))
    path = ref["dir"] / "data_batch_4"
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match=r"CIFAR-10 file .*data_batch_4 has MD5 [0-9a-f]{32}, "
                                          f"expected {sums['data_batch_4']}"):
        cifar.verify_cifar("cifar10", str(tmp_path))


def test_verify_cifar100_checks_train_and_test(tmp_path):
    write_fixture(tmp_path, "cifar100", 2, 2)
    with pytest.raises(ConfigError, match="CIFAR-100 file .*train has MD5 .* expected "
                                          "16019d7e3df5f24257cddd939b257f8d"):
        cifar.verify_cifar("cifar100", str(tmp_path))


class _System:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _Open:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("payload", [_System, _Open])
@pytest.mark.parametrize("nested", [None, "bytes", "str"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_booby_trapped_pickle_is_refused_and_never_runs(tmp_path, payload, nested, protocol):
    ref = write_fixture(tmp_path, "cifar10", 2, 2)
    target = tmp_path / "pwned"
    path = ref["dir"] / "data_batch_1"
    obj = payload(target)
    if nested:  # hidden inside an otherwise plausible batch, with either style of keys
        batch = {"labels": [0, 1], "data": np.zeros((2, 3072), np.uint8), "x": obj}
        obj = batch if nested == "str" else {k.encode(): v for k, v in batch.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    with pytest.raises(ConfigError) as e:
        cifar.cifar10(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"refusing to load {path}: it asks to run ")
    assert msg.endswith(", which a CIFAR file never does")
    assert ("system" in msg) if payload is _System else ("open" in msg)
    assert not target.exists()


def test_py3_protocol2_repickle_of_cifar_loads(tmp_path):
    # a copy re-saved by Python 3 at protocol 2 encodes bytes via codecs.encode: allowed
    ref = write_fixture(tmp_path, "cifar10", 2, 2)
    x = ref["x_train"][:2].reshape(2, 3072)
    with open(ref["dir"] / "data_batch_1", "wb") as f:
        pickle.dump({b"data": x, b"labels": [int(v) for v in ref["y_train"][:2]]}, f,
                    protocol=2)
    d = cifar.load_pickle(ref["dir"] / "data_batch_1")
    assert np.array_equal(d[b"data"], x)


def test_what_the_unpickler_allows_is_unchanged():
    """The allowed globals, listed: a change to this list is a change to what a data file
    can make us call, and must be deliberate."""
    assert sorted(cifar._ALLOWED) == [
        ("__builtin__", "bytes"), ("_codecs", "encode"), ("builtins", "bytes"),
        ("codecs", "encode"), ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")]


def test_a_batch_without_its_keys_names_both_styles(tmp_path):
    ref = write_fixture(tmp_path, "cifar10", 2, 2, protocol=4)
    with open(ref["dir"] / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(ConfigError, match=r"data_batch_3 is not a CIFAR batch: expected keys "
                                          r"'data' and 'labels' \(bytes or str\), found "
                                          r"'data', 'fine_labels'$"):
        cifar.cifar10(str(tmp_path))


@pytest.mark.parametrize("name, file, key, labels, message", [
    ("cifar10", "data_batch_3", "labels", [0, 10], r"data_batch_3: labels outside 0\.\.9$"),
    ("cifar10", "test_batch", "labels", [-1, 9], r"test_batch: labels outside 0\.\.9$"),
    ("cifar100", "train", "fine_labels", [99, 100] * 5, r"train: labels outside 0\.\.99$"),
    ("cifar10", "data_batch_1", "labels", [9, 0], None),  # the edges are labels
    ("cifar100", "test", "fine_labels", [0, 99], None),
])
def test_labels_outside_the_classes_are_refused(tmp_path, name, file, key, labels, message):
    ref = write_fixture(tmp_path, name, 2, 2, protocol=4)
    with open(ref["dir"] / file, "wb") as f:
        pickle.dump({"data": np.zeros((len(labels), 3072), np.uint8), key: labels}, f)
    load = getattr(cifar, name)
    if message is None:
        load(str(tmp_path))
        return
    with pytest.raises(ConfigError, match=message):
        load(str(tmp_path))


@pytest.mark.parametrize("data, labels, found", [
    (np.zeros((2, 3072), np.float32), [0, 1], r"float32 \(2, 3072\) and 2 labels"),
    (np.zeros((2, 3071), np.uint8), [0, 1], r"uint8 \(2, 3071\) and 2 labels"),
    (np.zeros((2, 3072), np.uint8), [0, 1, 2], r"uint8 \(2, 3072\) and 3 labels"),
    (np.zeros(3072, np.uint8), [0], r"uint8 \(3072,\) and 1 labels"),
])
def test_data_of_the_wrong_type_or_shape_is_refused(tmp_path, data, labels, found):
    ref = write_fixture(tmp_path, "cifar10", 2, 2, protocol=4)
    with open(ref["dir"] / "data_batch_2", "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)
    with pytest.raises(ConfigError, match=r"data_batch_2: expected uint8 data \(N, 3072\) and N "
                                          r"labels, found " + found + "$"):
        cifar.cifar10(str(tmp_path))
