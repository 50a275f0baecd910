"""The C++ relu_conv kernel (exact border moments after ReLU then a convolution,
kernels/borders.py) against the PyTorch node it replaces at training shapes and precision,
its dispatch, and its results on 1 and 2 threads; tests/norms/test_borders.py holds both to
the reference formulas in float64 (the `backend` fixture)."""
from __future__ import annotations

import math

import pytest
import torch

from bknbench.kernels import native
from bknbench.kernels.borders import _axes_tensors, conv_axis, relu_conv_moments
from native_fixture import both, needs_native, threaded, threads

# relu_conv: (groups G, C_in, C_out, map, kernel, stride, conv groups, bias)
CONV_CASES = [
    (1, 32, 64, (20,), 3, 2, 1, False),  # the 1-D CNN at micro-batch 2: stride 2
    (1, 64, 64, (10,), 3, 1, 1, True),  # its last layer, with a bias
    (5, 6, 4, (5,), 5, 1, 1, True),  # 5 groups, a kernel wider than the map's interior
    (1, 32, 64, (4, 4), 3, 2, 1, False),  # the 2-D CNN on digits
    (3, 8, 6, (2, 3), 3, 1, 2, True),  # conv groups (a dense weight), 2-D, a bias
    (1, 4, 4, (1, 1), 3, 1, 1, True),  # a 1x1 map: only the centre tap reads
]


def _relu_conv_run(case, fn=relu_conv_moments, seed=2):
    """Values and gradients (mean, var, weight, bias) of relu_conv_moments on `case`, every
    output weighted differently in the loss."""
    g, c_in, c_out, shape, k, stride, conv_groups, bias = case
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(g, c_in, generator=gen).requires_grad_()
    var = (torch.rand(g, c_in, generator=gen) * 4).requires_grad_()
    w = (torch.randn(c_out, c_in // conv_groups, *(k,) * len(shape), generator=gen) * 0.2
         ).requires_grad_()
    b = torch.randn(c_out, generator=gen).requires_grad_() if bias else None
    axes = tuple(conv_axis(n, k, stride, k // 2, k // 2, 1) for n in shape)
    out_m, out_v = fn(mean, var, w, b, axes, conv_groups)
    loss = (out_m * torch.randn(out_m.shape, generator=gen)).sum() + out_v.square().sum()
    loss.backward()
    return [out_m.detach(), out_v.detach()] + [t.grad for t in (mean, var, w, b) if t is not None]


@needs_native
@pytest.mark.parametrize("case", CONV_CASES)
def test_relu_conv_native_equals_torch_node(case):
    """float32, at the shapes of training: the C++ kernel (sums in double) against the
    PyTorch node (float32 matrix products); tests/norms/test_borders.py holds both to the
    reference in float64."""
    native_out, torch_out = both(lambda: _relu_conv_run(case))
    for a, b in zip(native_out, torch_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_native
def test_relu_conv_takes_the_node_past_the_crossover():
    """Small problems on the C++ kernel, large ones on the node, whose matrix products run
    on BLAS (borders.NATIVE_RELU_CONV_MAX, in (group, input, output channel, pattern)
    quadruples)."""
    from bknbench.kernels.borders import NATIVE_RELU_CONV_MAX

    axes = (conv_axis(10, 3, 1, 1, 1, 1),)  # 3 patterns

    def node(groups):
        mean = torch.zeros(groups, 64, requires_grad=True)
        out, _ = relu_conv_moments(mean, torch.ones(groups, 64), torch.ones(64, 64, 3), None,
                                   axes)
        return out.grad_fn.name()

    assert 64 * 64 * 3 <= NATIVE_RELU_CONV_MAX < 64 * 64 * 64 * 3
    assert "CppNode" in node(1)
    assert node(64) == "_ReluConvBackward"


@needs_native
def test_relu_conv_refuses_a_mask_it_cannot_read():
    mean, var, w = torch.randn(1, 3), torch.rand(1, 3), torch.randn(4, 3, 3)
    mask, share = _axes_tensors((conv_axis(4, 3, 1, 1, 1, 1),), torch.float32,
                                torch.device("cpu"))
    kernel = native.module()
    with pytest.raises(RuntimeError, match="tap mask"):  # taps of another kernel size
        kernel.relu_conv(mean, var, w, None, mask[:, :2], share)
    with pytest.raises(RuntimeError, match="tap mask"):  # a share per pattern
        kernel.relu_conv(mean, var, w, None, mask, share[:2])
    with pytest.raises(RuntimeError, match="0/1"):
        kernel.relu_conv(mean, var, w, None, mask * 0.5, share)
    m, v = kernel.relu_conv(mean, var, w, None, mask, share)
    assert m.shape == v.shape == (1, 4)


@needs_native
@threaded
@pytest.mark.parametrize("case", [
    (64, 64, 64, (2, 2), 3, 1, 1, True),  # the 2-D CNN's last layer at bn-accum's 64 groups
    (8, 64, 64, (10,), 3, 1, 1, True),  # the 1-D CNN's, 8 groups
    (16, 32, 64, (4, 4), 3, 2, 1, False),  # stride 2, 2-D
])
def test_relu_conv_is_bitwise_the_same_on_1_and_2threads(case):
    """The C++ kernel itself (called directly: the dispatch sends problems this large to
    the node), its passes split over 2 threads: its (g, o) outputs and its input channels."""
    g, c_in, c_out, shape, k = case[:5]
    patterns = math.prod(len(conv_axis(n, k, case[5], k // 2, k // 2, 1)[0]) for n in shape)
    with threads(2):  # the forward's (g, o) units and the backward's input channels split
        assert native.module().threads_for(g * c_out, 2 * c_in * patterns) == 2
        assert native.module().threads_for(c_in, 4 * g * c_out * patterns) == 2

    def kernel(mean, var, w, b, axes, conv_groups):
        mask, share = _axes_tensors(axes, mean.dtype, mean.device)
        return native.module().relu_conv(mean, var, w, b, mask, share)

    with threads(1):
        one = _relu_conv_run(case, kernel, seed=7)
    with threads(2):
        two = _relu_conv_run(case, kernel, seed=7)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("in_shape", [(1, 40), (1, 8, 8)], ids=["1-D", "2-D"])
def test_bkn_cnn_step_at_micro_batch_1_native_equals_torch(in_shape, batch):
    """A training step of the CNN with BKN at micro-batch 1 (groups of one sample; 1 or 4
    of them), exact borders: the output and every parameter's gradient on the C++ kernels
    equal those on the PyTorch nodes, and the transitions ran on relu_conv."""
    from bknbench.models import make_model
    from bknbench.norms import parse_spec

    x = torch.randn((batch,) + in_shape, generator=torch.Generator().manual_seed(3))

    def step():
        torch.manual_seed(0)
        model = make_model("cnn", parse_spec("bkn"), 1, in_shape, 10)
        out = model(x)
        nodes = _graph_nodes(out.grad_fn)
        out.square().sum().backward()
        return nodes, [out.detach()] + [p.grad for p in model.parameters()]

    (nodes, got), (nodes_torch, want) = both(step)
    # the three transitions between the four BKN layers
    assert sum("ReluConv" in n and "CppNode" in n for n in nodes) == 3
    assert nodes_torch.count("_ReluConvBackward") == 3
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _graph_nodes(fn) -> list[str]:
    """The names of the autograd nodes behind a grad_fn, each once."""
    seen, todo = {}, [fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node.name()
            todo += [nxt for nxt, _ in node.next_functions]
    return list(seen.values())
