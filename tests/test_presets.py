"""The paper presets: valid RunConfig fields, the authors' values, every value sourced."""
import dataclasses

import pytest

import bknbench.models.resnet
from bknbench.errors import ConfigError
from bknbench.config import RunConfig
from bknbench.models.registry import parse_model
from bknbench.norms.registry import parse_spec
from bknbench.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", ["paper-cifar10", "paper-cifar100"])
def test_paper_presets(name):
    p = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(p.run) <= fields
    assert parse_model(p.run["model"]) == ("resnet32", {"padding": "tf"})  # the authors' SAME
    assert p.run["dataset"] == name.split("-")[1]
    assert all(parse_spec(s).text == s for s in p.specs)  # canonical spec strings
    for key in list(p.run) + ["batch_sizes", "accumulate_to", "specs"]:
        assert p.provenance.get(key), f"{key} has no provenance"
    runs = p.sweep(seeds=(0, 1), data_dir="/data").expand()
    assert len(runs) == len(p.specs) * len(p.batch_sizes) * 2
    r = runs[0]
    # the authors' micro-batch recipe: 128 per step in groups of 2, lr 0.1, 400 epochs
    assert (r.norm_batch, r.sgd_batch, r.lr) == (2, 128, 0.1)
    assert (r.epochs, r.momentum, r.weight_decay, r.schedule) == (400, 0.9, 2e-4, "step")
    assert r.milestones == (81, 122, 299) and r.augment and r.data_dir == "/data"
    assert "bkn-authors" in p.specs and "bkn" in p.specs  # theirs, and ours


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'x'; known: paper-cifar10"):
        get_preset("x")
