"""The device a run trains on: which one (resolve_device), waiting for it (sync), the
peak memory of training (TrainingMemory), the compiled model (compiled)."""
from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str, remote_gpus: bool = False) -> str:
    """auto -> cuda when present, else mps, else cpu. An unavailable device is an error.
    remote_gpus: the runs go to workers with GPUs (Ray, --gpus-per-run > 0), not to this
    machine: auto is cuda, and cuda is not looked for here (each worker checks its own)."""
    if remote_gpus and name in ("auto", "cuda"):
        return "cuda"
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if kind == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS is not available")
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class TrainingMemory:
    """Peak CUDA memory of the training steps, bytes: the peak over each stretch of steps
    between evaluations (reset when it starts, read when it ends), less what the dataset
    holds on the device (``base``). Model, optimizer state, activations and gradients are
    in it; the dataset, evaluations and diagnostics probes are not. None off CUDA."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.base = 0
        self.peak: int | None = None if self.device is None else 0

    def allocated(self) -> int:
        return 0 if self.device is None else torch.cuda.memory_allocated(self.device)

    def start(self) -> None:
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        if self.device is not None:
            top = torch.cuda.max_memory_allocated(self.device) - self.base
            self.peak = max(self.peak, top)

    def mb(self) -> float | None:
        return None if self.peak is None else self.peak / 2**20


def compiled(model):
    """torch.compile(model), dynamo's caches emptied first. Dynamo guards on the Python
    values a model reads (norm_batch); after 8 recompilations of the same code in one
    process (config.recompile_limit) it runs every later model eagerly, silently: a sweep
    in one process (one worker per GPU) would report eager runs as compiled from its 9th
    micro-batch size on. Each run compiles its model afresh instead."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(model)
