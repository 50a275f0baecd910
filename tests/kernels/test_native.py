"""The C++ CPU kernels (bknbench/kernels/native.py) against the PyTorch nodes they replace, at the
shapes and precision of training; the reference formulas are checked on both backends in
test_kalman.py (the `backend` fixture)."""
from __future__ import annotations

import importlib.util
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from bknbench.kernels import native
from bknbench.kernels.fused import group_normalize
from bknbench.kernels.relu import relu_affine_moments
from native_fixture import both, needs_native, threaded, threads



def test_kernels_are_built_where_a_compiler_is():
    """`make` builds them; where a compiler and ninja exist, a missing build is a broken
    setup, not a reason to skip the native tests below."""
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if (not (shutil.which("c++") or shutil.which("g++")) or not importlib.util.find_spec("ninja")
            or not headers.exists()):
        pytest.skip("no C++ compiler, ninja or Python headers here: the PyTorch path runs")
    assert native.module() is not None, "run `python -m bknbench.kernels.native` (make does)"
    assert native.status() == "native"
    with native.disabled():
        assert native.status() == "torch"


def _inputs(shape, groups, prior, gain, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    leaves = {"x": x, "weight": torch.rand(c, generator=g) + 0.5,
              "bias": torch.randn(c, generator=g)}
    if prior:
        leaves["mu_hat"] = torch.randn(groups, c, generator=g) + 1
        leaves["var_hat"] = torch.rand(groups, c, generator=g) * 9 + 1
    if gain == "tensor":
        leaves["p"] = torch.tensor(0.7)
    return {k: v.requires_grad_() for k, v in leaves.items()}


@needs_native
@pytest.mark.parametrize("shape,groups,channels_last", [
    ((128, 32, 40), 1, False),  # the default CNN at micro-batch 128
    ((128, 64, 10), 64, False),  # bn-accum: 64 groups of 2
    ((8, 6, 5, 5), 4, False),  # 2-D maps, groups of 2
    ((8, 6, 5, 5), 2, True),  # channels-last input
    ((6, 5), 3, False),  # (N, C) input, groups of 2
    ((4, 3, 7), 4, False),  # groups of one sample
])
@pytest.mark.parametrize("prior,gain", [(False, None), (True, "float"), (True, "tensor")])
def test_group_normalize_native_equals_torch_node(shape, groups, channels_last, prior, gain):
    """float32 values of all five outputs and gradients of every input, every output
    weighted differently in the loss."""
    def run():
        t = _inputs(shape, groups, prior, gain, channels_last=channels_last)
        p = t.get("p", 0.7 if prior else None)
        outs = group_normalize(t["x"], t.get("mu_hat"), t.get("var_hat"), p, t["weight"],
                               t["bias"], groups)
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
        loss.backward()
        return [o.detach() for o in outs], {k: v.grad for k, v in t.items()}

    (outs_n, grads_n), (outs_t, grads_t) = both(run)
    for name, a, b in zip(["y", "m", "s", "mu", "var"], outs_n, outs_t):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)
    assert grads_n.keys() == grads_t.keys()
    for name in grads_n:
        torch.testing.assert_close(grads_n[name], grads_t[name], rtol=1e-4, atol=1e-4,
                                   msg=name)


@needs_native
@pytest.mark.parametrize("used", ["y", "posterior", "m"])
def test_group_normalize_native_with_unused_outputs(used):
    """Outputs whose gradient never arrives (a model uses y; a successor the posterior)."""
    def run():
        t = _inputs((8, 4, 6), 4, True, "float", seed=3)
        y, m, s, mu, var = group_normalize(t["x"], t["mu_hat"], t["var_hat"], 0.9,
                                           t["weight"], t["bias"], 4)
        {"y": y, "posterior": mu * 2 + var, "m": m}[used].sum().backward()
        return {k: v.grad for k, v in t.items()}

    grads_n, grads_t = both(run)
    for name in grads_t:
        a, b = grads_n[name], grads_t[name]
        assert (a is None) == (b is None) or (a if b is None else b).abs().max() == 0, name
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@needs_native
def test_group_normalize_native_guard_rejects_the_prediction():
    """mean(var_hat / s) >= guard: (m, s) alone, and a tensor gain gets a zero gradient."""
    t = _inputs((8, 3, 5), 2, True, "tensor", seed=4)
    y, m, s, mu, var = group_normalize(t["x"], t["mu_hat"], t["var_hat"], t["p"],
                                       t["weight"], t["bias"], 2, guard=1e-3)
    torch.testing.assert_close(mu, m)
    torch.testing.assert_close(var, s)
    (y.sum() + var.sum()).backward()
    assert t["p"].grad.item() == 0.0


@needs_native
@pytest.mark.parametrize("wshape,bias", [((64, 32, 3), False), ((10, 64), True),
                                         ((8, 4, 3, 3), True)])
@pytest.mark.parametrize("groups", [1, 5])
def test_relu_affine_native_equals_torch_node(wshape, bias, groups):
    def run():
        g = torch.Generator().manual_seed(2)
        c_in = wshape[1] if len(wshape) > 2 else 16
        mean = torch.randn(groups, c_in, generator=g).requires_grad_()
        var = (torch.rand(groups, c_in, generator=g) * 4).requires_grad_()
        w = (torch.randn(wshape, generator=g) * 0.2).requires_grad_()
        b = torch.randn(wshape[0], generator=g).requires_grad_() if bias else None
        out_m, out_v = relu_affine_moments(mean, var, w, b)
        loss = (out_m * torch.randn(out_m.shape, generator=g)).sum() + out_v.square().sum()
        loss.backward()
        leaves = [mean, var, w] + ([b] if bias else [])
        return [out_m.detach(), out_v.detach()] + [t.grad for t in leaves]

    native_out, torch_out = both(run)
    for a, b in zip(native_out, torch_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_native
def test_relu_affine_takes_the_node_past_the_crossover():
    """Small problems on the C++ kernel, large ones (the paper's 64 groups) on the node,
    whose matrix products run on BLAS (relu.NATIVE_RELU_AFFINE_MAX)."""
    from bknbench.kernels.relu import NATIVE_RELU_AFFINE_MAX

    def node(groups, c_in=128, c_out=128):
        mean = torch.zeros(groups, c_in, requires_grad=True)
        out, _ = relu_affine_moments(mean, torch.ones(groups, c_in), torch.ones(c_out, c_in))
        return out.grad_fn.name()

    assert 2 * 128 * 128 <= NATIVE_RELU_AFFINE_MAX < 4 * 128 * 128
    assert "CppNode" in node(2)
    assert node(64) == "_ReluAffineBackward"


@needs_native
def test_kernels_apply_only_where_they_can():
    x = torch.randn(4, 3, 5)
    assert native.usable(x, None, x[:, :, 0])
    assert not native.usable(x.half())  # autocast inputs: the PyTorch node converts
    assert not native.usable(x, x.double())  # mixed dtypes
    with native.disabled():
        assert not native.usable(x)
    y = group_normalize(x.bfloat16(), None, None, None, torch.ones(3), torch.zeros(3), 1)[0]
    assert y.dtype == torch.bfloat16  # served by the PyTorch node


@needs_native
def test_kernels_refuse_shapes_they_cannot_split():
    """As the PyTorch nodes' reshapes do: an error, never numbers from a wrong split."""
    with pytest.raises(RuntimeError, match="divisible"):
        group_normalize(torch.randn(5, 3, 2), None, None, None, torch.ones(3), torch.zeros(3), 2)
    with pytest.raises(RuntimeError, match="input channels"):
        relu_affine_moments(torch.randn(1, 3), torch.rand(1, 3), torch.randn(4, 7))


# ---------------------------------------------------------------- threads
@needs_native
@threaded
def test_kernels_split_over_the_threads_and_run_tiny_problems_inline():
    """threads_for(units, values each): the split the kernels' passes take."""
    tiny = (32, 2 * 2 * 4)  # micro-batch 2, 32 channels, 4 positions: observe's units
    large = (32, 2 * 128 * 40)  # micro-batch 128 of the 1-D CNN
    with threads(2):
        assert native.module().threads_for(*tiny) == 1
        assert native.module().threads_for(*large) == 2
        assert native.module().threads_for(1, 10 ** 6) == 1  # one unit is never split
    with threads(1):
        assert native.module().threads_for(*large) == 1


def _group_normalize_run(shape, groups):
    """Values of the five outputs and the gradients of every input, a prediction with a
    learnable gain (every path of the node), every output weighted in the loss."""
    t = _inputs(shape, groups, True, "tensor", seed=5)
    outs = group_normalize(t["x"], t["mu_hat"], t["var_hat"], t["p"], t["weight"], t["bias"],
                           groups)
    g = torch.Generator().manual_seed(6)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return [o.detach() for o in outs] + [t[k].grad for k in sorted(t)]


@needs_native
@threaded
@pytest.mark.parametrize("shape,groups,split", [
    ((128, 32, 40), 1, True),  # the 1-D CNN at micro-batch 128
    ((128, 64, 8, 8), 64, True),  # 2-D maps, bn-accum's 64 groups of 2
    ((2, 4, 64, 64), 1, True),  # micro-batch 2, few channels, large maps
    ((1, 3, 128, 128), 1, True),  # micro-batch 1, three channels: an uneven split
    ((256, 300), 2, True),  # (N, C) input
    ((2, 32, 4), 1, False),  # tiny: inline
])
def test_group_normalize_is_bitwise_the_same_on_1_and_2threads(shape, groups, split):
    n, c = shape[:2]
    p = math.prod(shape[2:])
    with threads(2):  # the case is split as its comment says (observe's units)
        assert native.module().threads_for(groups * c, 2 * n // groups * p) == (2 if split else 1)
    with threads(1):
        one = _group_normalize_run(shape, groups)
    with threads(2):
        two = _group_normalize_run(shape, groups)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@needs_native
@threaded
@pytest.mark.parametrize("wshape,groups", [((64, 64, 3, 3), 64), ((64, 32, 3), 1), ((10, 64), 2)])
def test_relu_affine_is_bitwise_the_same_on_1_and_2threads(wshape, groups):
    def run():
        g = torch.Generator().manual_seed(7)
        c_in = wshape[1]
        mean = torch.randn(groups, c_in, generator=g).requires_grad_()
        var = (torch.rand(groups, c_in, generator=g) * 4).requires_grad_()
        w = (torch.randn(wshape, generator=g) * 0.2).requires_grad_()
        b = torch.randn(wshape[0], generator=g).requires_grad_()
        out_m, out_v = relu_affine_moments(mean, var, w, b)
        ((out_m * torch.randn(out_m.shape, generator=g)).sum() + out_v.square().sum()).backward()
        return [out_m.detach(), out_v.detach(), mean.grad, var.grad, w.grad, b.grad]

    with threads(1):
        one = run()
    with threads(2):
        two = run()
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)

