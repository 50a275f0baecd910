"""--diagnose in a run: it changes no number of training, bkn:p=0 is diagnosed as bn, a
resumed run keeps its rows, batch-independent normalizers are not applicable, and the
population model evaluates with exactly the population statistics."""
import dataclasses

import pytest
import torch

from bknbench.config import RunConfig
from bknbench.data.registry import load_dataset
from bknbench.diagnose import Diagnostics
from bknbench.diagnose.probes import norm_layers, probing
from bknbench.models import make_model
from bknbench.norms import parse_spec
from bknbench.sweep.run import make_row
from bknbench.train import train_run

TRAINING = ("epoch", "samples_seen", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic")


def _cfg(**kw):
    base = dict(spec="bkn", dataset="synthetic", model="mlp", norm_batch=4, sgd_batch=16,
                epochs=2, deterministic=True, diagnose=True)
    return RunConfig(**{**base, **kw})


def _training(out):
    return [[row[k] for k in TRAINING] for row in out.epochs]


@pytest.mark.parametrize("spec, model", [("bkn:transition=sampled", "mlp"), ("bn", "cnn"),
                                         ("bkn", "cnn")])
def test_diagnosing_changes_no_number_of_training(data, spec, model):
    """Bitwise the same epochs with and without --diagnose (a sampled transition draws from
    the RNG in the probes too: forked), and the same run id."""
    cfg = _cfg(spec=spec, model=model)
    plain = dataclasses.replace(cfg, diagnose=False)
    assert cfg.run_id == plain.run_id
    diagnosed, undiagnosed = train_run(cfg, data), train_run(plain, data)
    assert diagnosed.status == undiagnosed.status == "ok"
    assert _training(diagnosed) == _training(undiagnosed)
    assert diagnosed.stats and not undiagnosed.stats
    assert undiagnosed.val_acc_population is None
    assert 0.0 <= diagnosed.val_acc_population <= 100.0


def _by_key(out):
    return {(r["epoch"], r["layer"], r["metric"]): r["value"] for r in out.stats}


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_bkn_p0_is_diagnosed_as_bn(data, model):
    bn = _by_key(train_run(_cfg(spec="bn", model=model), data))
    bkn = _by_key(train_run(_cfg(spec="bkn:p=0", model=model), data))
    assert set(bn) < set(bkn)
    for key, value in bn.items():
        assert bkn[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
    extra = {m for _, layer, m in set(bkn) - set(bn) if layer > 0}
    assert extra == {f"{kind}_{pair}" for kind in ("mean_err", "logvar_err", "mean_bias",
                                                   "logvar_bias")
                     for pair in ("observed", "predicted")} | {
                         "var_ratio_median", "guard_rejected", "p_effective"}
    assert all(bkn[(e, l, "p_effective")] == 0.0 for e, l, m in bkn if m == "p_effective")


def test_rows_cover_every_layer_and_epoch(data):
    out = train_run(_cfg(epochs=3), data)
    layers = {(r["layer"], r["layer_name"]) for r in out.stats}
    assert layers == {(0, "2"), (1, "5"), (2, "8")}  # mlp: Flatten, [Linear, Norm, ReLU] x 3
    assert {r["epoch"] for r in out.stats} == {1, 2, 3}
    guard = [r for r in out.stats if r["metric"] == "guard_rejected"]
    assert {r["layer"] for r in guard} == {1, 2}  # the first layer has no prediction
    assert all(0.0 <= r["value"] <= 1.0 for r in guard)


def test_resumed_run_keeps_its_rows(data, tmp_path):
    cfg = _cfg(spec="bkn:transition=sampled", epochs=3)
    full = train_run(cfg, data)

    def interrupt(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, data, on_epoch=interrupt, checkpoint=tmp_path / "run.pt")
    resumed = train_run(cfg, data, checkpoint=tmp_path / "run.pt")
    assert resumed.stats == full.stats
    assert resumed.val_acc_population == full.val_acc_population


@pytest.mark.parametrize("spec", ["gn", "ln", "none", "gkn"])
def test_batch_independent_normalizers_are_not_applicable(data, spec):
    out = train_run(_cfg(spec=spec, epochs=1), data)
    assert out.status == "ok" and out.stats == [] and out.val_acc_population is None
    row = make_row(_cfg(spec=spec, epochs=1), out)
    assert row["final_val_acc_population"] is None and row["final_val_acc"] is not None


def test_population_model_evaluates_with_the_population_statistics(data):
    """In eval mode the copy computes on the probe set exactly what the population probe
    computes (a full-batch BatchNorm over that set, layer by layer); the model is untouched."""
    torch.manual_seed(0)
    model = make_model("cnn", parse_spec("bkn"), 4, data.sample_shape, data.num_classes)
    diag = Diagnostics(model, data.x_train, 4, 16)
    diag.epoch_rows(1)
    twin = diag.population_model().eval()
    layers = norm_layers(model)
    model.train()
    with torch.no_grad(), probing(layers, "population"):
        want = model(diag.x)
    with torch.no_grad():
        got = twin(diag.x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    running = [layer.running_var for _, layer in layers]
    assert all(torch.equal(v, torch.ones_like(v)) for v in running)  # model untouched
