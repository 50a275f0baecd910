"""What the tests of the C++ kernels share: skip marks, both implementations, thread counts."""
from __future__ import annotations

import contextlib

import pytest
import torch

from bknbench.kernels import native

needs_native = pytest.mark.skipif(native.module() is None, reason="native kernels not built")
threaded = pytest.mark.skipif(not native._THREADED,
                              reason="kernels built without torch's OpenMP pool: one thread")


def both(fn):
    """fn() on the native kernels and on the PyTorch nodes."""
    out = fn()
    with native.disabled():
        return out, fn()


@contextlib.contextmanager
def threads(n):
    """torch's intra-op thread count set to n inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
