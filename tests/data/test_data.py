"""Embedded datasets: shapes, standardization, the mnist1d cache and the global RNG, the
digits split."""
import random
from collections import Counter

import numpy as np
import pytest
import torch

from bknbench.errors import ConfigError
from bknbench.data.registry import load_dataset


def _check_standardized(x):
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.double().mean(dim=axes)
    std = x.double().std(dim=axes, correction=0)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)


def test_unknown_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; known: .*synthetic"):
        load_dataset("nope")


def test_mnist1d_shapes_cache_and_global_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("BKNBENCH_CACHE", str(tmp_path))
    np.random.seed(1234)
    random.seed(1234)
    np_state, py_state = np.random.get_state(), random.getstate()
    d = load_dataset("mnist1d", val_fraction=0)  # generates (make_dataset reseeds the
    # global RNGs); the loader's two splits, no validation split carved
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]
    assert random.getstate() == py_state

    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40)
    assert d.y_train.shape == (4000,) and d.y_test.shape == (1000,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10 and not d.image and d.sample_shape == (1, 40)
    assert set(d.y_train.tolist()) == set(range(10))
    _check_standardized(d.x_train)
    assert d.x_test.mean().abs() < 0.1  # test split uses the training statistics

    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("mnist1d-")
    assert files[0].suffix == ".npz"  # no temporary file left behind

    # the cached file is reused: generating again would fail here
    import mnist1d.data

    def no_generation(*a, **k):
        raise AssertionError("make_dataset called although the cache exists")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = load_dataset("mnist1d", val_fraction=0)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    assert np.random.get_state()[2:] == np_state[2:]


def test_digits_split_is_fixed_and_stratified():
    d = load_dataset("digits", val_fraction=0)
    assert d.x_train.shape == (1347, 1, 8, 8) and d.x_test.shape == (450, 1, 8, 8)
    assert d.image and d.num_classes == 10
    _check_standardized(d.x_train)
    all_y = torch.cat([d.y_train, d.y_test])
    total = torch.bincount(all_y, minlength=10).double()
    test = torch.bincount(d.y_test, minlength=10).double()
    # stratified: each class's share of the test split equals its share overall (+-1 sample)
    assert ((test - total * 450 / 1797).abs() <= 1.0).all()
    again = load_dataset("digits", val_fraction=0)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)


def _rows(x: torch.Tensor) -> Counter:
    """Each sample as a key that an increasing affine map of its values (a standardization)
    leaves alone, exactly: the dense rank of each pixel among the sample's values (equal
    pixels map to equal floats). A multiset: digits has a few equal images."""
    return Counter(tuple(torch.unique(r, return_inverse=True)[1].tolist())
                   for r in x.flatten(1))


def test_digits_three_splits_are_disjoint_and_add_up():
    """load_dataset("digits"): validation carved from training (10%, stratified), disjoint
    from training and test, the three adding up to the 1797 digits; training standardized
    with what remains; the same split every time, at every call."""
    d, whole = load_dataset("digits"), load_dataset("digits", val_fraction=0)
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (1212, 135, 450)
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 1797
    assert len(d.y_val) == len(d.x_val) and d.has_val and not whole.has_val
    train, val, test = _rows(d.x_train), _rows(d.x_val), _rows(d.x_test)
    assert train + val == _rows(whole.x_train)  # a partition of the loader's training split
    assert test == _rows(whole.x_test) and torch.equal(d.y_test, whole.y_test)
    assert not set(val) & set(test) and not set(train) & set(test)
    _check_standardized(d.x_train)
    counts = torch.bincount(d.y_val, minlength=10).double()
    assert ((counts - torch.bincount(whole.y_train, minlength=10) * 0.1).abs() <= 1).all()
    again = load_dataset("digits")
    assert torch.equal(again.x_val, d.x_val) and torch.equal(again.y_train, d.y_train)


def test_split_validation_partitions_the_training_indices():
    """Inputs that name their own index: every training sample lands in exactly one of the
    two parts, round(fraction N) of them in validation, stratified by class."""
    from bknbench.data.registry import Dataset, split_validation

    n = 200
    idx = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    y = torch.arange(n) % 4
    part = split_validation(Dataset("idx", idx, y, idx[:8], y[:8], 4), 0.25)
    both = torch.cat([part.x_train, part.x_val]).flatten().double()
    # the same positive affine map (the standardization) on both parts: back to indices
    back = lambda x: ((x.flatten().double() - both.min()) / (both.max() - both.min())  # noqa: E731
                      * (n - 1)).round().long()
    train, val = back(part.x_train), back(part.x_val)
    assert len(val) == 50 and len(train) == 150
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    assert torch.equal(part.y_val, val % 4) and torch.equal(part.y_train, train % 4)
    assert (torch.bincount(part.y_val, minlength=4) - 12.5).abs().max() <= 0.5
    assert abs(part.x_train.mean().item()) < 1e-5  # standardized with what remains
    assert abs(part.x_train.std(correction=0).item() - 1) < 1e-4


def test_synthetic_is_deterministic():
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert a.x_train.shape == (461, 1, 16) and a.x_test.shape == (256, 1, 16)
    assert a.x_val.shape == (51, 1, 16)  # 10% of the generator's 512 training samples
    assert a.num_classes == 4 and set(a.y_train.tolist()) == {0, 1, 2, 3}
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    _check_standardized(a.x_train)


def test_synthetic_does_not_touch_global_rngs():
    torch.manual_seed(5)
    np.random.seed(5)
    t, n = torch.get_rng_state(), np.random.get_state()
    load_dataset("synthetic")
    assert torch.equal(torch.get_rng_state(), t)
    assert np.array_equal(np.random.get_state()[1], n[1])


TENSORS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def test_dataset_to_device_moves_all_six_tensors():
    d = load_dataset("digits")
    e = d.to("cpu")
    assert (e.name, e.num_classes, e.image) == (d.name, d.num_classes, d.image)
    for k in TENSORS:
        assert torch.equal(getattr(e, k), getattr(d, k)), k
    m = d.to("meta")  # a real move on any machine: every tensor must go
    for k in TENSORS:
        a, b = getattr(m, k), getattr(d, k)
        assert (a.device.type, a.shape, a.dtype) == ("meta", b.shape, b.dtype), k
    assert all(getattr(d, k).device.type == "cpu" for k in TENSORS)  # the original stays



def test_digits32_shapes_cache_and_split(tmp_path, monkeypatch):
    """digits upsampled to 32x32 with fixed noise: CIFAR-sized maps, generated once into
    the cache (then read back bitwise), the same samples in the same split as digits."""
    monkeypatch.setenv("BKNBENCH_CACHE", str(tmp_path))
    d = load_dataset("digits32", val_fraction=0)
    assert d.x_train.shape == (1347, 1, 32, 32) and d.x_test.shape == (450, 1, 32, 32)
    assert d.image and d.num_classes == 10 and d.x_train.dtype == torch.float32
    _check_standardized(d.x_train)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("digits32-") and files[0].suffix == ".npz"
    stamp = files[0].stat().st_mtime_ns
    again = load_dataset("digits32", val_fraction=0)  # from the cache, not regenerated
    assert files[0].stat().st_mtime_ns == stamp
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(again, k), getattr(d, k))
    (tmp_path / files[0].name).unlink()  # regenerated from scratch: the same bits
    fresh = load_dataset("digits32", val_fraction=0)
    assert torch.equal(fresh.x_train, d.x_train) and torch.equal(fresh.x_test, d.x_test)

    small = load_dataset("digits", val_fraction=0)
    assert torch.equal(d.y_train, small.y_train) and torch.equal(d.y_test, small.y_test)
    # each 32x32 image, pooled back to 8x8, is its digits image (noise sd 0.3 / 4 per pool)
    for big, little in ((d.x_train, small.x_train), (d.x_test, small.x_test)):
        pooled = torch.nn.functional.avg_pool2d(big, 4).flatten(1)
        c = torch.corrcoef(torch.stack([pooled.flatten(), little.flatten()]))[0, 1]
        assert c > 0.95
        # and not merely alike overall: each pooled image is nearest to its own digit
        nearest = torch.cdist(pooled[:200], little[:200].flatten(1)).argmin(1)
        assert (nearest == torch.arange(200)).float().mean() > 0.95
    # the noise is there: neighbouring pixels of the smooth upsampling differ by more
    assert (d.x_train[..., 1:] - d.x_train[..., :-1]).std() > 0.3
