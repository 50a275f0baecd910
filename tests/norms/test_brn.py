"""Batch Renormalization against a float64 reference written from the paper's Algorithm 1,
through several steps (running statistics and the schedule included) and with gradients
(r and d constants); the schedule's fractions; plain BN during the warm-up."""
import pytest
import torch

from bknbench.norms.registry import parse_spec
from bknbench.norms.renorm import BatchRenorm

D = torch.float64
C = 4


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(shape, generator=g, dtype=D) + 1.0


def paper_limits(t, total, warmup, relax, r_final, d_final):
    """(r_max, d_max) for the micro-batch after t seen (Ioffe 2017, sec. 4: r_max = 1 and
    d_max = 0 through the warm-up, then relaxed linearly, r_max to its final value at
    `relax`, d_max at 4/7 of the way (the paper's 25k between 5k and 40k)), in micro-batches."""
    start, end = warmup * total, relax * total
    d_end = round(start + 4 / 7 * (end - start))

    def linear(lo, hi, stop):
        return lo if t <= start else hi if t >= stop else lo + (hi - lo) * (t - start) / (
            stop - start)
    return linear(1.0, r_final, end), linear(0.0, d_final, d_end)


# the schedule of the test below, by hand: r_max 1 through micro-batch 2, 2 from 12; d_max 1
# from round(2 + 4/7 * 10) = 8
SCHEDULE = dict(total=20, warmup=0.1, relax=0.6, r_final=2.0, d_final=1.0)


def test_paper_limits_by_hand():
    assert paper_limits(2, **SCHEDULE) == (1.0, 0.0)
    assert paper_limits(7, **SCHEDULE) == (1.5, 5 / 6)
    assert paper_limits(8, **SCHEDULE) == (1.6, 1.0) and paper_limits(12, **SCHEDULE) == (2, 1)


class Reference:
    """Algorithm 1 of the paper, one micro-batch at a time, autograd for the gradients, the
    schedule of paper_limits."""

    def __init__(self, layer: BatchRenorm):
        self.layer = layer  # for the affine parameters only
        self.mu = torch.zeros(C, dtype=D)
        self.sigma = torch.ones(C, dtype=D)
        self.t = 0

    def step(self, x):  # x: one micro-batch (b, C, *S)
        dims = [0] + list(range(2, x.dim()))
        mu_b = x.mean(dims)
        sigma_b = torch.sqrt(x.var(dims, correction=0) + self.layer.eps)
        r_max, d_max = paper_limits(self.t, **SCHEDULE)
        r = (sigma_b / self.sigma).clamp(1 / r_max, r_max).detach()
        d = ((mu_b - self.mu) / self.sigma).clamp(-d_max, d_max).detach()
        shape = (1, C) + (1,) * (x.dim() - 2)
        xhat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
        y = self.layer.weight.view(shape) * xhat + self.layer.bias.view(shape)
        a = self.layer.momentum
        self.mu = self.mu + a * (mu_b.detach() - self.mu)
        self.sigma = self.sigma + a * (sigma_b.detach() - self.sigma)
        self.t += 1
        return y


def _layer(spec, norm_batch=2):
    layer = parse_spec(spec).build(C, norm_batch).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(C, generator=g, dtype=D))
        layer.bias.add_(0.3 * torch.randn(C, generator=g, dtype=D))
    return layer


@pytest.mark.parametrize("shape", [(8, C), (8, C, 5), (8, C, 3, 2)], ids=["NC", "NCL", "NCHW"])
def test_brn_equals_algorithm_1_through_steps_with_gradients(shape):
    """16 micro-batches over 4 forwards of 4 groups, with a schedule that relaxes r_max and
    d_max over them (warm-up 2, r_max reached at 12, d_max at 2 + 4/7 * 10 ~ 8)."""
    layer = _layer("brn:total=20,warmup=0.1,relax=0.6,r_max=2,d_max=1,momentum=0.3")
    ref = Reference(layer)
    clipped = 0
    for step in range(4):
        x = _x(shape, seed=step).requires_grad_()
        up = _x(shape, seed=10 + step)
        y = layer(x)
        (y * up).sum().backward()
        ours = [x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()]
        x.grad = layer.weight.grad = layer.bias.grad = None
        y_ref = torch.cat([ref.step(x[2 * k:2 * k + 2]) for k in range(4)])
        (y_ref * up).sum().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(ours, [x.grad, layer.weight.grad, layer.bias.grad]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        layer.weight.grad = layer.bias.grad = None
        r_max, _ = paper_limits(ref.t - 1, **SCHEDULE)
        clipped += r_max < 2.0
        torch.testing.assert_close(layer.running_mean, ref.mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_std, ref.sigma, rtol=1e-12, atol=1e-12)
    assert int(layer.micro_batches) == ref.t == 16
    assert clipped  # the schedule was still relaxing during the test
    layer.eval()
    x = _x(shape, seed=99)
    shape1 = (1, C) + (1,) * (x.dim() - 2)
    expected = (layer.weight.view(shape1) * (x - ref.mu.view(shape1)) / ref.sigma.view(shape1)
                + layer.bias.view(shape1))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_r_and_d_carry_no_gradient():
    """With r, d differentiated the gradient would differ: the reference with the detach
    removed is not what the layer computes."""
    layer = _layer("brn:total=4,warmup=0,relax=0")  # full r_max = 3, d_max = 5 at once
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
        layer.running_std.fill_(2.0)
    x = _x((4, C, 3)).requires_grad_()
    layer(x).square().sum().backward()
    g_layer = x.grad.clone()
    x.grad = None
    dims = (0, 2)
    mu_b, sigma_b = x.mean(dims), torch.sqrt(x.var(dims, correction=0) + layer.eps)
    r = (sigma_b / 2.0).clamp(1 / 3, 3)  # not detached
    d = ((mu_b - 0.5) / 2.0).clamp(-5, 5)
    y = layer.weight[:, None] * ((x - mu_b[:, None]) / sigma_b[:, None] * r[:, None]
                                 + d[:, None]) + layer.bias[:, None]
    y.square().sum().backward()
    assert not torch.allclose(g_layer, x.grad, atol=1e-6)


def test_schedule_fractions_stand_for_the_papers_steps():
    """Outside a run (total=0) the fractions refer to 100k micro-batches: the paper's
    schedule, plain BN to 5k, d_max = 5 at 25k, r_max = 3 at 40k."""
    layer = BatchRenorm(C, 2)
    assert layer.limits(0) == (1.0, 0.0) and layer.limits(5000) == (1.0, 0.0)
    r, d = layer.limits(15000)
    assert r == pytest.approx(1 + 2 * 10 / 35) and d == pytest.approx(5 * 10 / 20)
    assert layer.limits(25000)[1] == 5.0 and layer.limits(40000) == (3.0, 5.0)
    run = BatchRenorm(C, 2, total=1000)  # a run of 1000 micro-batches: 50, 250, 400
    assert run.limits(50) == (1.0, 0.0) and run.limits(250)[1] == 5.0
    assert run.limits(400) == (3.0, 5.0) and run.limits(399)[0] < 3.0


@pytest.mark.parametrize("shape", [(8, C), (8, C, 5)], ids=["NC", "NCL"])
def test_warmup_is_batchnorm_in_training(shape):
    brn = _layer("brn")  # outside a run: 5000 micro-batches of warm-up
    bn = _layer("bn")
    for step in range(3):
        x = _x(shape, seed=step)
        torch.testing.assert_close(brn(x), bn(x), rtol=1e-12, atol=1e-12)


def test_grouped_forward_equals_separate_micro_batches():
    spec = "brn:total=12,warmup=0.1,relax=0.5,momentum=0.2"
    grouped, single = _layer(spec, 2), _layer(spec, 2)
    for step in range(3):
        x = _x((8, C, 3), seed=step)
        expected = torch.cat([single(x[2 * k:2 * k + 2]) for k in range(4)])
        torch.testing.assert_close(grouped(x), expected, rtol=1e-12, atol=1e-12)
    for (name, a), (_, b) in zip(grouped.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_eval_divides_by_the_running_std_whatever_eps():
    """Eval: y = weight (x - mu) / sigma + bias with the running sigma, which already holds
    eps (sigma_B = sqrt(var_B + eps)); eps = 0.1 makes any other placement visible."""
    layer = _layer("brn:eps=0.1,total=4,warmup=0,relax=0")
    for step in range(3):
        layer(_x((8, C, 5), seed=step))
    layer.eval()
    x = _x((8, C, 5), seed=9)
    view = (1, C, 1)
    want = (layer.weight.view(view) * (x - layer.running_mean.view(view))
            / layer.running_std.view(view) + layer.bias.view(view))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
