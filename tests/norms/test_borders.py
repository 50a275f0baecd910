"""Border-aware analytic moments (kernels/borders.py, `borders=exact`): the pattern form equals
the plain two-convolution reference, values and gradients; both equal Monte Carlo over all
output positions within 3 standard errors for convolutions, pooling and linear layers on maps
of 1x1 to 32x32; the old rule (`borders=ignore`) is kept and fails where borders matter."""
import math

import pytest
import torch
from torch import nn

from bknbench.kernels.borders import conv_axis, conv_moments, relu_conv_moments
from bknbench.kernels.reference import affine_moments, conv_moments_by_maps, relu_moments
from bknbench.norms.transitions import chain_rules, conv_axes, op_moments

D = torch.float64
SIZES = [1, 2, 4, 8, 32]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _conv(kind: str, dims: int, c_in=4, c_out=4, seed=0):
    """The convolution geometries the issue names, 1-D or 2-D, with a bias."""
    torch.manual_seed(seed)
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    args = {"pad1": dict(kernel_size=3, padding=1), "pad2": dict(kernel_size=5, padding=2),
            "stride2": dict(kernel_size=3, padding=1, stride=2),
            "dilation2": dict(kernel_size=3, padding=2, dilation=2),
            "groups2": dict(kernel_size=3, padding=1, groups=2),
            "same": dict(kernel_size=4, padding="same")}[kind]
    return cls(c_in, c_out, **args).double()


def _moments_in(c, seed):
    g = _gen(seed)
    mean = torch.randn(2, c, generator=g, dtype=D)  # two groups
    var = torch.rand(2, c, generator=g, dtype=D) + 0.3
    return mean, var


def _monte_carlo(ops, mean, var, shape, draws, seed):
    """Per-channel mean and biased variance of ops(z) over draws and output positions,
    z ~ N(mean, var) independently per value, each group on its own; with standard errors
    from the spread of per-draw statistics (draws are independent; positions are not)."""
    g, c = mean.shape
    view = (g, 1, c) + (1,) * len(shape)
    z = mean.view(view) + var.sqrt().view(view) * torch.randn((g, draws, c) + shape,
                                                              generator=_gen(seed), dtype=D)
    with torch.no_grad():
        y = ops(z.reshape((g * draws, c) + shape))
    y = y.reshape(g, draws, y.shape[1], -1)  # (G, D, C_out, P)
    per_draw_mean = y.mean(-1)
    mc_mean = per_draw_mean.mean(1)
    per_draw_sq = (y - mc_mean[:, None, :, None]).square().mean(-1)
    mc_var = per_draw_sq.mean(1)
    se = lambda t: t.std(1) / math.sqrt(draws)  # noqa: E731
    return mc_mean, mc_var, se(per_draw_mean), se(per_draw_sq)


def _draws(shape):
    return max(1500, 60_000 // math.prod(shape))


def _check_against_monte_carlo(ops, rule_ops, mean, var, shape, seed=1, borders="exact"):
    m_a, v_a = mean, var
    s = shape
    for rule in chain_rules(rule_ops, borders):
        m_a, v_a, s = rule(m_a, v_a, s)
    mc_m, mc_v, se_m, se_v = _monte_carlo(ops, mean, var, shape, _draws(shape), seed)
    return (m_a - mc_m).abs() / se_m, (v_a - mc_v).abs() / se_v, m_a, v_a


# ---------------------------------------------------------------- exact = the reference
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch: an even kernel
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("kind", ["pad1", "pad2", "stride2", "dilation2", "groups2", "same"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_pattern_form_equals_two_convolutions_of_constant_maps(kind, dims, size):
    """Values and gradients (mean, var, weight, bias) of `borders.conv_moments` via the rule
    equal `reference.conv_moments_by_maps`, which convolves full constant maps."""
    conv = _conv(kind, dims)
    shape = (size,) * dims if dims == 1 else (size, size + 1)
    if conv.padding == "same":  # torch pads the odd extra on the right
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for k, d in zip(conv.kernel_size, conv.dilation)]
    else:
        pads = [(p, p) for p in conv.padding]
    mean, var = _moments_in(4, seed=size)

    def run(fn):
        m, v = mean.clone().requires_grad_(), var.clone().requires_grad_()
        conv.zero_grad()
        out_m, out_v = fn(m, v)
        w = torch.randn(out_m.shape, generator=_gen(9), dtype=D)
        (out_m * w + out_v * w.flip(0)).sum().backward()
        return [out_m, out_v, m.grad, v.grad, conv.weight.grad, conv.bias.grad]

    got = run(lambda m, v: op_moments(conv, m, v, shape, "exact")[:2])
    want = run(lambda m, v: conv_moments_by_maps(m, v, shape, conv.weight, conv.bias,
                                                 conv.stride, pads, conv.dilation,
                                                 conv.groups))
    out_shape = conv(torch.zeros((1, 4) + shape, dtype=D)).shape[2:]
    assert op_moments(conv, mean, var, shape)[2] == out_shape
    for name, a, b in zip(["mean", "var", "g_mean", "g_var", "g_weight", "g_bias"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=name)
    assert got[4].abs().sum() > 0  # gradients reach the weights


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("kind", ["pad1", "pad2", "stride2", "groups2"])
@pytest.mark.parametrize("size", [1, 4])
def test_relu_conv_node_equals_the_composition(kind, dims, size, backend):
    """`relu_conv_moments` (one autograd node; on each backend: the C++ kernel or the
    PyTorch node) against `relu_moments` then `conv_moments` with autograd and against the
    plain reference (`relu_moments` then two convolutions of constant maps): values and
    gradients into mean, var, weight and bias, one input channel below the variance floor;
    and the node passes gradcheck."""
    conv = _conv(kind, dims)
    shape = (size,) * dims
    axes = tuple(conv_axes(conv, shape))
    mean, var = _moments_in(4, seed=5)
    var[0, 0] = 1e-14

    def run(fn):
        m, v = mean.clone().requires_grad_(), var.clone().requires_grad_()
        conv.zero_grad()
        out_m, out_v = fn(m, v)
        w = torch.randn(out_m.shape, generator=_gen(8), dtype=D)
        (out_m * w + out_v * w.flip(1)).sum().backward()
        return [out_m, out_v, m.grad, v.grad, conv.weight.grad, conv.bias.grad]

    got = run(lambda m, v: relu_conv_moments(m, v, conv.weight, conv.bias, axes, conv.groups))
    assert ("CppNode" in _node(conv, axes)) == (backend == "native")
    want = run(lambda m, v: conv_moments(*relu_moments(m, v), conv.weight, conv.bias, axes,
                                         conv.groups))
    pads = [(p, p) for p in conv.padding]
    plain = run(lambda m, v: conv_moments_by_maps(*relu_moments(m, v), shape, conv.weight,
                                                  conv.bias, conv.stride, pads, conv.dilation,
                                                  conv.groups))
    for name, a, b, c in zip(["mean", "var", "g_mean", "g_var", "g_weight", "g_bias"], got,
                             want, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12, msg=name)
    args = (mean[:, :2].clone().requires_grad_(), (var[:, :2] + 0.5).requires_grad_(),
            conv.weight[:2, :2 // conv.groups].detach().clone().requires_grad_(),
            torch.randn(2, dtype=D, requires_grad=True))
    small = tuple(conv_axes(conv, (3,) * dims))
    assert torch.autograd.gradcheck(
        lambda m, v, w, b: relu_conv_moments(m, v, w, b, small, conv.groups), args)
    assert torch.autograd.gradcheck(  # one output unused
        lambda m, v, w, b: relu_conv_moments(m, v, w, b, small, conv.groups)[1], args)


def _node(conv, axes) -> str:
    """The autograd node a call of relu_conv_moments reaches (which implementation ran)."""
    mean = torch.zeros(1, conv.in_channels, dtype=D, requires_grad=True)
    out = relu_conv_moments(mean, torch.ones(1, conv.in_channels, dtype=D), conv.weight,
                            conv.bias, axes, conv.groups)[0]
    return out.grad_fn.name()


def test_axis_patterns_by_hand():
    # length 4, kernel 3, padding 1: position 0 misses tap 0, position 3 misses tap 2
    patterns, counts, out = conv_axis(4, 3, 1, 1, 1, 1)
    assert out == 4 and dict(zip(patterns, counts)) == {(0, 1, 1): 1, (1, 1, 1): 2,
                                                         (1, 1, 0): 1}
    # a 1-long axis: only the centre tap reads the input
    assert conv_axis(1, 3, 1, 1, 1, 1)[:2] == (((0, 1, 0),), (1,))


def test_one_by_one_map_by_hand():
    """On a 1x1 map a 3x3 convolution with padding 1 reads only its centre tap: mean =
    W_centre mean_in + b, var = W_centre^2 var_in; the ignore rule sums all nine."""
    conv = nn.Conv2d(1, 1, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.arange(9, dtype=D).view(1, 1, 3, 3))  # centre 4, sum 36
        conv.bias.fill_(0.5)
    mean, var = torch.tensor([[2.0]], dtype=D), torch.tensor([[3.0]], dtype=D)
    m, v, shape = op_moments(conv, mean, var, (1, 1))
    assert (m.item(), v.item(), shape) == (4 * 2 + 0.5, 16 * 3, (1, 1))
    m, v, _ = op_moments(conv, mean, var, (1, 1), "ignore")
    assert (m.item(), v.item()) == (36 * 2 + 0.5, sum(k * k for k in range(9)) * 3)


def test_ignore_is_the_kernel_summed_rule_and_exact_equals_it_without_borders():
    conv = _conv("pad1", 2)
    mean, var = _moments_in(4, seed=3)
    ref = affine_moments(*relu_moments(mean, var), conv.weight, conv.bias)
    for borders in ("ignore", "exact"):
        m, v, _ = chain_rules((nn.ReLU(), conv), borders)[0](mean, var, (8, 8))
        if borders == "ignore":
            torch.testing.assert_close(m, ref[0], rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(v, ref[1], rtol=1e-13, atol=1e-13)
        else:  # borders matter on 8x8 with padding: not the kernel-summed values
            assert (v - ref[1]).abs().max() > 1e-3
    valid = nn.Conv2d(4, 4, 3).double()  # no padding: every position reads every tap
    m, v, _ = chain_rules((nn.ReLU(), valid), "exact")[0](mean, var, (8, 8))
    ref = affine_moments(*relu_moments(mean, var), valid.weight, valid.bias)
    torch.testing.assert_close(m, ref[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(v, ref[1], rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- against Monte Carlo
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("kind", ["pad1", "pad2", "stride2", "dilation2", "groups2"])
@pytest.mark.parametrize("size", SIZES)
def test_relu_conv_matches_monte_carlo(kind, dims, size):
    """ReLU then a convolution, per-channel moments over all output positions, each
    channel of each group within 3 Monte Carlo standard errors."""
    conv = _conv(kind, dims, seed=size)
    shape = (size,) * dims
    mean, var = _moments_in(4, seed=10 + size)
    ops = nn.Sequential(nn.ReLU(), conv)
    z_m, z_v, *_ = _check_against_monte_carlo(ops, (nn.ReLU(), conv), mean, var, shape)
    assert z_m.max() < 3 and z_v.max() < 3, (z_m.max().item(), z_v.max().item())


@pytest.mark.parametrize("size", [2, 4])
def test_the_old_rule_fails_where_borders_matter(size):
    """The same Monte Carlo rejects `borders=ignore` on small maps (the test can fail)."""
    conv = _conv("pad1", 2, seed=size)
    mean, var = _moments_in(4, seed=10 + size)
    ops = nn.Sequential(nn.ReLU(), conv)
    z_m, z_v, *_ = _check_against_monte_carlo(ops, (nn.ReLU(), conv), mean, var,
                                              (size, size), borders="ignore")
    assert max(z_m.max(), z_v.max()) > 10


POOLS = {
    "avg2": lambda dims: (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)(2),
    "avg3s2p1": lambda dims: (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)(3, 2, 1),
    "avg3s2p1-nopad": lambda dims: (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)(
        3, 2, 1, count_include_pad=False),
    "avg3s2-ceil": lambda dims: (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)(
        3, 2, ceil_mode=True),
    "adaptive1": lambda dims: (nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d)(1),
    "adaptive3": lambda dims: (nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d)(3),
}


# a window of 2 (or 3 without padding) on a 1-wide map: PyTorch refuses, so no case
UNDEFINED_POOLS = {("avg2", 1), ("avg3s2-ceil", 1)}  # (kind, size), in 1 and 2 dims


def test_pooling_left_out_only_where_undefined():
    for kind in POOLS:
        for dims in (1, 2):
            for size in SIZES:
                shape = (1, 1) + (size,) * dims
                if (kind, size) in UNDEFINED_POOLS:
                    with pytest.raises(RuntimeError, match="too small"):
                        POOLS[kind](dims)(torch.zeros(shape, dtype=D))
                else:
                    POOLS[kind](dims)(torch.zeros(shape, dtype=D))


@pytest.mark.parametrize("kind,dims,size", [
    (kind, dims, size) for size in SIZES for kind in POOLS for dims in (1, 2)
    if (kind, size) not in UNDEFINED_POOLS])
def test_pooling_matches_monte_carlo(kind, dims, size):
    pool = POOLS[kind](dims)
    shape = (size,) * dims
    out = pool(torch.zeros((1, 1) + shape, dtype=D)).shape[2:]
    mean, var = _moments_in(3, seed=20 + size)
    assert op_moments(pool, mean, var, shape)[2] == out
    z_m, z_v, *_ = _check_against_monte_carlo(pool, (pool,), mean, var, shape)
    assert z_m.max() < 3 and z_v.max() < 3, (z_m.max().item(), z_v.max().item())


@pytest.mark.parametrize("size", SIZES)
def test_linear_fed_by_a_flattened_map_matches_monte_carlo(size):
    """ReLU -> Flatten -> Linear on (C, size, size) maps: every input is read, no border;
    the kernel-summed rule (and the fused node) is exact."""
    torch.manual_seed(size)
    lin = nn.Linear(3 * size * size, 4).double()
    mean, var = _moments_in(3, seed=30 + size)
    ops = nn.Sequential(nn.ReLU(), nn.Flatten(), lin)
    z_m, z_v, m, v = _check_against_monte_carlo(ops, (nn.ReLU(), nn.Flatten(), lin), mean,
                                                var, (size, size))
    assert z_m.max() < 3 and z_v.max() < 3, (z_m.max().item(), z_v.max().item())
    ref = affine_moments(*relu_moments(mean, var), lin.weight, lin.bias)
    torch.testing.assert_close(m, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, ref[1], rtol=1e-12, atol=1e-12)
