"""The guard's scope (`guard_scope=layer|group`): one decision over all groups (the authors')
or one per group, in the reference, the autograd node and the C++ kernel (the `backend`
fixture), values and gradients; and the BKN layer that uses it."""
import pytest
import torch

from bknbench.kernels.fused import group_moments, group_normalize
from bknbench.kernels.reference import guarded_gain, kalman_update, normalize, trusted
from bknbench.norms.kalman import BatchKalmanNorm

D = torch.float64


def _case(seed=0, groups=4, c=3):
    """x with groups 0 and 2 predicted near their observation, group 1 with var_hat / s
    around 1000 (the guard rejects it) and group 3 around 5; the layer average is ~250."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * groups, c, 5, generator=g, dtype=D) * 2 + 1
    m, s = group_moments(x, groups)
    mu_hat = m + torch.randn(groups, c, generator=g, dtype=D) * 0.3
    ratio = torch.tensor([1.0, 1000.0, 1.5, 5.0], dtype=D)[:groups, None]
    var_hat = s * ratio * (1 + 0.1 * torch.rand(groups, c, generator=g, dtype=D))
    return x, mu_hat, var_hat


def test_trusted_by_hand():
    s = torch.ones(3, 2, dtype=D)
    var_hat = torch.tensor([[1.0, 3.0], [300.0, 100.0], [99.0, 99.0]], dtype=D)
    # layer: average (2 + 200 + 99) / 3 = 100.3 >= 100: nobody is trusted
    assert not trusted(s, var_hat, 100.0).item()
    assert trusted(s, var_hat, 100.0, "group").flatten().tolist() == [True, False, True]
    pe = guarded_gain(0.9, s, var_hat, 100.0, "group")
    assert pe.shape == (3, 1) and pe.flatten().tolist() == [0.9, 0.0, 0.9]
    assert guarded_gain(0.9, s, var_hat, 100.0).item() == 0.0


@pytest.mark.parametrize("scope", ["layer", "group"])
def test_kalman_update_per_group(scope):
    x, mu_hat, var_hat = _case()
    m, s = group_moments(x, 4)
    mu, var = kalman_update(m, s, mu_hat, var_hat, 0.9, scope=scope)
    if scope == "layer":  # the average ratio ~250: one rejection for every group
        assert torch.equal(mu, m) and torch.equal(var, s)
        return
    assert torch.equal(mu[1], m[1]) and torch.equal(var[1], s[1])  # group 1 rejected
    for k in (0, 2, 3):  # the others fused with p = 0.9
        mu_k, var_k = kalman_update(m[k:k + 1], s[k:k + 1], mu_hat[k:k + 1],
                                    var_hat[k:k + 1], 0.9, guard=1e30)
        torch.testing.assert_close(mu[k:k + 1], mu_k, rtol=0, atol=1e-14)
        torch.testing.assert_close(var[k:k + 1], var_k, rtol=0, atol=1e-14)


@pytest.mark.parametrize("scope", ["layer", "group"])
@pytest.mark.parametrize("gain", ["float", "tensor"])
def test_node_equals_the_reference_values_and_gradients(scope, gain, backend):
    x, mu_hat, var_hat = _case(seed=1)
    w = torch.rand(3, dtype=D) + 0.5
    b = torch.randn(3, dtype=D)
    p0 = 0.7 if gain == "float" else torch.tensor(0.7, dtype=D)
    leaves = [t.clone().requires_grad_() for t in (x, mu_hat, var_hat, w, b)]
    weights = [torch.randn((8, 3, 5) if k == 0 else (4, 3), generator=torch.Generator()
                           .manual_seed(k), dtype=D) for k in range(5)]

    def run(fn):
        for t in leaves:
            t.grad = None
        p = p0.clone().requires_grad_() if gain == "tensor" else p0
        outs = fn(*leaves, p)
        sum((o * wt).sum() for o, wt in zip(outs, weights)).backward()
        return [o.detach() for o in outs] + [t.grad for t in leaves] + (
            [p.grad] if gain == "tensor" else [])

    def reference(x, mu_hat, var_hat, w, b, p):
        m, s = group_moments(x, 4)
        mu, var = kalman_update(m, s, mu_hat, var_hat, p, 100.0, scope)
        return normalize(x, mu, var, w, b, 1e-5), m, s, mu, var

    got = run(lambda x, mh, vh, w, b, p: group_normalize(x, mh, vh, p, w, b, 4, 100.0, 1e-5,
                                                         scope))
    want = run(reference)
    names = ["y", "m", "s", "mu", "var", "g_x", "g_mu_hat", "g_var_hat", "g_w", "g_b", "g_p"]
    for name, a, r in zip(names, got, want):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11, msg=name)
    if scope == "group":  # the rejected group got no gradient into its prediction
        assert torch.all(got[6][1] == 0) and torch.all(got[7][1] == 0)
        assert got[6][0].abs().sum() > 0


def test_node_passes_gradcheck_per_group(backend):
    x, mu_hat, var_hat = _case(seed=2)
    p = torch.tensor(0.6, dtype=D, requires_grad=True)
    w = (torch.rand(3, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=D, requires_grad=True)
    args = [t.clone().requires_grad_() for t in (x, mu_hat, var_hat)] + [p, w, b]
    assert torch.autograd.gradcheck(
        lambda *a: group_normalize(*a, 4, 100.0, 1e-5, "group"), tuple(args))


@pytest.mark.parametrize("scope", ["layer", "group"])
def test_layer_uses_its_guard_scope(scope, backend):
    """A BKN layer with a fixed prediction: per group, the posterior is the fusion where its
    group trusts it and the observation where not; the running variance uses the weight the
    prediction got in each group."""
    x, mu_hat, var_hat = _case(seed=3)

    class Fixed:
        def predict(self, *args):
            return mu_hat, var_hat

    layer = BatchKalmanNorm(3, 2, guard_scope=scope).double()
    layer.prior = Fixed()
    layer(x)
    m, s = group_moments(x, 4)
    mu, var = kalman_update(m, s, mu_hat, var_hat, 0.9, 100.0, scope)
    torch.testing.assert_close(layer.posterior.mu, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.posterior.var, var, rtol=1e-12, atol=1e-12)
    pe = torch.tensor([[0.9], [0.0], [0.9], [0.9]], dtype=D) if scope == "group" else 0.0
    target = var + (1 - torch.as_tensor(pe, dtype=D)) ** 2 * s / 9  # n = 2 x 5 values
    r_var = torch.ones(3, dtype=D)
    for k in range(4):
        r_var = 0.9 * r_var + 0.1 * target[k]
    torch.testing.assert_close(layer.running_var, r_var, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- exactly at the guard
# 2 groups of 2 samples, 2 channels: each (group, channel) is a +-1 around its mean, so s = 1
# exactly and var_hat / s = var_hat, in float32 as in float64
X_EDGE = [[1.0, 3.0], [-1.0, 1.0], [2.0, 0.0], [0.0, -2.0]]
M_EDGE = [[0.0, 2.0], [1.0, -1.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scope, var_hat, guard, trusts", [
    ("layer", [[4.0, 4.0], [4.0, 4.0]], 4.0, [False, False]),  # mean ratio 4 reaches 4
    ("layer", [[4.0, 4.0], [4.0, 4.0]], 4.0 + 2**-20, [True, True]),
    ("layer", [[2.0, 6.0], [4.0, 4.0]], 4.0, [False, False]),  # the mean over all: 4
    ("layer", [[2.0, 6.0], [4.0, 4.0]], 4.0 + 2**-20, [True, True]),
    ("group", [[4.0, 4.0], [2.0, 6.0]], 4.0, [False, False]),  # each group's mean: 4
    ("group", [[4.0, 4.0], [3.0, 4.0]], 4.0, [False, True]),  # group 1: 3.5 < 4
], ids=lambda v: str(v) if not isinstance(v, list) else None)
def test_the_guard_rejects_at_exactly_its_threshold(scope, var_hat, guard, trusts, dtype,
                                                    backend):
    """On the path training takes (the C++ kernel and the autograd node), a group whose
    average var_hat / s equals the guard is not trusted: its posterior is its observation;
    a trusted one is p mu_hat + (1 - p) m with p = 0.5, mu_hat = 5."""
    x = torch.tensor(X_EDGE, dtype=dtype, requires_grad=True)
    mu_hat = torch.full((2, 2), 5.0, dtype=dtype)
    var_hat = torch.tensor(var_hat, dtype=dtype)
    y, m, s, mu, var = group_normalize(x, mu_hat, var_hat, 0.5, torch.ones(2, dtype=dtype),
                                       torch.zeros(2, dtype=dtype), 2, guard, 1e-5, scope)
    assert torch.equal(s, torch.ones(2, 2, dtype=dtype))
    assert torch.equal(m, torch.tensor(M_EDGE, dtype=dtype))
    for g, trust in enumerate(trusts):
        want = 0.5 * 5.0 + 0.5 * m[g] if trust else m[g]
        assert torch.equal(mu[g], want), (g, mu[g], want)
