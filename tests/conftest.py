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
    (bknbench/kernels/native.py; skipped where not built) and the PyTorch autograd nodes."""
    from bknbench.kernels import native

    from bknbench.kernels.fused import group_normalize

    def node():  # which implementation a call reaches: the autograd node's name
        x = torch.ones(2, 1, requires_grad=True)
        return group_normalize(x, None, None, None, torch.ones(1), torch.zeros(1), 1)[
            0].grad_fn.name()

    if request.param == "native":
        if native.module() is None:
            pytest.skip("native kernels not built (python -m bknbench.kernels.native)")
        assert "CppNode" in node()
        yield "native"
    else:
        with native.disabled():
            assert node() == "GroupNormalizeBackward"
            yield "torch"


@pytest.fixture
def plugin_sandbox():
    """The registries and the loaded plugins as they were before the test: a plugin loaded
    in it (or a normalizer registered) is gone after."""
    from bknbench import plugins

    tables = [plugins.LOADED, *plugins.TABLES.values()]
    saved = [dict(t) for t in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)


@pytest.fixture
def drawn_colours():
    """png path -> the set of its pixels' colours as hex (matplotlib reads PNG itself), so a
    figure test checks what was drawn, not a header or a file size."""
    def read(path) -> set[str]:
        import matplotlib.image
        import numpy as np

        rgb = (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.int64)
        return {"#%02x%02x%02x" % tuple(c) for c in np.unique(rgb.reshape(-1, 3), axis=0)}

    return read
