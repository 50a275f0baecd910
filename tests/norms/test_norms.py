"""The normalizer registry: a contract every registered normalizer meets (parametrized over
the registry, so a new one is tested automatically), and numerical equality of bn/gn/ln with
their torch references."""
import io

import pytest
import torch
from torch import nn

from bknbench.models.registry import make_model
from bknbench.norms.registry import REGISTRY, names, parse_spec
from bknbench.norms.batch import GroupedBatchNorm, gn_groups
from bknbench.kernels.reference import ema_over_groups
from bknbench.kernels.fused import group_moments



C = 12  # channels: gn's rule gives 6 groups, so gn is not ln in disguise
SHAPES = [(8, C), (8, C, 5), (8, C, 3, 4)]  # (N, C), (N, C, L), (N, C, H, W)


def _layer(name, norm_batch=2):
    return parse_spec(name).build(C, norm_batch).double()


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(shape, generator=g, dtype=torch.float64) + 1.5


def _warm_up(layer, shape, steps=3):
    """A few training forwards (moves running statistics away from their init) and random
    affine parameters, so eval and round-trip tests see non-trivial state."""
    layer.train()
    with torch.no_grad():
        for i in range(steps):
            layer(_data(shape, seed=100 + i))
        g = torch.Generator().manual_seed(7)
        for p in layer.parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_registry_is_full_whichever_module_comes_first():
    """The registry alone, imported first in a fresh interpreter (as `parse_spec` users do),
    holds every normalizer: its package imports each family module."""
    import subprocess
    import sys

    code = "from bknbench.norms.registry import names; print(','.join(names()))"
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=120).stdout.strip().split(",")
    assert alone == names() and set(names()) == set(REGISTRY)
    assert {"bn", "bn-accum", "gn", "ln", "none", "bkn"} <= set(names())


# ---------------------------------------------------------------- the contract, per norm
@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCL", "NCHW"])
def test_output_shape_equals_input_shape(name, shape):
    layer = _layer(name)
    x = _data(shape)
    layer.train()
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCL", "NCHW"])
def test_eval_output_is_per_sample(name, shape):
    """In eval mode no normalizer may let one sample change another's output."""
    layer = _layer(name)
    _warm_up(layer, shape)
    layer.eval()
    x = _data(shape, seed=1)
    with torch.no_grad():
        y = layer(x)
        for i in range(len(x)):
            torch.testing.assert_close(layer(x[i:i + 1]), y[i:i + 1], rtol=1e-10, atol=1e-10)


# Normalizers whose output is not zero-mean by design: for them the contract is that the
# output's scale does not follow the input's (root mean square of order 1 at two scales).
NOT_CENTRED = {
    "mabn": "divides by sqrt(mean x^2), no mean subtraction (MABN)",
    "frn": "divides by the rms over positions, then max(y, tau) (FRN + TLU)",
    "evonorm-b0": "x / max(batch std, v x + instance std): no centring, a nonlinearity",
    "evonorm-s0": "x sigmoid(v x) / group std: no centring, a nonlinearity",
}


@pytest.mark.parametrize("name", names())
def test_normalizes_in_training(name):
    """With unit weight and zero bias, every normalizer except `none` takes a batch with a
    large offset and scale to roughly zero mean and unit spread per channel (those of
    NOT_CENTRED: to an output of unit order, whatever the input's scale)."""
    layer = _layer(name)
    x = _data((8, C, 6), seed=3) * 5.0 + 20.0
    layer.train()
    with torch.no_grad():
        y = layer(x)
        if name == "none":
            torch.testing.assert_close(y, x, rtol=0, atol=0)
        elif name in NOT_CENTRED:
            for scale in (1.0, 100.0):
                rms = layer(x * scale).square().mean().sqrt()
                assert 0.3 < rms < 3.0, (scale, rms)
        else:
            assert y.mean().abs() < 0.2
            assert 0.7 < y.std() < 1.3


@pytest.mark.parametrize("name", names())
def test_state_dict_round_trip(name):
    shape = (8, C, 5)
    layer = _layer(name)
    _warm_up(layer, shape)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = _layer(name)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for (k, a), (k2, b) in zip(layer.state_dict().items(), fresh.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b), k
    layer.eval()
    fresh.eval()
    x = _data(shape, seed=5)
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x))


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("model, in_shape", [("mlp", (1, 16)), ("cnn", (1, 16)),
                                             ("cnn", (2, 8, 8))],
                         ids=["mlp", "cnn1d", "cnn2d"])
def test_inside_models_backward_gives_finite_grads(name, model, in_shape):
    torch.manual_seed(0)
    net = make_model(model, parse_spec(name), 2, in_shape, 5).double()
    x = _data((8,) + in_shape, seed=2)
    y = torch.arange(8) % 5
    net.train()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # and the whole model in eval mode is per-sample too
    net.eval()
    with torch.no_grad():
        out = net(x)
        for i in range(len(x)):
            torch.testing.assert_close(net(x[i:i + 1]), out[i:i + 1], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- bn == torch BatchNorm
@pytest.mark.parametrize("norm_batch", [None, 8], ids=["whole-batch", "norm_batch=N"])
@pytest.mark.parametrize("shape, ref_cls", [((8, C), nn.BatchNorm1d), ((8, C, 5), nn.BatchNorm1d),
                                            ((8, C, 3, 4), nn.BatchNorm2d)],
                         ids=["NC", "NCL", "NCHW"])
def test_bn_matches_torch_batchnorm(norm_batch, shape, ref_cls):
    ours = parse_spec("bn").build(C, norm_batch).double()
    ref = ref_cls(C).double()
    with torch.no_grad():
        w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    for step in range(4):
        x = _data(shape, seed=10 + step)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    ours.eval()
    ref.eval()
    x = _data(shape, seed=99)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", ["bn", "bn-accum"])
@pytest.mark.parametrize("shape", [(8, C), (8, C, 5), (8, C, 3, 4)], ids=["NC", "NCL", "NCHW"])
def test_grouped_bn_equals_separate_torch_batchnorms(spec, shape):
    """G = N / norm_batch groups: outputs are G independent BN forwards on the slices, and the
    running statistics are G sequential BN updates (ema_over_groups' closed form)."""
    b = 2
    g = shape[0] // b
    ours = parse_spec(spec).build(C, b).double()
    ref = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(C).double()
    with torch.no_grad():
        w, bias = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(bias)
    for step in range(3):
        x = _data(shape, seed=20 + step)
        expected = torch.cat([ref(x[k * b:(k + 1) * b]) for k in range(g)])
        torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    ours.eval()
    ref.eval()
    x = _data(shape, seed=98)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_grouped_bn_rejects_a_batch_not_a_multiple_of_norm_batch():
    layer = GroupedBatchNorm(C, 3)
    with pytest.raises(ValueError, match="multiple"):
        layer(torch.randn(8, C))


def test_bn_with_one_value_per_statistic_is_undefined():
    layer = GroupedBatchNorm(C, 1)
    with pytest.raises(ValueError, match="undefined"):
        layer(torch.randn(4, C))
    layer(torch.randn(4, C, 3))  # positions make it defined


def test_ema_over_groups_equals_sequential_updates():
    running = torch.randn(5, dtype=torch.float64)
    stats = torch.randn(7, 5, dtype=torch.float64)
    r = running.clone()
    for s in stats:
        r = 0.9 * r + 0.1 * s
    torch.testing.assert_close(ema_over_groups(running, stats, 0.1), r, rtol=1e-13, atol=1e-13)
    r = running.clone()
    for s in stats:
        r = 0.7 * r + 0.3 * s
    torch.testing.assert_close(ema_over_groups(running, stats, 0.3), r, rtol=1e-13, atol=1e-13)


def test_group_moments_by_hand():
    x = torch.arange(24, dtype=torch.float64).reshape(4, 2, 3)  # groups of 2 samples
    mean, var = group_moments(x, 2)
    for g in range(2):
        for c in range(2):
            vals = x[2 * g:2 * g + 2, c].flatten()
            assert mean[g, c] == pytest.approx(vals.mean().item())
            assert var[g, c] == pytest.approx(vals.var(correction=0).item())


# ---------------------------------------------------------------- gn / ln == torch GroupNorm
@pytest.mark.parametrize("shape", [(8, C), (8, C, 5), (8, C, 3, 4)], ids=["NC", "NCL", "NCHW"])
@pytest.mark.parametrize("spec, groups", [("gn", 6), ("gn:groups=4", 4), ("gn:groups=3", 3),
                                          ("ln", 1)])
def test_gn_and_ln_match_torch_groupnorm(spec, groups, shape):
    ours = parse_spec(spec).build(C, 2).double()
    ref = nn.GroupNorm(groups, C).double()
    assert ours.num_groups == groups
    with torch.no_grad():
        w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    x = _data(shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels, groups, expected",
                         [(12, 8, 6), (32, 8, 8), (3, 8, 3), (7, 8, 7), (64, 32, 32),
                          (10, 4, 2), (1, 8, 1), (12, 1, 1)])

def test_gn_groups_rule(channels, groups, expected):
    got = gn_groups(channels, groups)
    assert got == expected
    assert channels % got == 0 and got <= groups


# ---------------------------------------------------------------- resets, defaults, repr
RESET_STATS = [n for n in names() if hasattr(_layer(n), "reset_running_stats")
               and _layer(n).batch_dependent]  # gkn keeps no running statistics
RESET_PARAMS = [n for n in names() if hasattr(_layer(n), "reset_parameters")]


@pytest.mark.parametrize("name", RESET_STATS)
def test_reset_running_stats_gives_a_fresh_layers_buffers(name):
    layer, fresh = _layer(name), _layer(name)
    _warm_up(layer, (8, C, 5))
    moved = dict(layer.named_buffers())
    assert any(not torch.equal(b, moved[k]) for k, b in fresh.named_buffers()), "no change"
    layer.reset_running_stats()
    for k, b in fresh.named_buffers():
        assert torch.equal(dict(layer.named_buffers())[k], b), k


@pytest.mark.parametrize("name", RESET_PARAMS)
def test_reset_parameters_gives_a_fresh_layers_parameters(name):
    layer = _layer(name)
    _warm_up(layer, (8, C, 5))
    torch.manual_seed(1)
    layer.reset_parameters()
    torch.manual_seed(1)
    fresh = _layer(name)
    for (k, a), (_, b) in zip(layer.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), k


def test_class_defaults_are_the_registry_defaults():
    """A layer made in code, without options, is the one `--norms NAME` makes."""
    from bknbench.norms.cbn import CrossIterationBatchNorm
    from bknbench.norms.frn import FilterResponseNorm
    from bknbench.norms.gkn import GroupKalmanNorm
    from bknbench.norms.kalman import BatchKalmanNorm
    from bknbench.norms.mabn import MovingAverageBatchNorm
    from bknbench.norms.renorm import BatchRenorm

    for cls, name in ((GroupKalmanNorm, "gkn"), (BatchKalmanNorm, "bkn"), (BatchRenorm, "brn"),
                      (MovingAverageBatchNorm, "mabn"), (CrossIterationBatchNorm, "cbn")):
        # 72 channels: 8 and 9 divide it, so gkn's default of 8 groups shows (12: 6 either way)
        assert repr(cls(72, 2)) == repr(parse_spec(name).build(72, 2)), name
    assert repr(FilterResponseNorm(C)) == repr(parse_spec("frn").build(C, 2))


def test_printed_layers_show_their_settings():
    bkn = parse_spec("bkn:p=0.5,transition=sampled").build(4, 2)
    assert repr(bkn) == (
        "BatchKalmanNorm(4, norm_batch=2, eps=1e-05, momentum=0.1, p=0.5, gain=fixed, "
        "transition=sampled, propagate=raw, borders=exact, guard_scope=layer, "
        "running=observed, stream=authors, chained=False)")
    bkn.prior = object()
    assert repr(bkn).endswith("chained=True)")
    assert repr(parse_spec("brn:r_max=2").build(4, 2)) == (
        "BatchRenorm(4, norm_batch=2, eps=1e-05, momentum=0.1, r_max=2.0, d_max=5.0, "
        "warmup=0.05, relax=0.4, total=0)")
    assert repr(parse_spec("gkn:groups=2").build(4, 2)).endswith(", groups=2)")
