"""Configuration: run ids, sweep expansion and the SGD-batch rule, spec strings and their
errors."""
import dataclasses

import pytest

from bknbench.errors import ConfigError
from bknbench.config import RunConfig, SweepConfig, run_id
from bknbench.norms.registry import parse_spec, split_specs


# ---------------------------------------------------------------- run ids
def test_run_id_is_stable_and_hex():
    a = RunConfig(spec="bkn:p=0.5", norm_batch=4, sgd_batch=4)
    b = RunConfig(spec="bkn:p=0.5", norm_batch=4, sgd_batch=4)
    assert a.run_id == b.run_id == run_id(a)
    assert len(a.run_id) == 12 and int(a.run_id, 16) >= 0
    assert RunConfig.from_dict(a.to_dict()) == a
    assert RunConfig.from_dict(a.to_dict()).run_id == a.run_id
    # unknown keys (e.g. result columns stored beside the config) are ignored
    assert RunConfig.from_dict({**a.to_dict(), "val_acc": 1.0}) == a


@pytest.mark.parametrize("change", [dict(spec="bn"), dict(seed=1), dict(norm_batch=8, sgd_batch=8),
                                    dict(sgd_batch=128), dict(base_lr=0.1), dict(epochs=7),
                                    dict(dataset="mnist1d"), dict(model="mlp"),
                                    dict(milestones=(3,)), dict(amp=True),
                                    dict(schedule="step")])
def test_run_id_changes_with_any_result_changing_field(change):
    a = RunConfig(spec="bkn")
    assert dataclasses.replace(a, **change).run_id != a.run_id


def test_run_id_ignores_eval_batch():
    a = RunConfig(spec="bkn")
    assert dataclasses.replace(a, eval_batch=17).run_id == a.run_id


def test_run_ids_of_earlier_versions_hold():
    """Ids computed by the release before `threads` existed (commit 809a45e): a folder it
    wrote resumes without rerunning its finished runs. threads enters the id when set."""
    a = RunConfig(spec="bkn", val_fraction=0)  # before the validation split: all of train
    b = RunConfig(spec="bn", dataset="synthetic", norm_batch=8, sgd_batch=8, deterministic=True,
                  val_fraction=0)
    assert (a.run_id, b.run_id) == ("8a24112b9d99", "f1535407c316")
    assert dataclasses.replace(a, val_fraction=0.1).run_id != a.run_id  # the default now
    assert dataclasses.replace(a, threads=2).run_id not in (a.run_id,
                                                            dataclasses.replace(a, threads=1).run_id)


def test_all_run_ids_of_a_sweep_are_distinct():
    runs = SweepConfig(specs=("bn", "bkn", "gn"), batch_sizes=(1, 2, 4), seeds=(0, 1)).expand()
    assert len({r.run_id for r in runs}) == len(runs) == 18


# ---------------------------------------------------------------- sweeps
def test_expand_counts_order_and_sgd_batch():
    base = RunConfig(spec="", dataset="synthetic", epochs=3)
    sweep = SweepConfig(specs=("bn", "bn-accum", "bkn"), batch_sizes=(1, 2, 4),
                        seeds=(0, 1), base=base)
    runs = sweep.expand()
    assert len(runs) == 3 * 3 * 2
    assert [(r.spec, r.norm_batch, r.seed) for r in runs[:4]] == [
        ("bn", 1, 0), ("bn", 1, 1), ("bn", 2, 0), ("bn", 2, 1)]
    assert all(r.dataset == "synthetic" and r.epochs == 3 for r in runs)
    for r in runs:
        expected = 128 if r.spec == "bn-accum" else r.norm_batch
        assert r.sgd_batch == expected, r


def test_accumulate_to_applies_to_every_spec():
    sweep = SweepConfig(specs=("bn", "bn-accum", "bkn"), batch_sizes=(1, 2, 8, 16),
                        accumulate_to=8)
    for r in sweep.expand():
        assert r.sgd_batch == max(8, r.norm_batch), r  # never below the micro-batch


def test_default_accumulate_to_is_configurable():
    sweep = SweepConfig(specs=("bn-accum",), batch_sizes=(2, 4), default_accumulate_to=32)
    assert [r.sgd_batch for r in sweep.expand()] == [32, 32]


def test_accumulate_to_not_a_multiple_is_a_config_error():
    sweep = SweepConfig(specs=("bn",), batch_sizes=(2, 8), accumulate_to=12)
    with pytest.raises(ConfigError, match="not a multiple of micro-batch 8"):
        sweep.expand()
    with pytest.raises(ConfigError, match="multiple"):
        SweepConfig(specs=("bn-accum",), batch_sizes=(3,)).expand()  # 128 % 3


def test_linear_scaling_rule_property():
    assert RunConfig(spec="bn", base_lr=0.2, sgd_batch=128).lr == pytest.approx(0.2)
    assert RunConfig(spec="bn", base_lr=0.2, sgd_batch=2).lr == pytest.approx(0.2 / 64)


# ---------------------------------------------------------------- spec strings
def test_split_specs_joins_option_pieces():
    assert split_specs("bn,bkn:p=0.5,transition=sampled,gn:groups=4") == [
        "bn", "bkn:p=0.5,transition=sampled", "gn:groups=4"]
    assert split_specs(" bn , gn ,") == ["bn", "gn"]
    assert split_specs("bkn:p=0.5:gain=adaptive") == ["bkn:p=0.5,gain=adaptive"]


def test_split_specs_errors():
    with pytest.raises(ConfigError, match="no normalizer"):
        split_specs(" , ")
    with pytest.raises(ConfigError, match="unknown normalizer 'bogus'"):
        split_specs("bn,bogus")


def test_parse_spec_defaults_and_values():
    s = parse_spec("bkn")
    assert s.text == "bkn" and s.name == "bkn"
    assert s.options["p"] == 0.9 and s.options["transition"] == "analytic"
    s = parse_spec("bkn:p=0.25,transition=sampled,draws=4")
    assert s.text == "bkn:p=0.25,transition=sampled,draws=4"
    assert s.options["p"] == 0.25 and isinstance(s.options["p"], float)
    assert s.options["draws"] == 4 and isinstance(s.options["draws"], int)
    layer = s.build(6, 2)
    assert (layer.p, layer.transition, layer.draws, layer.norm_batch) == (0.25, "sampled", 4, 2)
    assert parse_spec("gn:groups=4").build(12, 2).num_groups == 4


@pytest.mark.parametrize("text, message", [
    ("bogus", "unknown normalizer 'bogus'; known: "),
    ("bkn:q=1", "unknown option 'q' for bkn; options: "),
    ("bn:groups=2", "unknown option 'groups' for bn"),
    ("none:eps=1", "options: none"),
    ("bkn:p=2", "p=2: must be in [0, 1]"),
    ("bkn:p=-0.1", "must be in [0, 1]"),
    ("bkn:p=abc", "p=abc: expected float"),
    ("bkn:gain=foo", "gain=foo: expected one of fixed, learnable, adaptive"),
    ("bkn:transition=exact", "expected one of analytic, sampled"),
    ("bkn:draws=1.5", "draws=1.5: expected int"),
    ("gn:groups=0", "must be >= 1"),
    ("bn:momentum=0", "must be in (0, 1]"),
    ("bn:eps=-1", "must be > 0"),
    ("bkn:p", "expected key=value"),
])
def test_parse_spec_errors_are_helpful(text, message):
    with pytest.raises(ConfigError) as e:
        parse_spec(text)
    assert message in str(e.value)
    if text == "bogus":  # the message lists what is allowed
        assert "bkn" in str(e.value) and "bn" in str(e.value) and "gn" in str(e.value)
    if text == "bkn:q=1":
        assert "p" in str(e.value).split("options:")[1]


def test_cudnn_benchmark_enters_the_run_id_only_when_set():
    """A run with it is another run; without it, the id of before the option existed."""
    off = RunConfig(spec="bkn", val_fraction=0)
    assert off.run_id == "8a24112b9d99"  # as in test_run_ids_of_earlier_versions_hold
    assert dataclasses.replace(off, cudnn_benchmark=True).run_id != off.run_id
