"""The diagnostics protocol (bknbench/norms/probe.py), for every batch-dependent normalizer of
the registry: a probed forward changes nothing, computes what training computes, and the
population hooks agree with each other."""
import copy

import pytest
import torch
import torch.nn.functional as F

from bknbench.norms.probe import Probe
from bknbench.norms.registry import REGISTRY, parse_spec

C = 6
SHAPES = [(8, C), (8, C, 5), (8, C, 3, 4)]


def _layer(name, norm_batch=2):
    return parse_spec(name).build(C, norm_batch).double()


def batch_dependent() -> list[str]:
    return [n for n in sorted(REGISTRY) if getattr(_layer(n), "batch_dependent", False)]


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.7


def _warm(layer, shape):
    layer.train()
    with torch.no_grad():
        for i in range(3):
            layer(_data(shape, seed=10 + i))


def _state(layer) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_the_batch_dependent_ones():
    names = batch_dependent()
    assert {"bn", "bn-accum", "bkn", "brn", "mabn", "cbn", "evonorm-b0"} <= set(names)
    assert not {"gn", "ln", "none", "gkn", "frn", "evonorm-s0", "ws-gn"} & set(names)


def test_probe_modes():
    with pytest.raises(ValueError, match="probe mode"):
        Probe("eval")


@pytest.mark.parametrize("name", batch_dependent())
@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCL", "NCHW"])
def test_train_probe_has_no_side_effect_and_equals_training(name, shape):
    layer = _layer(name)
    _warm(layer, shape)
    twin = copy.deepcopy(layer)
    before = _state(layer)
    x = _data(shape, seed=1)
    layer.probe = Probe("train")
    with torch.random.fork_rng():
        y = layer(x)
    stats = layer.probe.stats
    layer.probe = None
    with torch.random.fork_rng():
        expected = twin(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    after = _state(layer)
    for key in before:
        assert torch.equal(before[key], after[key]), f"{name}: {key} changed"
    mean, var = stats["used"]
    assert mean.shape == var.shape == (len(x) // 2, C)


@pytest.mark.parametrize("name", batch_dependent())
@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCL", "NCHW"])
def test_population_probe_is_eval_with_the_batch_as_population(name, shape):
    """The population probe records the whole batch's mean and biased variance and
    normalizes as eval would after set_population with them: for BN-like layers a
    full-batch BatchNorm (checked below), for MABN x / sqrt(var + mean^2 + eps)."""
    layer = _layer(name)
    _warm(layer, shape)
    before = _state(layer)
    x = _data(shape, seed=2)
    layer.probe = Probe("population")
    y = layer(x)
    mean, var = layer.probe.stats["input"]
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean[0], x.mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var[0], x.var(dims, correction=0), rtol=1e-12, atol=1e-12)
    twin = copy.deepcopy(layer)
    twin.probe = None
    twin.set_population(mean[0], var[0])
    twin.eval()
    torch.testing.assert_close(y, twin(x), rtol=1e-10, atol=1e-10)
    assert all(torch.equal(v, _state(layer)[k]) for k, v in before.items())


@pytest.mark.parametrize("name", ["bn", "bkn", "brn", "cbn"])
def test_population_probe_of_bn_like_layers_is_a_full_batch_batchnorm(name):
    layer = _layer(name)
    _warm(layer, (8, C, 5))
    x = _data((8, C, 5), seed=2)
    layer.probe = Probe("population")
    expected = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", batch_dependent())
def test_set_population_is_what_eval_uses(name):
    layer = _layer(name)
    mean = torch.linspace(-1, 1, C, dtype=torch.float64)
    var = torch.linspace(0.5, 2, C, dtype=torch.float64)
    layer.set_population(mean, var)
    for got, want in zip(layer.eval_statistics(), layer.reference(mean, var)):
        torch.testing.assert_close(got, want)


def test_bn_eval_after_set_population_is_batchnorm_with_those_statistics():
    layer = _layer("bn")
    x = _data((8, C, 3), seed=3)
    mean, var = x.mean((0, 2)), x.var((0, 2), correction=0)
    layer.set_population(mean, var)
    layer.eval()
    torch.testing.assert_close(layer(x), F.batch_norm(x, mean, var, layer.weight, layer.bias,
                                                      False, 0.0, layer.eps))


def test_bkn_train_probe_records_observation_prediction_posterior():
    from bknbench.models import make_model

    model = make_model("mlp", parse_spec("bkn"), 2, (1, 10), 3).double()
    norms = [m for m in model.modules() if getattr(m, "batch_dependent", False)]
    for layer in norms:
        layer.probe = Probe("train")
    model.train()
    model(_data((8, 1, 10)))
    assert set(norms[0].probe.stats) == {"observed", "used"}  # the first has no prediction
    for layer in norms[1:]:
        assert set(layer.probe.stats) == {"observed", "predicted", "used"}
        m, s = layer.probe.stats["observed"]
        mu_hat, var_hat = layer.probe.stats["predicted"]
        mu, var = layer.probe.stats["used"]
        trusted = (var_hat / s).mean() < layer.guard
        torch.testing.assert_close(mu, 0.9 * mu_hat + 0.1 * m if trusted else m)
