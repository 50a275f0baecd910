"""The CUDA path's defects, shown on the CPU where they can be (docs/gpu.md): a training step
of every normalizer, mlp and cnn, checked for what would fail or differ on a GPU.

- the eval-form batch-norm backward gets the saved mean and inverse std (CUDA asserts
  "save_mean should always be defined" for (N, C) inputs without them), bitwise the same;
- running statistics are updated in float32 with autocast off (CUDA's autocast runs addmv,
  matmul and einsum in bf16);
- no op without a deterministic CUDA kernel (cumsum) in a step;
- no host sync in a step: no .item(), .cpu(), Python decision on a tensor value, or
  blocking copy to a device.
What only a GPU can show is checked by benchmarks/gpu_check.py."""
import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bknbench.kernels import native
from bknbench.kernels.fused import eval_form_backward
from bknbench.models.registry import make_model
from bknbench.norms.common import window_sums
from bknbench.norms.registry import names, parse_spec

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_sections import HostReads  # noqa: E402 (the GPU script counts syncs with it too)

SPECS = names() + ["bkn:transition=sampled"]
N, NORM_BATCH, STEPS = 8, 2, 3  # 4 groups per step: 12 micro-batches, the run's length
SHAPES = {"mlp": (16,), "cnn": (1, 16)}  # mlp: (N, C) features, the layout CUDA failed on
# ops PyTorch has no deterministic CUDA kernel for (torch.use_deterministic_algorithms)
NONDETERMINISTIC = {"cumsum", "cumprod", "index_add", "scatter_add", "scatter_reduce",
                    "index_reduce", "put", "histc", "bincount", "kthvalue", "median"}


def training_steps(spec: str, model: str, during=contextlib.nullcontext, amp=False):
    """STEPS optimizer steps of ``model`` with ``spec`` (schedules fitted to the run, so brn
    ramps, mabn starts its averages and cbn ends its burn-in within it), each step inside
    ``during()``; the C++ CPU kernels off: the Python nodes are what runs on a GPU."""
    torch.manual_seed(0)
    built = parse_spec(spec).for_run(STEPS * N // NORM_BATCH)
    net = make_model(model, built, NORM_BATCH, SHAPES[model], 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(N, *SHAPES[model]), torch.randint(0, 3, (N,))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else (
        contextlib.nullcontext)
    with native.disabled():
        for _ in range(STEPS):
            with during():
                with autocast():
                    loss = F.cross_entropy(net(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net


class Ops(TorchDispatchMode):
    """Records every aten call: (name, args, output)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.overloadpacket.__name__, args, out))
        return out


def recorded(spec, model, **kw):
    ops = Ops()
    training_steps(spec, model, during=lambda: ops, **kw)
    return ops.calls


# ---------------------------------------------------------------- 1. saved statistics
@pytest.mark.parametrize("shape", [(8, 12, 1), (8, 12, 5)], ids=["NC", "NCP"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_form_backward_with_saved_statistics_is_bitwise_the_same(shape, dtype):
    g = torch.Generator().manual_seed(0)
    xt, g_y = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))
    w, mean = torch.randn(12, generator=g, dtype=dtype), torch.randn(12, generator=g, dtype=dtype)
    var = torch.rand(12, generator=g, dtype=dtype) + 0.1
    without = torch.ops.aten.native_batch_norm_backward(
        g_y, xt, w, mean, var, None, None, False, 1e-5, [True, True, True])
    for a, b in zip(eval_form_backward(g_y, xt, w, mean, var, 1e-5), without):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("spec", SPECS)
def test_every_batch_norm_backward_gets_saved_statistics(spec, model):
    backwards = [args for name, args, _ in recorded(spec, model)
                 if name == "native_batch_norm_backward"]
    assert all(a[5] is not None and a[6] is not None for a in backwards)


# ---------------------------------------------------------------- 2. running statistics under amp
MATMULS = {"mm", "bmm", "addmm", "addmv", "baddbmm", "mv", "dot", "matmul"}


@pytest.mark.parametrize("spec", SPECS)
def test_running_statistics_are_updated_in_float32_with_autocast_off(spec, monkeypatch):
    """Under bf16 autocast every addmv (the EMA of `ema_over_groups`; CPU autocast leaves it
    alone, CUDA's would not) runs with autocast off and computes float32; the running
    buffers stay float32."""
    seen = []
    addmv = torch.addmv

    def spy(*args, **kwargs):
        out = addmv(*args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(torch, "addmv", spy)
    net = training_steps(spec, "mlp", amp=True)
    assert all(dtype == torch.float32 and not on for on, dtype in seen)
    for name, buf in net.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name


@pytest.mark.parametrize("spec", SPECS)
def test_no_bf16_matrix_product_inside_a_normalizer_under_autocast(spec):
    """CPU autocast rounds matmul (as `ema_before_each` had it); CUDA's more."""
    layer = parse_spec(spec).for_run(12).build(12, NORM_BATCH)
    layer.train()
    x = torch.randn(N, 12, 5).bfloat16().requires_grad_()
    ops = Ops()
    with native.disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(STEPS):
            with ops:
                layer(x).float().square().sum().backward()
    rounded = [name for name, _, out in ops.calls if name in MATMULS
               and isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16]
    assert rounded == []


# ---------------------------------------------------------------- 3. determinism on CUDA
@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("spec", SPECS)
def test_no_op_without_a_deterministic_cuda_kernel_in_a_step(spec, model):
    assert {name for name, _, _ in recorded(spec, model)} & NONDETERMINISTIC == set()


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize("g", [1, 2, 4, 7])
def test_window_sums_sum_each_window(k, g):
    """Integers in float64: every order of summation gives the same, exact value."""
    gen = torch.Generator().manual_seed(k * 10 + g)
    past = torch.randint(-50, 50, (k, 3), generator=gen).double()
    new = torch.randint(-50, 50, (g, 3), generator=gen).double()
    seq = torch.cat([past, new])
    expected = torch.stack([seq[j:j + k].sum(0) for j in range(g)])
    assert torch.equal(window_sums(past, new, k), expected)


# ---------------------------------------------------------------- 4. no host sync
@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("spec", SPECS)
def test_a_training_step_makes_no_host_sync(spec, model):
    reads = HostReads()
    training_steps(spec, model, during=lambda: reads)
    assert reads.found == []


def test_the_sync_check_finds_reads_and_blocking_copies():
    reads = HostReads()
    with reads:
        torch.ones(()).item()
        bool(torch.ones(()) > 0)
        torch.tensor([1.0], device="cpu")
        torch.ones(2).to("cpu")
        torch.ones(2).to("cpu", non_blocking=True)  # staged, no wait: not a sync
    assert reads.found == ["Tensor.item", "Tensor.__bool__", "torch.tensor(..., device=...)",
                           "a blocking Tensor.to(device)"]
