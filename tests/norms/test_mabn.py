"""MABN: forward and the custom backward against the paper's formulas in float64, step by step
(SMA of chi in the forward, SMA of psi in the backward, the EMA and r); the exact gradient
during the warm-up; grouped forwards as sequential micro-batches; weight centring."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from bknbench.models.registry import make_model
from bknbench.norms.registry import parse_spec

D = torch.float64
C = 3
EPS = 1e-5


def _x(shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=D) + 0.5


def _layer(spec, norm_batch=2):
    layer = parse_spec(spec).build(C, norm_batch).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(C, generator=g, dtype=D))
        layer.bias.add_(0.3 * torch.randn(C, generator=g, dtype=D))
    return layer


class Formula:
    """MABN.py's forward and backward, one micro-batch per call, K = 4, the SMAs and r from
    micro-batch 5 (warm-ups 0: only the ring must be full)."""

    K = 4

    def __init__(self, gamma, beta):
        self.gamma, self.beta = gamma.detach(), beta.detach()
        self.chis, self.psis, self.chi_e, self.t = [], [], None, 0

    def sma(self, hist, now):
        return (sum(hist[-(self.K - 1):]) + now) / self.K if self.t >= self.K + 1 else now

    def step(self, x, dy):
        self.t += 1
        dims = [0] + list(range(2, x.dim()))
        view = (1, C) + (1,) * (x.dim() - 2)
        chi_t = (x * x).mean(dims)
        chi_s = self.sma(self.chis, chi_t)
        chi_e = chi_s if self.chi_e is None else self.chi_e  # starts at the first chi
        r = torch.sqrt((chi_s + EPS) / (chi_e + EPS)).clamp(0.2, 5.0)
        r = r if self.t >= self.K + 1 else torch.ones(C, dtype=D)
        z = x / torch.sqrt(chi_s + EPS).view(view)
        y = self.gamma.view(view) * r.view(view) * z + self.beta.view(view)
        self.chi_e = 0.98 * chi_e + 0.02 * chi_s
        g = dy * (self.gamma * r).view(view)
        psi_t = (g * z).mean(dims)
        psi = self.sma(self.psis, psi_t)
        dx = (g - z * psi.view(view)) / torch.sqrt(chi_s + EPS).view(view)
        self.chis.append(chi_t)
        self.psis.append(psi_t)
        return y, dx, (dy * r.view(view) * z).sum(dims), dy.sum(dims), r


@pytest.mark.parametrize("shape", [(2, C), (2, C, 4), (2, C, 2, 3)], ids=["NC", "NCL", "NCHW"])
def test_forward_and_backward_equal_the_formulas_step_by_step(shape):
    layer = _layer("mabn:batch=8,warmup=0,r_warmup=0,center=0")  # K = 8 / 2
    ref = Formula(layer.weight, layer.bias)
    clipped = unclipped = 0
    for step in range(10):
        x = _x(shape, seed=step, scale=20.0 if step == 7 else 2.0).requires_grad_()
        dy = _x(shape, seed=50 + step)
        y = layer(x)
        y.backward(dy)
        y_ref, dx, dgamma, dbeta, r = ref.step(x.detach(), dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, dx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, dgamma, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, dbeta, rtol=1e-10, atol=1e-12)
        layer.weight.grad = layer.bias.grad = None
        clipped += bool((r == 5.0).any())
        unclipped += bool(((r != 1.0) & (r < 5.0) & (r > 0.2)).any())
        torch.testing.assert_close(layer.running_chi, ref.chi_e, rtol=1e-12, atol=1e-12)
    assert clipped and unclipped  # both regimes of r were exercised
    layer.eval()
    x = _x(shape, seed=99)
    view = (1, C) + (1,) * (x.dim() - 2)
    expected = layer.weight.view(view) * x / torch.sqrt(ref.chi_e + EPS).view(view) + \
        layer.bias.view(view)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_warmup_gradient_is_the_exact_gradient():
    """Before the SMAs (outside a run: 100 micro-batches) MABN is y = gamma x /
    sqrt(mean(x^2) + eps) + beta with its exact gradient."""
    layer = _layer("mabn:center=0")
    for step in range(3):
        x = _x((2, C, 4), seed=step).requires_grad_()
        up = _x((2, C, 4), seed=20 + step)
        (layer(x) * up).sum().backward()
        ours = [x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()]
        x.grad = layer.weight.grad = layer.bias.grad = None
        chi = (x * x).mean((0, 2))
        y = layer.weight[:, None] * x / torch.sqrt(chi + EPS)[:, None] + layer.bias[:, None]
        (y * up).sum().backward()
        for a, b in zip(ours, [x.grad, layer.weight.grad, layer.bias.grad]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        layer.weight.grad = layer.bias.grad = None


def test_with_r_unclipped_training_output_is_the_eval_formula():
    """r z = x / sqrt(chi_E + eps) with chi_E before the update: after the warm-ups the
    SMA acts in the backward only (an identity of the method, not of our code)."""
    layer = _layer("mabn:batch=4,warmup=0,r_warmup=0,center=0")
    for step in range(6):
        x = _x((2, C, 5), seed=step)
        before = layer.running_chi.clone()
        y = layer(x)
        if step >= 3:
            expected = layer.weight[:, None] * x / torch.sqrt(before + EPS)[:, None] + \
                layer.bias[:, None]
            torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_grouped_forward_equals_sequential_micro_batches():
    spec = "mabn:batch=8,warmup=0,r_warmup=0,center=0"
    grouped, single = _layer(spec), _layer(spec)
    for step in range(4):
        x = _x((8, C, 3), seed=step).requires_grad_()
        up = _x((8, C, 3), seed=30 + step)
        (grouped(x) * up).sum().backward()
        g_grouped = [x.grad.clone(), grouped.weight.grad.clone()]
        x.grad = None
        for k in range(4):
            sl = slice(2 * k, 2 * k + 2)
            (single(x[sl]) * up[sl]).sum().backward()
        torch.testing.assert_close(g_grouped[0], x.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_grouped[1], single.weight.grad, rtol=1e-10, atol=1e-12)
        grouped.weight.grad = single.weight.grad = None
    for (name, a), (_, b) in zip(grouped.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("model, in_shape", [("mlp", (1, 16)), ("cnn", (1, 16)),
                                             ("resnet20", (3, 8, 8))])
def test_center_centres_the_layers_feeding_mabn(model, in_shape):
    net = make_model(model, parse_spec("mabn"), 2, in_shape, 4)
    ops = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    for op in ops[:-1]:
        w = op.weight.reshape(op.weight.shape[0], -1)
        torch.testing.assert_close(w.mean(1), torch.zeros(len(w)), atol=1e-6, rtol=0)
        assert w.abs().sum() > 0
    assert not parametrize.is_parametrized(ops[-1])  # the classifier feeds no norm
    plain = make_model(model, parse_spec("mabn:center=0"), 2, in_shape, 4)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())


def test_window_from_the_batch_option():
    assert parse_spec("mabn").build(C, 2).window == 16  # MABN's 32 / 2
    assert parse_spec("mabn").build(C, 32).window == 1
    assert parse_spec("mabn:batch=128").build(C, 8).ring_psi.shape == (15, C)


def test_default_phases_are_the_reference_iterations():
    """MABN.py over its 180k-iteration run: current statistics while t < warmup_iters = 100,
    r = 1 while t <= 1000; a run twice as long doubles both."""
    assert _layer("mabn:center=0").phases() == (100, 1001)
    assert _layer("mabn:center=0,total=360000").phases() == (200, 2001)


def test_the_sma_starts_at_micro_batch_100():
    """K = 4 / 2 = 2: micro-batch 99 is normalized by its own chi, micro-batch 100 by the
    mean of chi_99 and chi_100 (r still 1)."""
    layer = _layer("mabn:batch=4,center=0")
    w, b = layer.weight.detach().view(1, C), layer.bias.detach().view(1, C)
    chis, ys, xs = [], [], []
    for t in range(1, 101):
        x = _x((2, C), seed=t)
        y = layer(x).detach()
        chis.append((x * x).mean(0))
        xs.append(x)
        ys.append(y)
    own = w * xs[98] / torch.sqrt(chis[98] + EPS) + b
    torch.testing.assert_close(ys[98], own, rtol=1e-12, atol=1e-12)
    sma = w * xs[99] / torch.sqrt((chis[98] + chis[99]) / 2 + EPS) + b
    torch.testing.assert_close(ys[99], sma, rtol=1e-12, atol=1e-12)
