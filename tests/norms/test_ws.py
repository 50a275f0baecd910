"""WS + GN: the builder standardizes exactly the layers feeding a norm; the network computes
GroupNorm(conv(x, W_hat)); the biased/unbiased convention is removed by the GroupNorm."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bknbench.models.registry import make_model
from bknbench.norms.registry import parse_spec
from bknbench.norms.ws import Standardized

D = torch.float64


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=g, dtype=D) + 0.5


def standardized(w, eps=1e-6, correction=0):
    """The equation: per output channel, (W - mean) / sqrt(var + eps)."""
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = flat.var(1, correction=correction, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


@pytest.mark.parametrize("model, in_shape, op", [("mlp", (1, 16), nn.Linear),
                                                 ("cnn", (1, 16), nn.Conv1d),
                                                 ("cnn", (2, 8, 8), nn.Conv2d),
                                                 ("resnet20", (3, 8, 8), nn.Conv2d)])
def test_every_layer_feeding_a_norm_is_standardized_and_no_other(model, in_shape, op):
    net = make_model(model, parse_spec("ws-gn"), 2, in_shape, 4)
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    feeding, classifier = layers[:-1], layers[-1]
    assert all(isinstance(m, op) and parametrize.is_parametrized(m, "weight") for m in feeding)
    assert not parametrize.is_parametrized(classifier, "weight")
    for m in feeding:  # what every reader of .weight sees (BKN's transitions included)
        torch.testing.assert_close(m.weight, standardized(m.parametrizations.weight.original))
    plain = make_model(model, parse_spec("gn"), 2, in_shape, 4)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())


def test_ws_gn_cnn_is_groupnorm_of_standardized_convolutions():
    torch.manual_seed(0)
    net = make_model("cnn", parse_spec("ws-gn:groups=4"), 2, (1, 16), 4).double()
    x = _x((4, 1, 16))
    h, mods = x, list(net)
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv1d):
            w = standardized(m.parametrizations.weight.original)
            h = F.relu(F.group_norm(F.conv1d(h, w, None, m.stride, m.padding), 4,
                                    mods[i + 1].weight, mods[i + 1].bias, 1e-5))
    out = mods[-1](h.mean(-1))
    torch.testing.assert_close(net(x), out, rtol=1e-10, atol=1e-10)


def test_standardized_against_hand_numbers():
    # filter [1, 2, 3]: mean 2, biased variance 2/3; filter [0, 0, 4]: mean 4/3, variance 32/9
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]], dtype=D)
    s1, s2 = math.sqrt(2 / 3 + 1e-6), math.sqrt(32 / 9 + 1e-6)
    want = torch.tensor([[-1 / s1, 0.0, 1 / s1],
                         [-4 / 3 / s2, -4 / 3 / s2, 8 / 3 / s2]], dtype=D)
    torch.testing.assert_close(Standardized()(w), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(standardized(w), want, rtol=1e-12, atol=1e-12)  # the oracle


def test_the_variance_convention_cancels_in_the_groupnorm():
    """timm's biased variance (the layer) vs the authors' unbiased std (the equation here):
    one common factor per layer, which GroupNorm removes (up to eps)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, generator=g, dtype=D)
    x = _x((4, 3, 10))
    a = F.group_norm(F.conv1d(x, Standardized(eps=0.0)(w)), 4, eps=1e-12)
    b = F.group_norm(F.conv1d(x, standardized(w, 0.0, 1)), 4, eps=1e-12)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_standardized_gradients_flow_through_mean_and_std():
    w = _x((6, 4, 3)).requires_grad_()
    up = _x((6, 4, 3), seed=2)
    (Standardized()(w) * up).sum().backward()
    g1 = w.grad.clone()
    w.grad = None
    (standardized(w) * up).sum().backward()
    torch.testing.assert_close(g1, w.grad, rtol=1e-10, atol=1e-12)
    assert g1.abs().sum() > 0
