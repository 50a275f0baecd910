"""BKN's running variance (`running=`) against the truth: i.i.d. Gaussian input of known
variance, a prediction that is right, every rule's long-run average against its expected value
(`observed`: the population variance for every p), and p = 0 exactly BN; on both backends (the
C++ kernel updates the buffers in its forward, the PyTorch node through `update_running`)."""
import math

import pytest
import torch

from bknbench.kernels.reference import running_variance
from bknbench.norms.batch import GroupedBatchNorm
from bknbench.norms.kalman import BatchKalmanNorm

D = torch.float64
SIGMA2 = 2.5  # the input's true variance
MU = 1.0  # and mean


class Truth:
    """A prior that predicts the population statistics exactly, (G, C) per forward."""

    def __init__(self, channels, groups):
        self.shape = (groups, channels)

    def predict(self, propagate, transition, draws, borders="exact"):
        return (torch.full(self.shape, MU, dtype=D), torch.full(self.shape, SIGMA2, dtype=D))


def _layer(channels, b, groups, p, running, momentum=0.01):
    # no guard: at 2 values per statistic the mean of var_hat / s is infinite and the
    # authors' guard would reject most predictions (tested on its own below)
    layer = BatchKalmanNorm(channels, b, p=p, running=running, momentum=momentum,
                            guard=1e30).double()
    layer.prior = Truth(channels, groups)
    layer.running_var.fill_(3 * SIGMA2)  # far from the truth: the start must wash out
    return layer


def _train(layer, sample_shape, b, groups, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        layer(MU + math.sqrt(SIGMA2) * torch.randn((b * groups,) + sample_shape, generator=g,
                                                  dtype=D))
    return layer.running_var


def _expected(rule, p, n):
    """E[running variance] / sigma^2 with a right prediction, n values per statistic:
    E[s] = (n-1)/n, E[(m - mu_hat)^2] = 1/n, so E[posterior] = p + (1-p)(n-1)/n + p(1-p)/n."""
    post = p + (1 - p) * (n - 1) / n + p * (1 - p) / n
    return {"observed": 1.0, "posterior": post * n / (n - 1), "authors": post}[rule]


@pytest.mark.parametrize("sample_shape", [(256,), (64, 2, 2)], ids=["NC", "NCHW"])
@pytest.mark.parametrize("b", [2, 4])
@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("rule", ["observed", "posterior", "authors"])
def test_running_variance_against_the_truth(rule, p, b, sample_shape, backend):
    """32 forwards of 64 groups = 2048 EMA updates at momentum 0.01 (the start decays by
    0.99^2048 ~ 1e-9); the channels are independent, so their average has a standard error
    from their spread. Bound: 4 standard errors and 2% of sigma^2 (the standard error is
    0.1-0.4% here; the rules differ by 4.5% or more at these sizes)."""
    groups, channels = 64, sample_shape[0]
    n = b * math.prod(sample_shape[1:])
    layer = _layer(channels, b, groups, p, rule)
    run = _train(layer, sample_shape, b, groups, steps=32) / SIGMA2
    se = run.std().item() / math.sqrt(channels)
    want = _expected(rule, p, n)
    assert abs(run.mean().item() - want) < min(4 * se, 0.02), (run.mean().item(), want, se)
    assert layer.running_mean.sub(MU).abs().mean() < 0.05 * math.sqrt(SIGMA2)


@pytest.mark.parametrize("rule, eval_std", [("posterior", math.sqrt(1 / 1.99)),
                                             ("observed", 1.0)])
def test_the_issue_figure_and_its_fix(rule, eval_std):
    """(N, C), micro-batch 2, p = 0.9, a right prediction: the old rule (`posterior`) ends at
    (0.9 + 0.1 / 2 + 0.09 / 2) x 2 = 1.99 sigma^2, so the layer's eval outputs have std
    0.71 where training saw 1; `observed` ends at sigma^2 and keeps 1."""
    layer = _layer(256, 2, 64, 0.9, rule)
    _train(layer, (256,), 2, 64, steps=32)
    layer.eval()
    g = torch.Generator().manual_seed(5)
    y = layer(MU + math.sqrt(SIGMA2) * torch.randn(512, 256, generator=g, dtype=D))
    assert y.std().item() == pytest.approx(eval_std, abs=0.02)


@pytest.mark.parametrize("rule", ["observed", "posterior", "authors"])
def test_p0_and_rejected_predictions_reduce_to_the_rule_by_hand(rule):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(3, 4, generator=g, dtype=D) + 0.5
    var = s + torch.rand(3, 4, generator=g, dtype=D)
    pe = torch.tensor([[0.0], [0.9], [0.5]], dtype=D)  # per group (guard_scope=group)
    got = running_variance(var, s, pe, 5, rule)
    by_hand = {"observed": var + (1 - pe) ** 2 * s / 4, "posterior": var * 5 / 4,
               "authors": var}[rule]
    torch.testing.assert_close(got, by_hand, rtol=1e-14, atol=1e-14)
    if rule == "observed":  # p = 0 (posterior = observation): BatchNorm's s n / (n - 1)
        torch.testing.assert_close(running_variance(s, s, 0.0 * pe, 5, rule), s * 5 / 4,
                                   rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("sample_shape", [(6,), (6, 3, 2)])
def test_p0_with_a_prior_keeps_bn_running_statistics(sample_shape, backend):
    """p = 0 with a prediction present: the running buffers equal BatchNorm's to 1e-9."""
    b, groups = 2, 4
    bkn = _layer(sample_shape[0], b, groups, 0.0, "observed", momentum=0.1)
    bn = GroupedBatchNorm(sample_shape[0], b).double()
    bn.running_var.fill_(3 * SIGMA2)
    for layer in (bkn, bn):
        _train(layer, sample_shape, b, groups, steps=5)
    torch.testing.assert_close(bkn.running_var, bn.running_var, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bkn.running_mean, bn.running_mean, rtol=1e-9, atol=1e-9)


def test_rejected_prediction_counts_as_p0_in_the_running_variance(backend):
    """The guard rejects (var_hat / s >= guard): the layer is BN, and so is its running
    variance under `observed` (the weight p the prediction *got*, 0, enters the rule)."""
    bkn = _layer(5, 2, 4, 0.9, "observed", momentum=0.1)
    bkn.guard = 1e-3  # every prediction rejected: here var_hat / s is about 1
    bn = GroupedBatchNorm(5, 2).double()
    bn.running_var.fill_(3 * SIGMA2)
    for layer in (bkn, bn):
        _train(layer, (5, 3), 2, 4, steps=3)
    torch.testing.assert_close(bkn.running_var, bn.running_var, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule", ["observed", "posterior", "authors"])
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("scope,guard", [("layer", 100.0), ("group", 100.0), ("group", 1.0)])
@pytest.mark.parametrize("groups", [1, 4])
def test_the_kernel_updates_the_buffers_as_the_reference(rule, prior, scope, guard, groups):
    """One forward of `group_normalize` with running buffers, float32: the C++ kernel (in
    its forward, from its own guard decision) and the PyTorch node against the reference,
    `update_running` after `guarded_gain` (guard 1 with scope "group": some groups reject,
    some trust)."""
    from bknbench.kernels import native
    from bknbench.kernels.fused import Running, group_normalize, update_running
    from bknbench.kernels.reference import guarded_gain

    gen = torch.Generator().manual_seed(groups)
    x = torch.randn(2 * groups, 5, 3, generator=gen) * 2 + 1
    mu_hat = torch.randn(groups, 5, generator=gen) if prior else None
    # var_hat / s about 0.15, 0.3, 2.4 and 4.8 (s about 3.3) per group: guard 1 splits them
    scale = torch.tensor([0.5, 1.0, 8.0, 16.0])[:groups, None]
    var_hat = (torch.rand(groups, 5, generator=gen) + 0.5) * scale if prior else None
    start = torch.rand(2, 5, generator=gen) + 0.5
    args = (x, mu_hat, var_hat, 0.7 if prior else None, torch.ones(5), torch.zeros(5), groups,
            guard, 1e-5, scope)

    def updated():
        running = Running(start[0].clone(), start[1].clone(), 0.1, rule)
        group_normalize(*args, running=running)
        return running

    ran = {}
    if native.module() is not None:
        ran["native"] = updated()
    with native.disabled():
        ran["torch"] = updated()
        _, m, s, mu, var = group_normalize(*args)
    want = Running(start[0].clone(), start[1].clone(), 0.1, rule)
    pe = guarded_gain(0.7, s, var_hat, guard, scope) if prior else None
    update_running(want, mu, var, s, pe, 6)
    if prior and scope == "group" and guard == 1.0:  # the case decides both ways
        assert 0 < (pe == 0).sum() < groups or groups == 1
    assert not torch.equal(want.var, start[1])
    for got in ran.values():
        torch.testing.assert_close(got.mean, want.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.var, want.var, rtol=1e-6, atol=1e-6)
