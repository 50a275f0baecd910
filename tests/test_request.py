"""From flags to a sweep: flag over preset over default, what --resume accepts, --verify,
--threads and --device resolution."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from bknbench.config import DEFAULT_BATCH_SIZES, RunConfig
from bknbench.errors import ConfigError
from bknbench.presets import PRESETS
from bknbench.request import DEFAULT_NORMS, RunRequest, build_sweep
from bknbench.sweep.plan import sweep_to_dict
from bknbench.sweep.store import Store

sys.path.insert(0, str(Path(__file__).parent / "data"))
from cifar_fixture import write_fixture  # noqa: E402

DEFAULTS = RunConfig(spec="")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A fake CIFAR-10 with 130 training images: room for the preset's SGD batch of 128."""
    root = tmp_path_factory.mktemp("cifar")
    write_fixture(root, "cifar10", n_train_per_batch=26, n_test=4)
    return str(root)


def test_flag_over_preset_over_default(cifar_dir):
    preset = PRESETS["paper-cifar10"]
    sweep, _ = build_sweep(RunRequest(preset="paper-cifar10", run={
        "epochs": 2, "momentum": 0.5, "data_dir": cifar_dir, "device": "cpu"}))
    base = sweep.base
    assert (base.epochs, base.momentum) == (2, 0.5)  # flags, over the preset's 400 and 0.9
    for name, value in preset.run.items():  # the preset, over RunConfig's defaults
        if name not in ("epochs", "momentum"):
            assert getattr(base, name) == value, name
    assert base.model == "resnet32:padding=tf" and base.base_lr == 0.1 != DEFAULTS.base_lr
    assert base.eval_batch == DEFAULTS.eval_batch and base.amp == DEFAULTS.amp  # neither
    assert (sweep.specs, sweep.batch_sizes, sweep.accumulate_to) == (
        preset.specs, preset.batch_sizes, preset.accumulate_to)
    assert sweep.seeds == (0,)
    # the sweep's own flags over the preset's
    sweep, _ = build_sweep(RunRequest(preset="paper-cifar10", norms="gn", batch_sizes="4,8",
                                      accumulate_to=32, seeds="3,4",
                                      run={"data_dir": cifar_dir, "device": "cpu"}))
    assert (sweep.specs, sweep.batch_sizes, sweep.accumulate_to, sweep.seeds) == (
        ("gn",), (4, 8), 32, (3, 4))


def test_without_preset_or_flags_the_defaults():
    sweep, out = build_sweep(RunRequest(run={"dataset": "synthetic"}))
    assert sweep.specs == tuple(DEFAULT_NORMS.split(",")) and sweep.seeds == (0,)
    assert sweep.batch_sizes == DEFAULT_BATCH_SIZES and sweep.accumulate_to is None
    # --device auto, resolved (RunConfig's own default is cpu)
    assert sweep.base.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert out.parent.name == "results"


def started(folder, **run) -> None:
    sweep, _ = build_sweep(RunRequest(norms="gn", batch_sizes="16",
                                      run={"dataset": "synthetic", "epochs": 1, **run}))
    Store(folder).save_sweep(sweep_to_dict(sweep))


@pytest.mark.parametrize("req, words", [
    (dict(run={"epochs": 5}, norms="bn"), "--norms, --epochs would change it"),
    (dict(seeds="0,1"), "--seeds would change it"),
    (dict(preset="paper-cifar10"), "--preset would change it"),
    (dict(run={"base_lr": 0.1, "device": "cpu", "threads": 2}),
     "--lr, --device, --threads would change it"),
    (dict(accumulate_to=64, batch_sizes="2"), "--batch-sizes, --accumulate-to would"),
])
def test_resume_rejects_what_would_change_the_sweep(tmp_path, req, words):
    started(tmp_path)
    with pytest.raises(ConfigError, match=f"--resume continues the sweep saved in {tmp_path}"
                                          f"/sweep.json as it was; {words}"):
        build_sweep(RunRequest(resume=tmp_path, **req))
    sweep, out = build_sweep(RunRequest(resume=tmp_path, out=tmp_path))  # alone: fine
    assert sweep.specs == ("gn",) and sweep.base.epochs == 1 and out == tmp_path


def test_verify_needs_a_cifar_dataset_and_its_folder(tmp_path):
    with pytest.raises(ConfigError, match="^--verify needs --data-dir: the folder that holds "
                                          "the cifar10 files to check$"):
        build_sweep(RunRequest(run={"dataset": "cifar10"}, verify=True))
    with pytest.raises(ConfigError, match="--dataset synthetic has none to check"):
        build_sweep(RunRequest(run={"dataset": "synthetic"}, verify=True))
    write_fixture(tmp_path, "cifar10", 2, 2)  # loads, but is not the original archive
    with pytest.raises(ConfigError, match="data_batch_1 has MD5 .* expected c99cafc"):
        build_sweep(RunRequest(run={"dataset": "cifar10", "data_dir": str(tmp_path)},
                               verify=True))
    # on resume, the files of the sweep saved in the folder are checked
    sweep, _ = build_sweep(RunRequest(norms="gn", batch_sizes="2", run={
        "dataset": "cifar10", "data_dir": str(tmp_path), "epochs": 1, "val_fraction": 0}))
    Store(tmp_path / "out").root.mkdir()
    Store(tmp_path / "out").save_sweep(sweep_to_dict(sweep))
    with pytest.raises(ConfigError, match="data_batch_1 has MD5"):
        build_sweep(RunRequest(resume=tmp_path / "out", verify=True))
    assert build_sweep(RunRequest(resume=tmp_path / "out"))[0] == sweep


def test_threads_one_with_deterministic_is_the_default_spelled_out():
    def base(**run):
        return build_sweep(RunRequest(norms="gn", run={"dataset": "synthetic", **run}))[0].base

    assert base(deterministic=True, threads=1) == base(deterministic=True)
    assert base(deterministic=True).threads is None
    assert base(threads=1).threads == 1 and base(threads=1).run_id != base().run_id
    with pytest.raises(ConfigError, match="--threads must be at least 1, got 0"):
        base(threads=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the driver must lack a GPU")
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_a_driver_without_a_gpu_sends_gpu_runs_to_ray_workers(device):
    """--executor ray --gpus-per-run > 0: the workers' GPUs, not the driver's, decide."""
    run = {"dataset": "synthetic", "device": device}
    sweep, _ = build_sweep(RunRequest(norms="gn", batch_sizes="16", run=run, remote_gpus=True))
    assert sweep.base.device == "cuda"
    local, _ = build_sweep(RunRequest(norms="gn", batch_sizes="16", run={**run, "device": "auto"}))
    assert local.base.device == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        build_sweep(RunRequest(norms="gn", batch_sizes="16", run={**run, "device": "cuda"}))


# ---------------------------------------------------------------- every message, in full
SYN = {"dataset": "synthetic", "device": "cpu", "val_fraction": 0.0}  # all 512 to train


@pytest.mark.parametrize("req, message", [
    (RunRequest(norms="gn", seeds="0,x", run=SYN), "--seeds: 'x' is not an integer"),
    (RunRequest(norms="gn", batch_sizes=" , ", run=SYN), "--batch-sizes: no value given"),
    (RunRequest(norms="gn", batch_sizes="4,2,4", run=SYN),
     "--batch-sizes: '4,2,4' repeats a value"),
    (RunRequest(resume=Path("a"), out=Path("b")),
     "give either --resume DIR or --out DIR, not two different folders"),
    (RunRequest(resume=Path("a"), norms="gn", seeds="1", run={"epochs": 2}),
     "--resume continues the sweep saved in a/sweep.json as it was; --norms, --seeds, "
     "--epochs would change it (start a new sweep with --out instead)"),
    (RunRequest(norms="gn", run={**SYN, "zeta": 1, "alpha": 2}),
     "unknown run setting(s): alpha, zeta"),
    (RunRequest(norms="gn,bn,gn", run=SYN), "--norms names the same spec twice"),
    (RunRequest(norms="gn", run={**SYN, "threads": 0}), "--threads must be at least 1, got 0"),
    (RunRequest(norms="gn", run={**SYN, "epochs": 0}), "--epochs must be positive, got 0"),
    (RunRequest(norms="gn", run={**SYN, "base_lr": 0.0}), "--lr must be positive, got 0.0"),
    (RunRequest(norms="gn", run={**SYN, "schedule": "linear"}),
     "--schedule must be cosine or step, got 'linear'"),
    (RunRequest(norms="gn", run={**SYN, "momentum": 1.0}),
     "--momentum must be in [0, 1), got 1.0"),
    (RunRequest(norms="gn", run={**SYN, "momentum": -0.1}),
     "--momentum must be in [0, 1), got -0.1"),
    (RunRequest(norms="gn", run={**SYN, "evals_per_epoch": -1}),
     "--evals-per-epoch must be >= 0, got -1"),
    (RunRequest(norms="gn", run={**SYN, "weight_decay": -1e-9}),
     "--weight-decay must be >= 0, got -1e-09"),
    (RunRequest(norms="gn", run={**SYN, "warmup_epochs": -1}),
     "--warmup-epochs must be >= 0, got -1"),
    (RunRequest(norms="gn", accumulate_to=0, run=SYN), "--accumulate-to must be positive, got 0"),
    (RunRequest(norms="gn", seeds="0,-1", run=SYN), "--seeds must be non-negative"),
    (RunRequest(norms="gn", batch_sizes="2,0", run=SYN),
     "--batch-sizes: 0 is not a positive batch size"),
    (RunRequest(norms="gn", batch_sizes="513", run=SYN),
     "batch 513 is larger than the 512 training samples of synthetic"),
    (RunRequest(norms="gn", run=SYN, verify=True),
     "--verify checks the files of cifar10, cifar100; --dataset synthetic has none to check"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_message_of_request(req, message):
    with pytest.raises(ConfigError) as e:
        build_sweep(req)
    assert str(e.value) == message


def test_the_edges_of_the_ranges_are_accepted():
    """Each bound above, on its allowed side: a threads, epochs, lr, seed and batch of the
    smallest allowed value; momentum, weight decay, warm-up and evals at 0; one SGD batch of
    all 512 training samples."""
    sweep, _ = build_sweep(RunRequest(
        norms="gn", seeds="0", batch_sizes="1,512", accumulate_to=None,
        run={**SYN, "threads": 1, "epochs": 1, "base_lr": 1e-12, "momentum": 0.0,
             "weight_decay": 0.0, "warmup_epochs": 0, "evals_per_epoch": 0}))
    assert sweep.batch_sizes == (1, 512) and sweep.base.momentum == 0.0
    # build_sweep resolves evals 0 ("auto") first; validate accepts it unresolved too
    from bknbench.config import SweepConfig
    from bknbench.request import validate

    validate(SweepConfig(specs=("gn",), batch_sizes=(4,), seeds=(0,),
                         base=RunConfig(spec="", dataset="synthetic", evals_per_epoch=0)))


def test_workloads_make_a_sweep_each(tmp_path):
    """--workloads: a sweep per workload in OUT/<name>, its dataset, model and epochs
    (--epochs overrides), lr tuned over its grid unless --tune or --lr says otherwise;
    --resume of the study folder resumes each."""
    from bknbench.presets import WORKLOADS
    from bknbench.request import build_study
    from bknbench.sweep.plan import sweep_to_dict
    from bknbench.sweep.store import Store

    req = RunRequest(workloads="mnist1d-mlp,digits-cnn", norms="gn", batch_sizes="8",
                     out=tmp_path, run={"epochs": 1})
    study = build_study(req)
    assert [out for _, out in study] == [tmp_path / "mnist1d-mlp", tmp_path / "digits-cnn"]
    for (sweep, _), name in zip(study, ("mnist1d-mlp", "digits-cnn")):
        w = WORKLOADS[name]
        assert (sweep.base.dataset, sweep.base.model) == (w.run["dataset"], w.run["model"])
        assert sweep.base.epochs == 1 and sweep.tune == (("lr", w.lr_grid),)
    [(sweep, _), _] = build_study(dataclasses.replace(req, tune=("lr=0.1,0.4",)))
    assert sweep.tune == (("lr", (0.1, 0.4)),)
    [(sweep, _), _] = build_study(dataclasses.replace(req, run={"base_lr": 0.1}))
    assert sweep.tune == () and sweep.base.base_lr == 0.1 and sweep.base.epochs == 6
    for sweep, out in study:  # as `bknbench run` leaves them when it starts
        out.mkdir()
        Store(out).save_sweep(sweep_to_dict(sweep))
    resumed = build_study(RunRequest(resume=tmp_path))
    assert [s for s, _ in resumed] == [s for s, _ in reversed(study)]  # in name order


def test_lists_skip_empty_pieces_and_the_default_folder_is_a_timestamp():
    import re

    from bknbench.request import int_list

    assert int_list(" 4, ,8,", "--seeds") == (4, 8)
    _, out = build_sweep(RunRequest(norms="gn", run=SYN))
    assert out.parent.name == "results" and re.fullmatch(r"\d{8}-\d{6}", out.name), out
