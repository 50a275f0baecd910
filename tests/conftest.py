"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a shared, loaded
    2-core machine, where two spinning threads per process oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """Run a test on each implementation of the fused nodes: the C++ CPU kernels
    (bknbench/native.py; skipped where not built) and the PyTorch autograd nodes."""
    from bknbench import native

    if request.param == "native":
        if native.module() is None:
            pytest.skip("native kernels not built (python -m bknbench.native)")
        yield "native"
    else:
        with native.disabled():
            yield "torch"
