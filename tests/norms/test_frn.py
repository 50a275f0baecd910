"""FRN + TLU against a float64 reference written from the paper's equations, in training and
eval; the learned epsilon where there is one position per channel."""
import pytest
import torch

from bknbench.models.registry import make_model
from bknbench.norms.registry import parse_spec

D = torch.float64
C = 5


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=g, dtype=D) + 0.5


def frn_reference(x, gamma, beta, tau, eps):
    """The paper's equations, sample by sample: nu2 = mean over positions of x^2,
    y = gamma x / sqrt(nu2 + eps) + beta, z = max(y, tau)."""
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            xc = x[n, c]
            nu2 = (xc * xc).mean()
            y = gamma[c] * xc / torch.sqrt(nu2 + eps) + beta[c]
            out[n, c] = torch.maximum(y, tau[c])
    return out


def _randomized(spec):
    layer = parse_spec(spec).build(C, 2).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.tau):
            p.copy_(p + 0.5 * torch.randn(p.shape, generator=g, dtype=D))
        layer.eps_l.fill_(-3e-3)  # negative: |eps_l| is what counts
    return layer


@pytest.mark.parametrize("shape", [(4, C, 7), (4, C, 3, 4)], ids=["NCL", "NCHW"])
@pytest.mark.parametrize("spec, eps", [("frn", 1e-6), ("frn:eps=1e-5,learned_eps=off", 1e-5),
                                       ("frn:learned_eps=on", 1e-6 + 3e-3)],
                         ids=["paper", "timm", "learned"])
def test_frn_matches_the_equation_in_training_and_eval(shape, spec, eps):
    layer = _randomized(spec)
    x = _x(shape)
    expected = frn_reference(x, layer.weight, layer.bias, layer.tau, eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, C), (4, C, 1, 1)], ids=["NC", "NC11"])
def test_one_position_uses_the_learned_epsilon_and_it_learns(shape):
    layer = _randomized("frn")
    x = _x(shape).requires_grad_()
    expected = frn_reference(x, layer.weight, layer.bias, layer.tau, 1e-6 + 3e-3)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer(x).square().sum().backward()
    assert layer.eps_l.grad is not None and layer.eps_l.grad.abs() > 0
    # without the learned eps one position is nearly sign(x): no gradient to x
    off = _randomized("frn:learned_eps=off")
    x.grad = None
    off(x).square().sum().backward()
    assert x.grad.abs().max() < 1e-2


def test_positions_do_not_use_the_learned_epsilon_by_default():
    layer = _randomized("frn")
    x = _x((4, C, 6))
    layer(x).sum().backward()
    assert layer.eps_l.grad is None


def test_frn_in_the_mlp_has_learned_eps_gradient():
    torch.manual_seed(0)
    net = make_model("mlp", parse_spec("frn"), 2, (1, 16), 4).double()
    torch.nn.functional.cross_entropy(net(_x((8, 1, 16))), torch.arange(8) % 4).backward()
    norms = [m for m in net.modules() if hasattr(m, "eps_l")]
    assert len(norms) == 3 and all(m.eps_l.grad.abs() > 0 for m in norms)
