"""Shared timing code for the benchmark scripts: arguments, the header, interleaved repeats.

Every benchmark measures its cases side by side in one process: after a warm-up call of each
case, the repeats run round-robin (case A, B, C, A, B, C, ...) so that a slow patch of the
machine (another job, frequency scaling) hits every case alike, and the median over repeats
is reported. Ratios are formed from medians.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def thread_counts(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2): torch thread counts, each at least 1."""
    try:
        counts = tuple(int(t) for t in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2, got {text!r}")
    return counts


def parse_args(description: str, threads: int | tuple[int, ...] | None = 1,
               flags: dict[str, str] | None = None, device: bool = True) -> argparse.Namespace:
    """--quick (fewer steps, still >= 5 repeats), --repeats, --threads (torch intra-op; a
    tuple default: a comma-separated list, every case runs on each count), --device (where
    the cases train), and any extra boolean `flags` {name: help}."""
    ap = argparse.ArgumentParser(description=description)
    for name, help in (flags or {}).items():
        ap.add_argument(name, action="store_true", help=help)
    ap.add_argument("--quick", action="store_true", help="a fast, smaller version")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case (>= 5)")
    if isinstance(threads, tuple):
        ap.add_argument("--threads", type=thread_counts, default=threads,
                        help="torch thread counts, comma-separated: every case runs on each")
    elif threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help="torch threads")
    if device:
        ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be at least 5: the median of fewer is not a figure")
    if device:
        from bknbench.errors import ConfigError
        from bknbench.device import resolve_device

        try:
            args.device = resolve_device(args.device)
        except ConfigError as e:
            ap.error(str(e))
    return args


def stopwatch(device: str) -> Callable[[], float]:
    """perf_counter after the device has finished its queued work (CUDA and MPS run
    asynchronously: without the sync a timer measures the launches, not the work)."""
    import torch

    from bknbench.device import sync

    dev = torch.device(device)

    def now() -> float:
        sync(dev)
        return time.perf_counter()
    return now


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def header(title: str, args: argparse.Namespace | None = None) -> None:
    """Print what the figures below depend on: date, machine, versions, settings."""
    import numpy
    import torch

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "n/a"
    print(f"# {title}")
    print(f"date     {now}")
    print(f"machine  {cpu_name()}, {os.cpu_count()} logical cores, {platform.platform()}")
    print(f"load     {load} (1/5/15 min, before the run)")
    from bknbench.kernels import native

    on_cpu = getattr(args, "device", "cpu") == "cpu"  # the C++ kernels are CPU-only
    print(f"versions python {platform.python_version()}, torch {torch.__version__}, "
          f"numpy {numpy.__version__}, bknbench {git_commit()}, "
          f"kernels {native.status() if on_cpu else 'torch'}")
    if args is not None:
        settings = {k: v for k, v in vars(args).items()}
        print("settings " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print(flush=True)


def interleaved(cases: dict[str, Callable[[], float]], repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Call every case `warmup` times, then `repeats` rounds of each in turn.

    A case returns the figure of one repeat (seconds, or a rate it timed itself); returns
    {case: [figure per repeat]}.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            out[name].append(fn())
    return out


def timed(fn: Callable[[], object],
          now: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """Wrap fn so that calling it returns its wall time in seconds by the clock `now`
    (`stopwatch(device)` for an asynchronous device)."""
    def run() -> float:
        t = now()
        fn()
        return now() - t
    return run


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """min-max of the repeats relative to the median, e.g. '-3%/+5%'."""
    m = median(xs)
    return f"-{100 * (m - min(xs)) / m:.0f}%/+{100 * (max(xs) - m) / m:.0f}%"


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{'MET' if ok else 'MISSED'} (target {sign} {target:g})"


# ---------------------------------------------------------------- bknbench runs
def subset(data, n_train: int, n_test: int):
    """The first n_train / n_test samples of a Dataset: a run of exactly n_train // batch
    steps per epoch, and a small evaluation (outside the timed part of train_run)."""
    from bknbench.data.registry import Dataset

    return Dataset(data.name, data.x_train[:n_train], data.y_train[:n_train],
                   data.x_test[:n_test], data.y_test[:n_test], data.num_classes, data.image)


def synthetic_images(n_train: int, n_test: int, shape=(3, 32, 32), classes: int = 10):
    """Random standardized images (CIFAR-sized by default): speed only, nothing to learn."""
    import torch

    from bknbench.data.registry import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset("synthetic32", torch.randn((n_train,) + shape, generator=g),
                   torch.randint(0, classes, (n_train,), generator=g),
                   torch.randn((n_test,) + shape, generator=g),
                   torch.randint(0, classes, (n_test,), generator=g), classes, image=True)


def without_native(case: Callable[[], float]) -> Callable[[], float]:
    """The case on the PyTorch autograd nodes instead of the C++ kernels (bknbench/kernels/native.py)."""
    def run() -> float:
        from bknbench.kernels import native

        with native.disabled():
            return case()
    return run


def bknbench_rate(cfg, data, device: str = "cpu") -> Callable[[], float]:
    """A case: one bknbench training run (train_run, 1 epoch over `data`) on `device`,
    returning its training throughput in samples/s (train_run's own timer: training loop
    only, synced with the device, no model build, no evaluation)."""
    from dataclasses import replace

    from bknbench.train import train_run

    cfg = replace(cfg, device=device)

    def run() -> float:
        out = train_run(cfg, data)
        if out.status != "ok":
            raise RuntimeError(f"{cfg.spec} b={cfg.norm_batch}: {out.status} {out.reason}")
        return out.samples / out.train_time_s
    return run
