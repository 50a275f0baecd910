"""The diagnostics measure what they claim: on i.i.d. Gaussian input with known statistics the
training-statistics error of BN is the sampling theory's, and the population probe of a whole
model is a full-batch BatchNorm layer by layer (PreciseBN)."""
import copy
import math

import pytest
import torch
from torch import nn

from bknbench.diagnose import Diagnostics, logvar_error, mean_error
from bknbench.diagnose.measure import bn_theory, logvar_bias, mean_bias
from bknbench.diagnose.probes import norm_layers, train_plan
from bknbench.models import make_model
from bknbench.norms import parse_spec

C = 64


def _gaussian(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.linspace(-3, 3, shape[1]).view((1, -1) + (1,) * (len(shape) - 2))
    sd = torch.linspace(0.2, 5, shape[1]).view(mean.shape)
    return (mean + sd * torch.randn(shape, generator=g, dtype=torch.float64)).float()


def _errors(rows) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows if r["layer"] == 0}


def test_bn_theory_values():
    """n = 2: E[(m - mu)^2] = var / 2; log(s / var) = log(chi^2_1 / 2), whose square has the
    mean trigamma(1/2) + digamma(1/2)^2 = pi^2 / 2 + (-gamma - 2 log 2)^2."""
    mean_n2, logvar_n2 = bn_theory(2)
    euler_gamma = 0.5772156649015329
    assert mean_n2 == 0.5
    assert logvar_n2 == pytest.approx(math.pi ** 2 / 2 + (euler_gamma + 2 * math.log(2)) ** 2)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400_000, 5, generator=g, dtype=torch.float64)  # n = 5 values a statistic
    s = z.var(1, correction=0)
    assert logvar_error(s, torch.ones(1)).item() == pytest.approx(bn_theory(5)[1], rel=0.02)
    assert mean_error(z.mean(1), torch.zeros(1), torch.ones(1)).item() == pytest.approx(
        0.2, rel=0.02)


@pytest.mark.parametrize("shape, b", [((1024, C), 2), ((1024, C), 4), ((1024, C), 16),
                                      ((1024, C, 4), 2)], ids=["b2", "b4", "b16", "b2x4pos"])
def test_bn_training_statistics_error_matches_theory(shape, b):
    """One BN layer on Gaussian input (64 channels of different mean and scale); one training
    forward of the whole probe set (sgd batch 1024: 512 samples, the probe set), groups of
    b: n = b x positions values per statistic. Within 10% of the theory (the population is
    the probe set's own: the mean error is (512 - b) / 511 of the theory, 3% low at b = 16)."""
    x = _gaussian(shape)
    layer = parse_spec("bn").build(C, b)
    diag = Diagnostics(nn.Sequential(layer), x, b, len(x))
    assert (len(diag.x), diag.chunk, diag.forwards) == (512, 512, 1)
    got = _errors(diag.epoch_rows(1))
    n = b * (shape[2] if len(shape) > 2 else 1)
    want_mean, want_logvar = bn_theory(n)
    assert got["mean_err_used"] == pytest.approx(want_mean, rel=0.10)
    assert got["logvar_err_used"] == pytest.approx(want_logvar, rel=0.10)
    # systematic parts: the groups partition the probe set, so their means average to its
    # mean exactly; the log of a biased variance is biased, E log(v / var) =
    # digamma((n-1)/2) + log(2/n) (the partition also pins the groups' average variance,
    # so the noise of that average hardly adds)
    assert got["mean_bias_used"] == pytest.approx(0.0, abs=1e-9)
    from scipy.special import digamma

    k = (n - 1) / 2
    assert got["logvar_bias_used"] == pytest.approx((digamma(k) + math.log(2 / n)) ** 2,
                                                    rel=0.10)
    # the running statistics were never trained: mean 0, var 1 against the probe set's,
    # the variances with BN's eps (what the normalization divides by)
    dims = [0] + list(range(2, x.dim()))
    probe = diag.x.double()
    mu, var = probe.mean(dims), probe.var(dims, correction=0) + layer.eps
    assert got["mean_err_running"] == pytest.approx((mu.square() / var).mean().item(), rel=1e-5)
    assert got["logvar_err_running"] == pytest.approx(
        torch.log((1 + layer.eps) / var).square().mean().item(), rel=1e-5)


def test_error_is_bias_plus_spread():
    g = torch.Generator().manual_seed(2)
    m, v = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.rand(
        50, 3, generator=g, dtype=torch.float64) + 0.1
    ref_m, ref_v = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.5, 1.0, 2.0])
    spread_m = ((m - ref_m) / ref_v.sqrt()).var(0, correction=0).mean()
    spread_v = torch.log(v / ref_v).var(0, correction=0).mean()
    torch.testing.assert_close(mean_error(m, ref_m, ref_v) - mean_bias(m, ref_m, ref_v), spread_m)
    torch.testing.assert_close(logvar_error(v, ref_v) - logvar_bias(v, ref_v), spread_v)


def test_train_probe_replays_training_forwards():
    """Groups of the micro-batch inside forwards of the SGD batch: at most 64 forwards over
    at most 256 samples, one forward at least, never more samples than the probe set holds."""
    assert train_plan(512, 2, 128) == (128, 2)
    assert train_plan(512, 2, 2) == (2, 64)
    assert train_plan(512, 128, 128) == (128, 2)
    assert train_plan(512, 4, 2048) == (512, 1)
    assert train_plan(500, 128, 1024) == (384, 1)
    with pytest.raises(ValueError, match="smaller than micro-batch"):
        train_plan(100, 128, 128)


def _precise_bn(model, x):
    """Reference: every batch-dependent layer swapped for torch.nn.BatchNorm1d (the same
    affine parameters) in training mode, one forward over x; the mean and biased variance
    of each one's input, recorded by a hook."""
    twin = copy.deepcopy(model)
    found = []

    def record(module, args):
        z = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)  # (C, N * positions)
        found.append((z.mean(1), z.var(1, correction=0)))

    for name, layer in norm_layers(twin):
        bn = nn.BatchNorm1d(layer.num_features, eps=layer.eps).double()
        bn.weight.data.copy_(layer.weight)
        bn.bias.data.copy_(layer.bias)
        bn.register_forward_pre_hook(record)
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, bn)
    twin.train()
    with torch.no_grad():
        twin(x)
    return found


@pytest.mark.parametrize("spec", ["bn", "bkn"])
@pytest.mark.parametrize("model_name, in_shape", [("mlp", (1, 12)), ("cnn", (2, 16))])
def test_population_statistics_are_a_full_batch_batchnorms(spec, model_name, in_shape):
    torch.manual_seed(0)
    model = make_model(model_name, parse_spec(spec), 4, in_shape, 3).double()
    with torch.no_grad():  # affine parameters away from (1, 0), so that they matter
        for _, layer in norm_layers(model):
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
    x = 1.5 * torch.randn((300,) + in_shape, dtype=torch.float64) + 0.3
    before = copy.deepcopy(model.state_dict())
    pop, _ = Diagnostics(model, x, 4, 4).probe()
    refs = _precise_bn(model, x)  # the probe set is all 300 samples (order is irrelevant)
    assert len(pop) == len(refs) == (3 if model_name == "mlp" else 4)
    for (mean, var), (ref_mean, ref_var) in zip(pop, refs):
        torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(var, ref_var, rtol=1e-9, atol=1e-9)
    for key, value in model.state_dict().items():  # nothing changed
        assert torch.equal(value, before[key]), key
