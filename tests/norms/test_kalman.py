"""BKN's pieces in isolation: the update against hand numbers and the mixture it stands for,
the analytic moment rules against Monte Carlo, analytic vs sampled transitions, and one BKN
layer's forward against a by-hand computation."""
import math

import pytest
import torch
from torch import nn

from bknbench.norms.kalman import BatchKalmanNorm, Path, Posterior, SumPrior
from bknbench.kernels.reference import kalman_update, affine_moments, relu_moments, normalize
from bknbench.norms.transitions import op_moments, sampled_moments
from bknbench.kernels.fused import group_moments
from bknbench.kernels.relu import relu_affine_moments
from bknbench.norms.batch import GroupedBatchNorm
from bknbench.norms.registry import parse_spec



D = torch.float64


def _t(*v):
    return torch.tensor(v, dtype=D).reshape(1, -1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- kalman_update
def test_update_against_hand_numbers():
    # p = 0.25: mu = 0.25*3 + 0.75*1 = 1.5
    # var = 0.25*4 + 0.75*2 + 0.25*0.75*(1-3)^2 = 1 + 1.5 + 0.75 = 3.25
    mu, var = kalman_update(_t(1.0), _t(2.0), _t(3.0), _t(4.0), 0.25)
    assert mu.item() == pytest.approx(1.5, abs=1e-14)
    assert var.item() == pytest.approx(3.25, abs=1e-14)
    # two channels, p = 0.9: mu = 0.9*[0, 2] + 0.1*[1, -1] = [0.1, 1.7]
    # var = 0.9*[1, 3] + 0.1*[0.5, 2] + 0.09*[1, 9] = [0.95+0.09, 2.9+0.81]
    mu, var = kalman_update(_t(1.0, -1.0), _t(0.5, 2.0), _t(0.0, 2.0), _t(1.0, 3.0), 0.9)
    torch.testing.assert_close(mu, _t(0.1, 1.7), rtol=0, atol=1e-14)
    torch.testing.assert_close(var, _t(1.04, 3.71), rtol=0, atol=1e-14)


def test_update_endpoints():
    g = _gen(0)
    m, mu_hat = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    s, var_hat = torch.rand(3, 5, generator=g, dtype=D) + 0.5, torch.rand(3, 5, generator=g,
                                                                          dtype=D) + 0.5
    mu, var = kalman_update(m, s, mu_hat, var_hat, 0.0)
    assert torch.equal(mu, m) and torch.equal(var, s)
    mu, var = kalman_update(m, s, mu_hat, var_hat, 1.0)  # the prediction alone
    torch.testing.assert_close(mu, mu_hat, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(var, var_hat, rtol=1e-14, atol=1e-14)


def test_guard_returns_observation_exactly():
    m, s = _t(1.0, 2.0), _t(1.0, 1.0)
    mu_hat = _t(5.0, -3.0)
    # ratios 150 and 50: the average 100 reaches the guard although one channel is below
    mu, var = kalman_update(m, s, mu_hat, _t(150.0, 50.0), 0.9)
    assert torch.equal(mu, m) and torch.equal(var, s)
    mu, var = kalman_update(m, s, mu_hat, _t(400.0, 400.0), 0.9)
    assert torch.equal(mu, m) and torch.equal(var, s)
    # just below: fused
    mu, var = kalman_update(m, s, mu_hat, _t(149.0, 50.0), 0.9)
    torch.testing.assert_close(mu, 0.9 * mu_hat + 0.1 * m)
    # a custom guard
    mu, var = kalman_update(m, s, mu_hat, _t(3.0, 3.0), 0.9, guard=2.0)
    assert torch.equal(mu, m) and torch.equal(var, s)
    # undefined ratio (0/0): not trusted
    mu, var = kalman_update(_t(1.0), _t(0.0), _t(4.0), _t(0.0), 0.5)
    assert torch.equal(mu, _t(1.0)) and torch.equal(var, _t(0.0))


def test_update_is_the_mixture_mean_and_variance_monte_carlo():
    p, m, s, mu_hat, var_hat = 0.3, 1.0, 0.5, -1.5, 2.0
    g = _gen(1)
    n = 400_000
    pick = torch.rand(n, generator=g, dtype=D) < p
    z = torch.where(pick, mu_hat + math.sqrt(var_hat) * torch.randn(n, generator=g, dtype=D),
                    m + math.sqrt(s) * torch.randn(n, generator=g, dtype=D))
    mu, var = kalman_update(_t(m), _t(s), _t(mu_hat), _t(var_hat), p)
    # exact mixture algebra
    assert mu.item() == pytest.approx(p * mu_hat + (1 - p) * m, abs=1e-14)
    assert var.item() == pytest.approx(p * (var_hat + mu_hat**2) + (1 - p) * (s + m**2)
                                       - mu.item() ** 2, abs=1e-12)
    # and Monte Carlo (standard errors ~0.003 and ~0.005)
    assert z.mean().item() == pytest.approx(mu.item(), abs=0.015)
    assert z.var().item() == pytest.approx(var.item(), abs=0.03)


def test_update_gradient_flows_into_a_tensor_gain():
    p = torch.tensor(0.4, dtype=D, requires_grad=True)
    mu, var = kalman_update(_t(1.0), _t(2.0), _t(3.0), _t(4.0), p)
    (mu.sum() + var.sum()).backward()
    # d mu/dp = mu_hat - m = 2; d var/dp = var_hat - s + (1 - 2p) d^2 = 2 + 0.2 * 4 = 2.8
    assert p.grad.item() == pytest.approx(4.8, abs=1e-12)


# ---------------------------------------------------------------- analytic moment rules
@pytest.mark.parametrize("mean, var", [(0.0, 1.0), (1.5, 0.5), (-1.0, 2.0), (-3.0, 1.0),
                                       (2.0, 4.0), (0.3, 0.01)])
def test_relu_moments_match_monte_carlo(mean, var):
    n = 400_000
    z = mean + math.sqrt(var) * torch.randn(n, generator=_gen(2), dtype=D)
    y = torch.relu(z)
    m1, v1 = relu_moments(_t(mean), _t(var))
    d = y - y.mean()
    se_m = y.std().item() / math.sqrt(n)
    se_v = math.sqrt(((d**4).mean() - y.var() ** 2).item() / n)  # standard error of the var
    assert m1.item() == pytest.approx(y.mean().item(), abs=6 * se_m)
    assert v1.item() == pytest.approx(y.var().item(), abs=6 * se_v)


def test_relu_moments_limits():
    # far positive: identity; far negative: zero
    m1, v1 = relu_moments(_t(20.0), _t(1.0))
    assert m1.item() == pytest.approx(20.0) and v1.item() == pytest.approx(1.0)
    m1, v1 = relu_moments(_t(-20.0), _t(1.0))
    assert abs(m1.item()) < 1e-12 and abs(v1.item()) < 1e-12
    # standard normal: E = 1/sqrt(2 pi), Var = 1/2 - 1/(2 pi)
    m1, v1 = relu_moments(_t(0.0), _t(1.0))
    assert m1.item() == pytest.approx(1 / math.sqrt(2 * math.pi), abs=1e-12)
    assert v1.item() == pytest.approx(0.5 - 1 / (2 * math.pi), abs=1e-12)


def _mc_channel_moments(op, mean, var, spatial, draws, seed):
    """Per-channel mean and variance of op(z), z ~ N(mean_c, var_c) independently per
    channel and position, over draws and output positions."""
    c = mean.shape[1]
    view = (1, c) + (1,) * len(spatial)
    z = mean.view(view) + var.sqrt().view(view) * torch.randn((draws, c) + spatial,
                                                              generator=_gen(seed), dtype=D)
    with torch.no_grad():
        y = op(z)
    y = y.reshape(draws, y.shape[1], -1)
    return y.mean(dim=(0, 2)), y.var(dim=(0, 2), correction=0)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
def test_affine_moments_match_monte_carlo(kind):
    torch.manual_seed(3)
    c_in, c_out = 3, 4
    if kind == "conv1d":
        op, spatial = nn.Conv1d(c_in, c_out, 3, bias=True), (10,)
    elif kind == "conv2d":
        op, spatial = nn.Conv2d(c_in, c_out, 3, stride=2, bias=True), (7, 7)
    else:
        op, spatial = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 5, c_out)), (5,)
    op = op.double()
    mean, var = _t(0.5, -1.0, 2.0), _t(1.0, 0.25, 2.0)
    lin = op if kind != "linear" else op[1]
    m_a, v_a = affine_moments(mean, var, lin.weight, lin.bias)
    m_mc, v_mc = _mc_channel_moments(op, mean, var, spatial, 20_000, seed=4)
    assert m_a.shape == (1, c_out) and v_a.shape == (1, c_out)
    torch.testing.assert_close(m_a[0], m_mc, rtol=0, atol=0.03 * v_mc.sqrt().max().item())
    torch.testing.assert_close(v_a[0], v_mc, rtol=0.03, atol=1e-3)


def test_affine_moments_by_hand():
    w = torch.tensor([[[1.0, 2.0], [0.5, -1.0]]], dtype=D)  # (C_out=1, C_in=2, k=2)
    mean, var = _t(1.0, 2.0), _t(3.0, 4.0)
    m, v = affine_moments(mean, var, w, torch.tensor([0.5], dtype=D))
    assert m.item() == pytest.approx(3 * 1 + (-0.5) * 2 + 0.5)
    assert v.item() == pytest.approx(5 * 3 + 1.25 * 4)


@pytest.mark.parametrize("borders", ["exact", "ignore"])
def test_avg_pool_moments_divide_variance_by_area(borders):
    # full, non-overlapping windows: both rules divide the variance by the window area
    mean, var = _t(1.0, -2.0), _t(4.0, 8.0)
    m, v, shape = op_moments(nn.AvgPool2d(2), mean, var, (4, 6), borders)
    assert torch.allclose(m, mean) and torch.allclose(v, var / 4) and shape == (2, 3)
    m, v, shape = op_moments(nn.AvgPool1d(3), mean, var, (9,), borders)
    assert torch.allclose(v, var / 3) and shape == (3,)
    with pytest.raises(TypeError, match="sampled"):
        op_moments(nn.MaxPool1d(2), mean, var, (4,))


# ---------------------------------------------------------------- transitions
def _source(mean, var, in_shape):
    """A BKN layer that has 'run' with the given posterior (G, C) and input positions."""
    src = BatchKalmanNorm(mean.shape[1], 2).double()
    src.posterior = Posterior(mean, var, mean, var)
    src.in_shape = in_shape
    return src


def test_analytic_and_sampled_transitions_agree_on_gaussian_input():
    torch.manual_seed(5)
    conv = nn.Conv1d(3, 4, 3).double()  # no padding: the analytic rule ignores borders
    mean = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]], dtype=D)  # two groups
    var = torch.tensor([[1.0, 0.5, 2.0], [0.3, 1.5, 1.0]], dtype=D)
    path = Path(_source(mean, var, (12,)), (nn.ReLU(), conv))
    m_a, v_a = path.predict("raw", "analytic", 0)
    torch.manual_seed(6)
    m_s, v_s = path.predict("raw", "sampled", 8000)
    assert m_a.shape == m_s.shape == (2, 4)
    torch.testing.assert_close(m_s, m_a, rtol=0, atol=0.03)
    torch.testing.assert_close(v_s, v_a, rtol=0.04, atol=0.01)


def test_sampled_moments_gradients_flow_into_weights():
    lin = nn.Linear(6, 2).double()
    mean, var = torch.zeros(1, 3, dtype=D), torch.ones(1, 3, dtype=D)
    m, v = sampled_moments(mean, var, (nn.ReLU(), nn.Flatten(), lin), (2,), 16)
    (m.sum() + v.sum()).backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_sum_prior_adds_means_and_variances():
    mean, var = _t(0.5, -1.0), _t(1.0, 2.0)
    src = _source(mean, var, (4,))
    a = Path(src, (nn.ReLU(),))
    b = Path(src, (), tap="input")
    m, v = SumPrior((a, b)).predict("raw", "analytic", 0)
    m_r, v_r = relu_moments(mean, var)
    torch.testing.assert_close(m, m_r + mean)
    torch.testing.assert_close(v, v_r + var)


def test_path_without_a_posterior_raises():
    src = BatchKalmanNorm(3, 2)
    with pytest.raises(RuntimeError, match="predecessor"):
        Path(src, ()).predict("raw", "analytic", 0)


# ---------------------------------------------------------------- the layer
def _chain(spec, c=4, width=5):
    """first BKN -> ReLU -> 1x1 Conv1d -> second BKN (wired by hand)."""
    first = parse_spec(spec).build(c, 2).double()
    lin = nn.Conv1d(c, width, 1, bias=False).double()
    second = parse_spec(spec).build(width, 2).double()
    second.prior = Path(first, (nn.ReLU(), lin))
    return first, lin, second


@pytest.mark.parametrize("spec", ["bkn", "bkn:p=0.5", "bkn:gain=adaptive,n0=10",
                                  "bkn:gain=learnable,p=0.7", "bkn:propagate=output"])

def test_layer_forward_matches_a_by_hand_computation(spec):
    torch.manual_seed(7)
    first, lin, second = _chain(spec)
    with torch.no_grad():
        first.weight.uniform_(0.5, 1.5)
        first.bias.uniform_(-0.5, 0.5)
    x = torch.randn(8, 4, 6, dtype=D) * 2 + 1  # 4 groups of 2 samples x 6 positions
    h = lin(torch.relu(first(x)))
    y = second(h)
    # first layer: plain per-group BN statistics
    m1, s1 = group_moments(x, 4)
    torch.testing.assert_close(first.posterior.mu, m1, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(first.posterior.var, s1, rtol=1e-13, atol=1e-14)
    # second layer: prediction through ReLU + Linear, fused with the observation
    if second.propagate == "raw":
        start = (m1, s1)
    else:  # the moments of the first layer's normalized output
        scale = first.weight / torch.sqrt(s1 + first.eps)
        start = (first.bias.expand_as(m1), s1 * scale**2)
    mu_hat, var_hat = affine_moments(*relu_moments(*start), lin.weight)
    m2, s2 = group_moments(h, 4)
    p = {"bkn": 0.9, "bkn:p=0.5": 0.5, "bkn:gain=adaptive,n0=10": 10 / (10 + 12),
         "bkn:gain=learnable,p=0.7": 0.7, "bkn:propagate=output": 0.9}[spec]
    if second.gain == "learnable":  # p = 1 - sigmoid(logit), the logit at log((1 - p) / p)
        logit = second.gain_logit.item()  # float32: p is 0.7 to about 1e-7
        assert logit == pytest.approx(math.log(0.3 / 0.7), abs=1e-6)
        p = 1 - 1 / (1 + math.exp(-logit))
    p_used = float(torch.as_tensor(second.weight_on_prediction(12)).detach())
    assert p_used == pytest.approx(p, abs=1e-7)
    mu, var = kalman_update(m2, s2, mu_hat, var_hat, p)
    assert not torch.allclose(mu, m2)  # the prediction was used (guard not triggered)
    torch.testing.assert_close(second.posterior.mu, mu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(second.posterior.var, var, rtol=1e-10, atol=1e-10)
    expected = normalize(h, mu, var, second.weight, second.bias, second.eps)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    # running statistics: one EMA step per group of (mu, var + (1 - p)^2 s / (n - 1)) from
    # (0, 1), n = 2 x 6 values: the n / (n - 1) factor on the observed part only
    r_mean, r_var = torch.zeros(5, dtype=D), torch.ones(5, dtype=D)
    for g in range(4):
        r_mean = 0.9 * r_mean + 0.1 * mu[g]
        r_var = 0.9 * r_var + 0.1 * (var[g] + (1 - p) ** 2 * s2[g] / 11)
    torch.testing.assert_close(second.running_mean, r_mean.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(second.running_var, r_var.detach(), rtol=1e-10, atol=1e-10)


def test_a_sampled_prediction_is_the_monte_carlo_estimate():
    """transition=sampled on a path through ReLU and a convolution: the prediction is
    sampled_moments of the source's posterior through the path's ops, with the same draws."""
    first, lin, second = _chain("bkn:transition=sampled")
    second(lin(torch.relu(first(torch.randn(8, 4, 6, dtype=D)))))
    path = second.prior
    torch.manual_seed(11)
    got = path.predict("raw", "sampled", 3)
    torch.manual_seed(11)
    want = sampled_moments(first.posterior.mu, first.posterior.var, path.ops, first.in_shape, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("n0, n_values", [(64.0, 2), (64.0, 64), (10.0, 500)])
def test_adaptive_gain_is_n0_over_n0_plus_n(n0, n_values):
    layer = BatchKalmanNorm(4, 2, gain="adaptive", n0=n0)
    assert layer.weight_on_prediction(n_values) == pytest.approx(n0 / (n0 + n_values))


def test_adaptive_gain_counts_positions():
    """n is norm_batch x positions: a group of 2 samples with 6 positions is 12 values."""
    first, lin, second = _chain("bkn:gain=adaptive,n0=12")
    seen = []
    orig = second.weight_on_prediction
    second.weight_on_prediction = lambda n: seen.append(n) or orig(n)
    x = torch.randn(4, 4, 6, dtype=D)
    second(lin(torch.relu(first(x))))
    assert seen == [12]
    assert orig(12) == pytest.approx(0.5)


def test_learnable_gain_starts_at_p_and_receives_gradient():
    first, lin, second = _chain("bkn:gain=learnable,p=0.8")
    assert second.weight_on_prediction(12).item() == pytest.approx(0.8, abs=1e-6)
    names = [n for n, _ in second.named_parameters()]
    assert "gain_logit" in names
    x = torch.randn(8, 4, 6, dtype=D)
    y = second(lin(torch.relu(first(x))))
    (y.pow(3) * torch.arange(5, dtype=D).view(1, 5, 1)).sum().backward()
    assert second.gain_logit.grad is not None
    assert second.gain_logit.grad.abs().item() > 0


def test_layer_without_prior_is_per_group_bn():
    torch.manual_seed(8)
    bkn, bn = BatchKalmanNorm(4, 2).double(), GroupedBatchNorm(4, 2).double()
    for _ in range(3):
        x = torch.randn(8, 4, 3, dtype=D)
        torch.testing.assert_close(bkn(x), bn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bkn.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bkn.running_var, bn.running_var, rtol=1e-12, atol=1e-12)


def test_eval_clears_posterior_and_uses_running_stats():
    first, lin, second = _chain("bkn")
    x = torch.randn(8, 4, 6, dtype=D)
    second(lin(torch.relu(first(x))))
    assert second.posterior is not None
    second.eval()
    h = torch.randn(3, 5, 6, dtype=D)
    y = second(h)
    assert second.posterior is None
    rm, rv = second.running_mean[:, None], second.running_var[:, None]
    expected = (h - rm) / torch.sqrt(rv + second.eps)
    torch.testing.assert_close(y, expected * second.weight[:, None] + second.bias[:, None])


# ---------------------------------------------------------------- the fused layer's backward
def _reference_chain(first, lin, second, x):
    """The layer pair computed from the reference pieces (group_moments, kalman_update,
    normalize) with plain autograd: what the fused node must equal, gradients included."""
    g = x.shape[0] // 2
    m1, s1 = group_moments(x, g)
    h = lin(torch.relu(normalize(x, m1, s1, first.weight, first.bias, first.eps)))
    m2, s2 = group_moments(h, g)
    start = (m1, s1)  # no prior: the first layer's posterior is its observation
    if second.propagate == "output":
        start = Posterior(m1, s1, m1, s1).output_moments(first)
    mu_hat, var_hat = affine_moments(*relu_moments(*start), lin.weight)
    mu, var = kalman_update(m2, s2, mu_hat, var_hat, second.weight_on_prediction(12),
                            second.guard)
    return normalize(h, mu, var, second.weight, second.bias, second.eps)


@pytest.mark.parametrize("spec", ["bkn", "bkn:p=0.5,propagate=output",
                                  "bkn:gain=learnable,p=0.7", "bkn:guard=1e-6"])
def test_fused_layer_gradients_equal_the_reference_composition(spec, backend):
    """The hand-written backward of the fused BKN node (x, prediction, gain, affine, and the
    posterior handed to the next layer) against autograd through the reference functions.
    guard=1e-6 rejects every prediction: the gain then gets no gradient."""
    torch.manual_seed(11)
    first, lin, second = _chain(spec)
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    params = [first.weight, first.bias, lin.weight, second.weight, second.bias] + (
        [second.gain_logit] if second.gain == "learnable" else [])
    x = (torch.randn(8, 4, 6, dtype=D) * 2 + 1).requires_grad_()
    w = torch.randn(8, 5, 6, dtype=D)  # a loss that weighs every output differently

    def grads(forward):
        for t in params + [x]:
            t.grad = None
        (forward() * w).sum().backward()
        return [t.grad.clone() if t.grad is not None else torch.zeros_like(t)
                for t in params + [x]]

    fused = grads(lambda: second(lin(torch.relu(first(x)))))
    reference = grads(lambda: _reference_chain(first, lin, second, x))
    for name, a, b in zip(["w1", "b1", "conv", "w2", "b2", "gain", "x"][:len(params)]
                          + ["x"], fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert fused[2].abs().sum() > 0  # gradient reached the transition's weights


@pytest.mark.parametrize("groups", [1, 3, 6])  # one group; groups of 2; of 1 sample
def test_fused_node_passes_gradcheck(groups, backend):
    """Numerical vs analytic Jacobian of the fused node, all five outputs, tensor gain."""
    from bknbench.kernels.fused import group_normalize

    g = _gen(3)
    x = torch.randn(6, 3, 4, generator=g, dtype=D, requires_grad=True)
    mu_hat = torch.randn(groups, 3, generator=g, dtype=D, requires_grad=True)
    var_hat = (torch.rand(groups, 3, generator=g, dtype=D) + 0.5).requires_grad_()
    p = torch.tensor(0.6, dtype=D, requires_grad=True)
    weight = (torch.rand(3, generator=g, dtype=D) + 0.5).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: group_normalize(*a, groups, 100.0, 1e-5),
        (x, mu_hat, var_hat, p, weight, bias))
    # without a prior: per-group BN
    assert torch.autograd.gradcheck(
        lambda x, w, b: group_normalize(x, None, None, None, w, b, groups, 100.0, 1e-5),
        (x, weight, bias))


def test_fused_node_values_equal_the_reference_functions(backend):
    from bknbench.kernels.fused import group_normalize

    g = _gen(9)
    x = torch.randn(8, 3, 5, generator=g, dtype=D) * 2 + 1
    mu_hat, var_hat = torch.randn(4, 3, generator=g, dtype=D), torch.rand(4, 3, dtype=D) + 1
    w, b = torch.rand(3, generator=g, dtype=D) + 0.5, torch.randn(3, generator=g, dtype=D)
    y, m, s, mu, var = group_normalize(x, mu_hat, var_hat, 0.7, w, b, 4)
    m_r, s_r = group_moments(x, 4)
    mu_r, var_r = kalman_update(m_r, s_r, mu_hat, var_hat, 0.7)
    for a, r in [(m, m_r), (s, s_r), (mu, mu_r), (var, var_r),
                 (y, normalize(x, mu_r, var_r, w, b, 1e-5))]:
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_group_moments_passes_gradcheck():
    x = torch.randn(6, 3, 5, generator=_gen(4), dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: group_moments(x, 3), (x,))
    assert torch.autograd.gradcheck(lambda x: group_moments(x, 3)[0], (x,))  # mean alone


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d-bias"])
def test_fused_relu_affine_equals_the_reference_rules(kind, backend):
    """relu_affine_moments: the values of relu_moments then affine_moments, and their
    autograd gradients (inputs, weight, bias), including a channel near zero variance."""
    g = _gen(5)
    op = {"linear": nn.Linear(12, 5, bias=False), "conv1d": nn.Conv1d(3, 5, 3, bias=False),
          "conv2d": nn.Conv2d(3, 5, 3, bias=False), "conv2d-bias": nn.Conv2d(3, 5, 3)}[kind]
    op = op.double()
    c_in = 12 if kind == "linear" else 3
    mean = torch.randn(4, c_in, generator=g, dtype=D)
    var = torch.rand(4, c_in, generator=g, dtype=D) + 0.1
    var[0, 0] = 1e-14  # below the floor: a constant input
    weights = torch.randn(4, 5, generator=g, dtype=D)

    def run(fn):
        m, v = mean.clone().requires_grad_(), var.clone().requires_grad_()
        op.zero_grad()
        out_m, out_v = fn(m, v)
        (out_m * weights + out_v * weights.flip(0)).sum().backward()
        grads = [m.grad, v.grad, op.weight.grad] + ([op.bias.grad] if op.bias is not None
                                                     else [])
        return [out_m.detach(), out_v.detach()] + grads

    fused = run(lambda m, v: relu_affine_moments(m, v, op.weight, op.bias))
    reference = run(lambda m, v: affine_moments(*relu_moments(m, v), op.weight, op.bias))
    for name, a, b in zip(["mean", "var", "g_mean", "g_var", "g_weight", "g_bias"], fused,
                          reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_relu_affine_passes_gradcheck(backend):
    g = _gen(6)
    mean = torch.randn(2, 3, generator=g, dtype=D, requires_grad=True)
    var = (torch.rand(2, 3, generator=g, dtype=D) + 0.2).requires_grad_()
    w = torch.randn(4, 3, 2, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(relu_affine_moments, (mean, var, w, b))
    assert torch.autograd.gradcheck(lambda m, v, w: relu_affine_moments(m, v, w)[1],
                                    (mean, var, w))  # one output unused


@pytest.mark.parametrize("spec", ["bkn", "bkn:transition=sampled", "bkn:borders=ignore"])
@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_predictions_stay_float32_under_autocast(spec, model):
    """bf16 autocast on the PyTorch nodes (what runs on a GPU): the prediction keeps the
    dtype of the statistics (float32), so the fused update does not meet a bf16 operand."""
    from bknbench.kernels import native
    from bknbench.models.registry import make_model

    torch.manual_seed(0)
    with native.disabled():
        m = make_model(model, parse_spec(spec), 2, (1, 16), 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(torch.randn(8, 1, 16))
        out.float().sum().backward()
    layers = [x for x in m.modules() if isinstance(x, BatchKalmanNorm) and x.prior]
    assert layers and all(x.posterior.mu_hat.dtype == torch.float32 for x in layers)
    assert out.dtype == torch.bfloat16
