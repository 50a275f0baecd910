"""--dataset npz:PATH: a user's arrays train like a built-in dataset; every defect of the
file is exit status 2 with one line naming it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.data import load_dataset

runner = CliRunner()


def arrays(shape=(2, 8), n=64, k=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    y_train, y_test = rng.integers(0, k, n), rng.integers(0, k, n // 2)
    x_train = rng.normal(size=(n, *shape)) + y_train.reshape(-1, *[1] * len(shape))
    x_test = rng.normal(size=(n // 2, *shape)) + y_test.reshape(-1, *[1] * len(shape))
    return dict(x_train=x_train.astype(np.float32), y_train=y_train,
                x_test=x_test.astype(np.float32), y_test=y_test)


def saved(tmp_path, data: dict) -> str:
    np.savez(tmp_path / "d.npz", **data)
    return str(tmp_path / "d.npz")


@pytest.mark.parametrize("shape", [(3,), (2, 8), (1, 4, 4)], ids=["NC", "NCL", "NCHW"])
def test_a_users_file_loads_standardized(tmp_path, shape):
    path = saved(tmp_path, arrays(shape))
    data = load_dataset(f"npz:{path}")
    assert data.x_train.shape[1:] == shape and data.num_classes == 3
    assert len(data.x_train) + len(data.x_val) == 64  # the validation split carved from train
    assert data.image == (len(shape) == 3)
    assert abs(float(data.x_train.mean())) < 1e-5
    whole = load_dataset(f"npz:{path}", val_fraction=0)
    assert whole.x_train.shape == (64, *shape) and whole.x_val is None


def test_a_users_validation_split_is_kept(tmp_path):
    """x_val, y_val in the file: the validation split as given, none carved from train."""
    data = arrays()
    data["x_val"], data["y_val"] = data["x_test"][:10] + 100.0, data["y_test"][:10]
    loaded = load_dataset(f"npz:{saved(tmp_path, data)}")
    assert len(loaded.x_train) == 64 and len(loaded.x_val) == 10
    assert loaded.y_val.tolist() == data["y_val"].tolist()
    assert float(loaded.x_val.mean()) > 10  # standardized with train's statistics, not its own


def test_a_users_file_trains(tmp_path):
    path = saved(tmp_path, arrays())
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--dataset", f"npz:{path}", "--norms", "bn,gn",
                                 "--batch-sizes", "8", "--epochs", "2", "--workers", "1",
                                 "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",ok," in r for r in rows[1:])
    assert f"npz:{path}" in rows[1]


def defect(name: str, data: dict) -> dict:
    if name == "missing key":
        del data["y_test"]
    elif name == "lengths":
        data["y_train"] = data["y_train"][:-1]
    elif name == "non-finite":
        data["x_test"][3, 0, 0] = np.nan
    elif name == "labels out of range":
        data["y_test"][0] = 7
    elif name == "negative label":
        data["y_train"][0] = -1
    elif name == "float labels":
        data["y_train"] = data["y_train"].astype(np.float32)
    elif name == "one class":
        data["y_train"][:] = 0
        data["y_test"][:] = 0
    elif name == "bad shape":
        data["x_train"] = data["x_train"][:, :, :, None, None]
    elif name == "sample shapes":
        data["x_test"] = data["x_test"][:, :, :4]
    elif name == "val alone":
        data["x_val"] = data["x_test"]
    elif name == "objects":
        data["y_test"] = np.array([object()] * len(data["y_test"]))
    return data


@pytest.mark.parametrize("name, words", [
    ("missing key", ["no y_test array", "x_train"]),
    ("lengths", ["x_train has 64 samples, y_train 63 labels"]),
    ("non-finite", ["x_test has 1 non-finite value"]),
    ("labels out of range", ["y_test has labels outside 0..2", "max 7"]),
    ("negative label", ["y_train has labels outside", "min -1"]),
    ("float labels", ["y_train must be a 1-d array of integer labels", "float32"]),
    ("one class", ["fewer than 2 classes"]),
    ("bad shape", ["x_train has shape (64, 2, 8, 1, 1)"]),
    ("sample shapes", ["x_test samples are (2, 4), x_train's (2, 8)"]),
    ("val alone", ["x_val and y_val come together"]),
    ("objects", ["not a readable NumPy .npz file", "allow_pickle"]),
    ("not npz", ["not an .npz archive (np.savez writes a zip file)"]),
    ("cut short", ["not a readable NumPy .npz file", "BadZipFile"]),
    ("npy", ["not an .npz archive"]),
    ("no file", ["no such file"]),
])
def test_every_defect_is_one_line_exit_2(tmp_path, name, words):
    if name == "not npz":
        path = tmp_path / "d.npz"
        path.write_text("x_train,y_train\n1,2\n")
    elif name == "cut short":
        path = tmp_path / "d.npz"
        path.write_bytes(Path(saved(tmp_path, arrays())).read_bytes()[:300])
    elif name == "npy":
        path = tmp_path / "d.npy"
        np.save(path, np.zeros(3))
    elif name == "no file":
        path = tmp_path / "absent.npz"
    else:
        path = saved(tmp_path, defect(name, arrays()))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--dataset", f"npz:{path}", "--norms", "gn",
                                 "--batch-sizes", "8", "--epochs", "1", "--workers", "1",
                                 "-q", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: npz:{path}"), lines
    assert all(w in lines[0] for w in words), lines[0]
    assert not (out / "runs.csv").exists()
