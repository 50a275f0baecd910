"""One training run on the tiny synthetic dataset: it learns, it resumes from a checkpoint
bit for bit, bad runs become statuses, and the learning-rate schedule and scaling rule."""
import dataclasses

import pytest
import torch

from bknbench.errors import ConfigError
from bknbench.config import RunConfig
from bknbench.data.registry import load_dataset
from bknbench.models.registry import make_model
from bknbench.norms.registry import parse_spec
from bknbench.train import eval_steps, lr_factor, make_optimizer, train_run



METRICS = ("epoch", "step", "samples_seen", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


@pytest.fixture(scope="module")
def data():
    """synthetic's 512 training samples whole, its 256 test samples as the validation split
    as well (the counts below are of these)."""
    whole = load_dataset("synthetic", val_fraction=0)
    return dataclasses.replace(whole, x_val=whole.x_test, y_val=whole.y_test)


def _cfg(**kw):
    base = dict(spec="bn", dataset="synthetic", model="mlp", norm_batch=32, sgd_batch=32,
                epochs=2, base_lr=0.2, evals_per_epoch=1)
    base.update(kw)
    return RunConfig(**base)


def test_bn_learns_synthetic(data):
    cfg = _cfg()
    rows = []
    out = train_run(cfg, data, on_epoch=rows.append)
    assert out.status == "ok" and out.reason == ""
    assert len(out.epochs) == 2 and rows == out.epochs
    assert [r["epoch"] for r in out.epochs] == [1, 2]
    assert [r["samples_seen"] for r in out.epochs] == [512, 1024]  # 16 steps of 32
    assert out.samples == 1024
    # ~99% after one epoch on this machine; 90% leaves a wide margin
    assert out.epochs[-1]["val_acc"] >= 90.0
    assert out.epochs[-1]["train_loss"] < out.epochs[0]["train_loss"]
    # the logged lr is the schedule after each epoch's steps: cosine(16 / 32), then 0
    assert out.epochs[0]["lr"] == pytest.approx(cfg.lr * 0.5, rel=1e-9)
    assert out.epochs[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_bkn_learns_synthetic_at_micro_batch(data):
    out = train_run(_cfg(spec="bkn", norm_batch=4, sgd_batch=4, epochs=1), data)
    assert out.status == "ok"
    assert out.epochs[-1]["val_acc"] >= 80.0  # ~97% observed


@pytest.mark.parametrize("spec", ["bn", "bkn", "bn-accum"])
def test_amp_trains_on_cpu(data, spec):
    """--amp (bf16 autocast) on the CPU: the PyTorch nodes serve the bf16 activations (the
    C++ kernels take float32/64 only), and the run learns."""
    out = train_run(_cfg(spec=spec, model="cnn", amp=True, norm_batch=8, sgd_batch=8 if
                         spec != "bn-accum" else 32, epochs=1), data)
    assert out.status == "ok", out.reason
    assert out.epochs[-1]["val_acc"] >= 60.0


def test_same_config_same_numbers(data):
    a = train_run(_cfg(epochs=1), data)
    b = train_run(_cfg(epochs=1), data)
    assert [[r[k] for k in METRICS] for r in a.epochs] == [[r[k] for k in METRICS]
                                                           for r in b.epochs]


@pytest.mark.parametrize("stop_at", [2, 3])
def test_checkpoint_resume_is_exact(data, tmp_path, stop_at):
    """Interrupt a 3-epoch run (KeyboardInterrupt from the epoch callback of epoch
    `stop_at`), call train_run again with the same checkpoint: every metric equals the
    uninterrupted run's. A sampled transition makes the global torch RNG matter too."""
    cfg = _cfg(spec="bkn:transition=sampled", norm_batch=8, sgd_batch=16, epochs=3,
               evals_per_epoch=3)
    full = train_run(cfg, data)
    assert full.status == "ok"

    ckpt = tmp_path / "run.pt"

    def interrupt(row):
        if row["epoch"] == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, data, on_epoch=interrupt, checkpoint=ckpt)
    assert ckpt.exists()
    # the callback runs before the epoch's checkpoint is written: resume from stop_at - 1
    assert torch.load(ckpt, weights_only=True)["epoch"] == stop_at - 1
    resumed = train_run(cfg, data, checkpoint=ckpt)
    assert resumed.status == "ok"
    assert len(resumed.epochs) == 3 * 3  # three evaluations per epoch
    for a, b in zip(full.epochs, resumed.epochs):
        assert [a[k] for k in METRICS] == [b[k] for k in METRICS]
    assert resumed.samples == full.samples


# ---------------------------------------------------------------- evaluation schedule
def test_eval_steps_are_evenly_spaced_and_end_the_epoch():
    assert eval_steps(10, 1) == [10]
    assert eval_steps(10, 4) == [2, 5, 8, 10]
    assert eval_steps(16, 4) == [4, 8, 12, 16]
    assert eval_steps(3, 7) == [1, 2, 3]  # at most one evaluation per step
    assert eval_steps(1347, 7)[-1] == 1347 and len(eval_steps(1347, 7)) == 7


def test_default_gives_at_least_20_evaluations():
    for epochs in (1, 2, 3, 7, 10, 15, 20, 400):
        cfg = RunConfig(spec="bn", epochs=epochs)
        assert cfg.evals * epochs >= 20 and (cfg.evals - 1) * epochs < 20
    assert RunConfig(spec="bn", epochs=3, evals_per_epoch=2).evals == 2
    # K cannot change a result, so it is not part of the run id
    assert RunConfig(spec="bn", evals_per_epoch=5).run_id == RunConfig(spec="bn").run_id


@pytest.mark.parametrize("spec", ["bn", "bn-accum", "bkn:transition=sampled"])
def test_evaluations_change_nothing_but_the_rows(data, spec):
    """K = 4 evaluations per epoch against K = 1, deterministic: the end-of-epoch rows are
    identical (a sampled transition draws from the global RNG, which evaluation must not
    touch), and the extra rows sit at evenly spaced steps with their samples counted."""
    kw = dict(spec=spec, norm_batch=8, sgd_batch=16, epochs=2, deterministic=True)
    one = train_run(_cfg(evals_per_epoch=1, **kw), data)
    four = train_run(_cfg(evals_per_epoch=4, **kw), data)
    assert one.status == four.status == "ok"
    assert [r["step"] for r in one.epochs] == [32, 64]  # 512 samples / 16 per step
    assert [r["step"] for r in four.epochs] == [8, 16, 24, 32, 40, 48, 56, 64]
    assert [r["samples_seen"] for r in four.epochs] == [16 * r["step"] for r in four.epochs]
    assert [r["epoch"] for r in four.epochs] == [1, 1, 1, 1, 2, 2, 2, 2]
    ends = [four.epochs[3], four.epochs[7]]
    for a, b in zip(one.epochs, ends):
        assert [a[k] for k in METRICS] == [b[k] for k in METRICS]
    assert one.samples == four.samples == 1024
    assert one.val_samples == four.val_samples == 256
    # each row is an evaluation of its own (a model that is still changing), not a copy
    assert len({r["val_loss"] for r in four.epochs}) == 8
    assert four.epochs[0]["train_loss"] > four.epochs[3]["train_loss"]


def test_test_split_once_after_the_last_epoch(data, monkeypatch):
    """The curves are on the validation split; the test split is evaluated once, after the
    last epoch; without a validation split the curves are empty, the test accuracy not."""
    import bknbench.train

    real, seen = bknbench.train.evaluate, []
    monkeypatch.setattr(bknbench.train, "evaluate",
                        lambda model, x, y, batch: seen.append(len(x)) or real(model, x, y, batch))
    split = dataclasses.replace(data, x_val=data.x_train[:100], y_val=data.y_train[:100])
    out = train_run(_cfg(evals_per_epoch=2), split)
    assert seen == [100] * 4 + [256]  # 2 epochs x 2 on validation, then test once
    assert (out.val_samples, out.test_samples) == (100, 256) and 0 <= out.test_acc <= 100
    seen.clear()
    none = dataclasses.replace(data, x_val=None, y_val=None)
    out = train_run(_cfg(), none)
    assert seen == [256] and out.val_samples is None
    assert all(r["val_acc"] is None for r in out.epochs) and out.test_acc is not None
    from bknbench.sweep.run import make_row

    row = make_row(_cfg(), out)
    assert row["final_val_acc"] is None and row["best_val_acc"] is None
    assert row["final_test_acc"] == out.test_acc


def test_undefined_configuration_fails_with_a_reason(data):
    out = train_run(_cfg(norm_batch=1, sgd_batch=1, epochs=1), data)
    assert out.status == "failed"
    assert "undefined" in out.reason
    assert out.epochs == []


def test_out_of_memory_is_a_status(data, monkeypatch):
    """An OutOfMemoryError in a step (simulated: the third loss) ends the run as `oom`
    with the error's first line; execute_run records it, so the sweep goes on."""
    import bknbench.train
    from bknbench.sweep.run import execute_run

    real, calls = bknbench.train.F.cross_entropy, []

    def cross_entropy(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\n"
                                         "(GPU 0; 79.3 GiB total)")
        return real(*args, **kw)

    monkeypatch.setattr(bknbench.train.F, "cross_entropy", cross_entropy)
    out = train_run(_cfg(), data)
    assert (out.status, out.reason) == ("oom", "CUDA out of memory. Tried to allocate 20.00 GiB")
    assert out.epochs == [] and len(calls) == 3
    calls.clear()
    row = execute_run(_cfg(seed=1))["row"]
    assert row["status"] == "oom" and row["reason"].startswith("CUDA out of memory")
    assert row["final_val_acc"] is None


@pytest.mark.parametrize("spec", ["bn", "bkn"])
def test_chunked_evaluation_equals_one_pass(data, spec):
    """eval_batch splits evaluation (eval mode: samples are independent), so it is left out
    of the run id; the numbers agree whether the 256 test samples go in 1 or 37 pieces."""
    one = train_run(_cfg(spec=spec, norm_batch=16, sgd_batch=16, epochs=1), data)
    chunked = train_run(_cfg(spec=spec, norm_batch=16, sgd_batch=16, epochs=1, eval_batch=7),
                        data)
    assert len(data.x_test) // 7 + 1 == 37 and len(data.x_test) % 7
    [a], [b] = one.epochs, chunked.epochs
    assert a["val_acc"] == b["val_acc"] and a["train_loss"] == b["train_loss"]
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)


def test_augment_crops_and_flips_every_training_batch_of_images(data, monkeypatch):
    """--augment: crop_flip on every training micro-step of an image dataset, on the batch
    only; a 1-D dataset trains as without it."""
    import bknbench.data.augment as augment

    seen = []

    def counting(x, *args, **kw):
        seen.append(tuple(x.shape))
        return augment_real(x, *args, **kw)

    augment_real = augment.crop_flip
    monkeypatch.setattr(augment, "crop_flip", counting)
    digits = load_dataset("digits")
    cfg = _cfg(dataset="digits", model="cnn", norm_batch=64, sgd_batch=64, epochs=1)
    plain = train_run(cfg, digits)
    assert seen == []
    augmented = train_run(dataclasses.replace(cfg, augment=True), digits)
    steps = len(digits.x_train) // 64
    assert seen == [(64, *digits.sample_shape)] * steps
    assert augmented.epochs[0]["train_loss"] != plain.epochs[0]["train_loss"]
    seen.clear()
    synthetic = data
    assert not synthetic.image
    flat = train_run(_cfg(epochs=1, augment=True), synthetic)
    without = train_run(_cfg(epochs=1), synthetic)
    assert seen == []
    assert [[e[k] for k in METRICS] for e in flat.epochs] == [[e[k] for k in METRICS]
                                                               for e in without.epochs]


def test_huge_learning_rate_diverges(data):
    out = train_run(_cfg(base_lr=1e6, epochs=2), data)
    assert out.status == "diverged"
    assert "epoch 1" in out.reason
    assert out.epochs == []


# ---------------------------------------------------------------- schedule and lr
def test_cosine_schedule():
    f = lr_factor(RunConfig(spec="bn", epochs=10), steps_per_epoch=5)
    values = [f(t) for t in range(50)]
    assert values[0] == 1.0
    assert values[-1] < 0.005
    assert f(50) == pytest.approx(0.0, abs=1e-15)
    assert f(25) == pytest.approx(0.5, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_then_cosine():
    f = lr_factor(RunConfig(spec="bn", epochs=10, warmup_epochs=1.0), steps_per_epoch=5)
    assert [f(t) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(5) == 1.0
    assert f(5 + 45 // 2) < 0.55


def test_step_schedule_divides_by_ten_at_milestones():
    cfg = RunConfig(spec="bn", epochs=10, schedule="step", milestones=(3, 6))
    f = lr_factor(cfg, steps_per_epoch=5)
    assert f(0) == 1.0 and f(14) == 1.0
    assert f(15) == pytest.approx(0.1) and f(29) == pytest.approx(0.1)
    assert f(30) == pytest.approx(0.01) and f(49) == pytest.approx(0.01)


@pytest.mark.parametrize("base_lr, sgd_batch, lr", [(0.2, 128, 0.2), (0.2, 32, 0.05),
                                                     (0.1, 2, 0.1 / 64), (0.4, 256, 0.8)])

def test_linear_scaling_rule(base_lr, sgd_batch, lr):
    cfg = RunConfig(spec="bn", base_lr=base_lr, sgd_batch=sgd_batch)
    assert cfg.lr == pytest.approx(lr, rel=1e-12)
    model = make_model("mlp", parse_spec("bkn:gain=learnable"), 2, (1, 16), 4)
    opt = make_optimizer(model, cfg)
    assert all(g["lr"] == pytest.approx(lr, rel=1e-12) for g in opt.param_groups)
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and rest["weight_decay"] == 0.0
    # decayed: the weight matrices of the linear layers, told apart by layer type (not by
    # shape, as the optimizer does); not: norm affine parameters, biases, BKN's gains
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.modules() if type(m).__module__.startswith("bknbench.norms")]
    assert len(linear) == 4 and len(norms) == 3
    assert {id(p) for p in decay["params"]} == {id(m.weight) for m in linear}
    assert {id(p) for p in rest["params"]} == {id(m.bias) for m in linear if m.bias is not None} | {
        id(p) for m in norms for p in m.parameters()}
    assert any(p.ndim == 0 for p in rest["params"])  # the gains


# ---------------------------------------------------------------- inconsistent batches
# A RunConfig built directly or read back with from_dict (a hand-edited sweep.json) must
# not exist with statistics that disagree with its recorded norm_batch: it cannot be made,
# so it never trains.
@pytest.mark.parametrize("norm_batch, sgd_batch", [(8, 4), (4, 6), (0, 4)])
def test_sgd_batch_not_a_multiple_of_norm_batch_is_a_config_error(norm_batch, sgd_batch):
    message = (f"SGD batch {sgd_batch} must be a positive multiple of the micro-batch "
               rf"\(norm_batch\) {norm_batch}")
    with pytest.raises(ConfigError, match=message):
        _cfg(norm_batch=norm_batch, sgd_batch=sgd_batch)
    good = _cfg(norm_batch=4, sgd_batch=8).to_dict()
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({**good, "norm_batch": norm_batch, "sgd_batch": sgd_batch})


def test_csv_metrics_with_accumulation_against_a_hand_count(tmp_path):
    """gn (batch-independent: train mode is eval mode) at micro-batch 8 accumulated to SGD
    batches of 32, lr 1e-30 (the weights stay where the seed put them), a validation split
    of a quarter: the written train_acc, train_loss, val_acc and test accuracy are counts of
    the initial model's predictions over the 384 training samples (12 whole steps), the 128
    validation samples and the 256 test samples."""
    import csv

    import torch.nn.functional as F
    from typer.testing import CliRunner

    from bknbench.cli import app

    result = CliRunner().invoke(app, [
        "run", "--dataset", "synthetic", "--model", "mlp", "--norms", "gn", "--batch-sizes",
        "8", "--accumulate-to", "32", "--seeds", "3", "--epochs", "1", "--evals-per-epoch",
        "1", "--lr", "1e-30", "--momentum", "0", "--weight-decay", "0", "--warmup-epochs",
        "0", "--val-fraction", "0.25", "--workers", "1", "--device", "cpu", "--quiet",
        "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "metrics.csv", newline="") as f:
        [metrics] = list(csv.DictReader(f))
    with open(tmp_path / "runs.csv", newline="") as f:
        [run] = list(csv.DictReader(f))
    data = load_dataset("synthetic", val_fraction=0.25)
    torch.manual_seed(3)
    model = make_model("mlp", parse_spec("gn"), 8, data.sample_shape, data.num_classes).eval()
    with torch.no_grad():
        logits = {s: model(getattr(data, f"x_{s}")) for s in ("train", "val", "test")}
    hits = {s: int((logits[s].argmax(1) == getattr(data, f"y_{s}")).sum()) for s in logits}
    assert {s: len(getattr(data, f"x_{s}")) for s in logits} == {"train": 384, "val": 128,
                                                                  "test": 256}
    assert 0 < hits["train"] < 384
    assert (run["norm_batch"], run["sgd_batch"], metrics["samples_seen"]) == ("8", "32", "384")
    assert float(metrics["train_acc"]) == pytest.approx(100 * hits["train"] / 384, abs=1e-9)
    assert float(metrics["val_acc"]) == pytest.approx(100 * hits["val"] / 128, abs=1e-9)
    assert float(run["final_val_acc"]) == pytest.approx(100 * hits["val"] / 128, abs=1e-9)
    assert float(run["final_test_acc"]) == pytest.approx(100 * hits["test"] / 256, abs=1e-9)
    # equal steps: the mean of the 12 step losses is the mean over the 384 samples
    loss = float(F.cross_entropy(logits["train"], data.y_train))
    assert float(metrics["train_loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(run["final_train_loss"]) == pytest.approx(loss, rel=1e-5)
