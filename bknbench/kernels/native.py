"""Optional C++ kernels for the CPU training step: `csrc/fused_cpu.cpp`.

They compute exactly what the Python autograd nodes `fused.GroupNormalize`,
`relu._ReluAffine` and `borders._ReluConv` compute (tests check them against the reference
formulas), with one call per layer forward and one backward instead of ~150 small tensor
ops; on CPU those ops, not arithmetic, are BKN's cost (docs/PERFORMANCE.md). Their passes over the
activations are split over torch's intra-op threads (`torch.set_num_threads`) by channel and
group, with every sum inside one thread in a fixed order: the results do not depend on the
thread count.

Built once per environment and torch version by `python -m bknbench.kernels.native` (`make` does
it; needs a C++ compiler and ninja). Never compiled behind a user's back: when no build is
present, or on another device or dtype, the Python nodes run. The build is named by a hash
of the source and torch version, so a stale build is never loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
# -fopenmp-simd: the simd pragmas. -fopenmp where torch's intra-op pool is OpenMP (Linux
# wheels): at::parallel_for is inline code in ATen's headers and runs serially unless
# compiled with it; its runtime is the one torch has loaded (libgomp, found through
# libtorch_cpu), so nothing more is linked and torch.set_num_threads rules both. Elsewhere
# (Apple's compiler has no -fopenmp) the kernels run on one thread.
_THREADED = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
_FLAGS = ["-O3", "-fopenmp-simd"] + (["-fopenmp"] if _THREADED else [])


def _name() -> str:
    key = SOURCE.read_bytes() + f"{torch.__version__} {sys.version_info[:2]} {_FLAGS}".encode()
    return "bknbench_fused_" + hashlib.sha256(key).hexdigest()[:12]


def build_dir() -> Path:
    """Where the build lives: $BKNBENCH_NATIVE_DIR if set; else inside the Python
    environment (a virtualenv: removed with it) when writable; else the user's cache."""
    root = os.environ.get("BKNBENCH_NATIVE_DIR")
    if not root:
        root = (Path(sys.prefix) / "share" / "bknbench" if os.access(sys.prefix, os.W_OK)
                else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "bknbench")
    return Path(root) / _name()


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(_name(), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _State:
    module = None  # the loaded extension, once found
    looked = False
    enabled = True


def module():
    """The loaded extension, or None (not built, or disabled)."""
    if not _State.enabled:
        return None
    if not _State.looked:
        _State.looked = True
        so = build_dir() / f"{_name()}.so"
        if so.exists():
            try:
                _State.module = _import(so)
            except (ImportError, OSError):  # a broken build: the Python nodes run
                _State.module = None
    return _State.module


def status() -> str:
    """'native' when the C++ kernels are loaded (and not disabled), else 'torch'. What a
    run used is recorded by `sweep.kernels`."""
    return "native" if module() is not None else "torch"


@contextlib.contextmanager
def disabled():
    """Run the Python nodes inside the block (tests and benchmarks compare the two)."""
    before = _State.enabled
    _State.enabled = False
    try:
        yield
    finally:
        _State.enabled = before


def usable(*tensors) -> bool:
    """Whether the kernels apply: built, CPU, one floating dtype (float32 or float64),
    not inside torch.compile (the compiler traces the reference functions)."""
    if module() is None or torch.compiler.is_compiling():
        return False
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    for t in tensors:  # a loop, not all(generator): called per layer and step
        if t is not None and (t.device.type != "cpu" or t.dtype != dtype):
            return False
    return True


def build(verbose: bool = False):
    """Compile the extension into `build_dir()` and load it."""
    from torch.utils.cpp_extension import load

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    # torch's loader runs `ninja` from PATH; pip installs it beside this interpreter, which a
    # virtualenv used without activating (make) does not put on PATH
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    load(_name(), [str(SOURCE)], extra_cflags=_FLAGS, build_directory=str(out),
         verbose=verbose)
    _State.looked = False
    return module()


def main() -> int:
    """`python -m bknbench.kernels.native`: build, or say in one line why not (the Python nodes
    then run; exit 0, since nothing is lost but speed). --check: exit 1 when not built."""
    if "--check" in sys.argv[1:]:
        print(f"bknbench kernels: {status()}", file=sys.stderr)
        return 0 if module() is not None else 1
    if module() is not None:
        print(f"bknbench: native kernels present in {build_dir()}", file=sys.stderr)
        return 0
    try:
        build()
    except Exception as e:  # noqa: BLE001 (compiler and ninja failures have many types)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"bknbench: native kernels not built ({reason}); the PyTorch path runs",
              file=sys.stderr)
        return 0
    print(f"bknbench: native kernels built in {build_dir()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
