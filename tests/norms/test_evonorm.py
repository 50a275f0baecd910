"""EvoNorm-B0 and -S0 against float64 references written from the paper's equations, in
training and eval; timm's conventions one option away; the group rule; no ReLU after them."""
import pytest
import torch
import torch.nn.functional as F

from bknbench.models.registry import make_model
from bknbench.norms.registry import parse_spec

D = torch.float64
C = 6


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=g, dtype=D) + 0.5


def _randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def b0_reference(x, b, v, gamma, beta, eps, var_b=None):
    """The paper's B0, sample by sample: y = x / max(sqrt(var_B + eps), v x +
    sqrt(var_I + eps)) gamma + beta; var_B over the group of b samples and the positions
    (or the given running variance), var_I over the sample's positions."""
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        group = x[(n // b) * b:(n // b + 1) * b]  # (b, C, *S)
        vb = var_b if var_b is not None else group.transpose(0, 1).reshape(
            x.shape[1], -1).var(1, correction=0)
        for c in range(x.shape[1]):
            xc = x[n, c]
            vi = xc.var(correction=0) if xc.dim() else torch.zeros((), dtype=D)
            den = torch.maximum(torch.sqrt(vb[c] + eps), v[c] * xc + torch.sqrt(vi + eps))
            out[n, c] = xc / den * gamma[c] + beta[c]
    return out


@pytest.mark.parametrize("shape", [(8, C), (8, C, 5), (8, C, 3, 4)], ids=["NC", "NCL", "NCHW"])
@pytest.mark.parametrize("spec, eps, unbiased", [("evonorm-b0", 1e-5, False),
                                                 ("evonorm-b0:eps=1e-3,unbiased=1", 1e-3, True)],
                         ids=["official", "timm"])
def test_b0_matches_the_equation_in_training_and_eval(shape, spec, eps, unbiased):
    layer = parse_spec(spec).build(C, 2).double()
    _randomize(layer)
    running = torch.ones(C, dtype=D)
    for step in range(3):
        x = _x(shape, seed=step)
        expected = b0_reference(x, 2, layer.v, layer.weight, layer.bias, eps)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        for k in range(4):  # the running variance: one EMA update per micro-batch
            group = x[2 * k:2 * k + 2].transpose(0, 1).reshape(C, -1)
            n = group.shape[1]
            var = group.var(1, correction=0) * (n / (n - 1) if unbiased else 1.0)
            running = 0.9 * running + 0.1 * var
    torch.testing.assert_close(layer.running_var, running, rtol=1e-12, atol=1e-12)
    layer.eval()
    x = _x(shape, seed=9)
    expected = b0_reference(x, 2, layer.v, layer.weight, layer.bias, eps, var_b=running)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_b0_gradients_equal_autograd_of_the_reference():
    layer = parse_spec("evonorm-b0").build(C, 4).double()
    _randomize(layer)
    x = _x((8, C, 5)).requires_grad_()
    up = _x((8, C, 5), seed=3)
    (layer(x) * up).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in (layer.v, layer.weight, layer.bias)]
    for t in [x, layer.v, layer.weight, layer.bias]:
        t.grad = None
    (b0_reference(x, 4, layer.v, layer.weight, layer.bias, 1e-5) * up).sum().backward()
    for a, b in zip(ours, [x.grad, layer.v.grad, layer.weight.grad, layer.bias.grad]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_b0_with_one_value_per_statistic_is_undefined():
    layer = parse_spec("evonorm-b0").build(C, 1)
    with pytest.raises(ValueError, match="undefined"):
        layer(torch.randn(4, C))


def s0_reference(x, groups, v, gamma, beta, eps):
    """The paper's S0, sample by sample: y = x sigmoid(v x) / sqrt(var_G + eps) gamma + beta,
    var_G over the sample's channels of the group and their positions."""
    out = torch.empty_like(x)
    per = x.shape[1] // groups
    for n in range(x.shape[0]):
        for j in range(groups):
            chans = x[n, j * per:(j + 1) * per]
            std = torch.sqrt(chans.var(correction=0) + eps)
            for c in range(j * per, (j + 1) * per):
                out[n, c] = x[n, c] * torch.sigmoid(v[c] * x[n, c]) / std * gamma[c] + beta[c]
    return out


@pytest.mark.parametrize("shape", [(4, 12), (4, 12, 5), (4, 12, 3, 4)],
                         ids=["NC", "NCL", "NCHW"])
@pytest.mark.parametrize("spec, groups", [("evonorm-s0:groups=4", 4), ("evonorm-s0:groups=3", 3),
                                          ("evonorm-s0:groups=1", 1)])
def test_s0_matches_the_equation_in_training_and_eval(shape, spec, groups):
    layer = parse_spec(spec).build(12, 2).double()
    _randomize(layer)
    x = _x(shape)
    expected = s0_reference(x, groups, layer.v, layer.weight, layer.bias, 1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels, groups", [(64, 32), (16, 16), (24, 24), (48, 24), (12, 12)])
def test_s0_groups_follow_the_official_fallback(channels, groups):
    """The official code lowers 32 until it divides C (timm would refuse C = 16)."""
    assert parse_spec("evonorm-s0").build(channels, 2).num_groups == groups


@pytest.mark.parametrize("model, in_shape", [("mlp", (1, 16)), ("cnn", (1, 16)),
                                             ("resnet20", (3, 8, 8))])
@pytest.mark.parametrize("name", ["evonorm-b0", "evonorm-s0", "frn"])
def test_no_relu_after_a_norm_with_its_own_nonlinearity(name, model, in_shape):
    net = make_model(model, parse_spec(name), 2, in_shape, 4)
    assert not [m for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    net_bn = make_model(model, parse_spec("bn"), 2, in_shape, 4)
    assert [m for m in net_bn.modules() if isinstance(m, torch.nn.ReLU)]  # the control


def test_b0_in_a_cnn_is_its_equation_without_relu():
    """The whole cnn with evonorm-b0 equals the same cnn written by hand with the reference
    and no ReLU (the builder adds nothing around the norm)."""
    torch.manual_seed(0)
    net = make_model("cnn", parse_spec("evonorm-b0"), 2, (1, 16), 4).double()
    x = _x((4, 1, 16))
    h = x
    mods = list(net)
    for i, m in enumerate(mods):
        if isinstance(m, torch.nn.Conv1d):
            norm = mods[i + 1]
            h = b0_reference(m(h), 2, norm.v, norm.weight, norm.bias, 1e-5)
    out = mods[-1](F.adaptive_avg_pool1d(h, 1).flatten(1))
    torch.testing.assert_close(net(x), out, rtol=1e-9, atol=1e-9)
