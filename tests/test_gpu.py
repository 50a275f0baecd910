"""The CUDA path: runs only where a GPU is present (CI has none; run `pytest tests/test_gpu.py`
on a GPU machine). Training on the device, bf16 autocast, peak memory, and the fused
normalization node on the GPU against the float64 reference on the CPU."""
import pytest
import torch

from bknbench.config import RunConfig
from bknbench.data.registry import load_dataset
from bknbench.kernels.fused import group_normalize, group_moments
from bknbench.kernels.reference import kalman_update, normalize
from bknbench.train import train_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("spec", ["bn", "bn-accum", "gn", "bkn", "bkn:transition=sampled"])
@pytest.mark.parametrize("amp", [False, True])
def test_training_on_cuda_learns_and_reports_memory(spec, amp):
    data = load_dataset("synthetic")
    sgd = 64 if spec == "bn-accum" else 8
    out = train_run(RunConfig(spec=spec, dataset="synthetic", norm_batch=8, sgd_batch=sgd,
                              epochs=3, device="cuda", amp=amp), data)
    assert out.status == "ok", out.reason
    assert out.epochs[-1]["val_acc"] > 80.0
    assert out.peak_mem_mb is not None and out.peak_mem_mb > 0


def test_deterministic_cuda_runs_repeat_bitwise():
    data = load_dataset("synthetic")
    cfg = RunConfig(spec="bkn", dataset="synthetic", norm_batch=4, sgd_batch=4, epochs=1,
                    device="cuda", deterministic=True)
    a, b = train_run(cfg, data), train_run(cfg, data)
    assert [e["val_loss"] for e in a.epochs] == [e["val_loss"] for e in b.epochs]


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_fused_node_on_cuda_equals_the_cpu_reference(groups):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 10, generator=g, dtype=torch.float64) * 2 + 1
    mu_hat = torch.randn(groups, 8, generator=g, dtype=torch.float64)
    var_hat = torch.rand(groups, 8, generator=g, dtype=torch.float64) + 0.5
    w, b = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    m, s = group_moments(x, groups)
    mu, var = kalman_update(m, s, mu_hat, var_hat, 0.9)
    expected = normalize(x, mu, var, w, b, 1e-5)
    cuda = [t.cuda().float() for t in (x, mu_hat, var_hat, w, b)]
    y = group_normalize(cuda[0], cuda[1], cuda[2], 0.9, cuda[3], cuda[4], groups)[0]
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-4, atol=1e-4)
