"""The probe forwards of bknbench/norms/probe.py over a whole model, and the probe set.

Both forwards run in training mode, without gradients, and change nothing: every
batch-dependent layer carries a Probe for the forward and drops it after, even on an error.
The caller forks the RNG (a sampled transition draws from it).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..norms.probe import Probe

PROBE_SAMPLES = 512  # training samples probed after every epoch (all, when fewer)
PROBE_SEED = 20180309  # fixes the probe set; independent of the run's seed, so every run of
# a sweep (any spec, batch or seed) probes the same samples
MAX_TRAIN_FORWARDS = 64  # training forwards the train probe replays at most (cost at tiny
# micro-batches without accumulation: one forward per micro-batch)
MAX_TRAIN_SAMPLES = 256  # samples the train probe covers at most (cost at large batches)

Stats = tuple[torch.Tensor, torch.Tensor]


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The batch-dependent normalization layers, (module path, layer), in module order."""
    return [(name, m) for name, m in model.named_modules()
            if getattr(m, "batch_dependent", False)]


def probe_indices(n_train: int, size: int = PROBE_SAMPLES) -> torch.Tensor:
    """The probe set: `size` training indices (all when fewer), drawn by PROBE_SEED, in the
    drawn order (groups of the train probe are consecutive samples, like training's)."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randperm(n_train, generator=g)[:size]


def train_plan(n_probe: int, norm_batch: int, sgd_batch: int) -> tuple[int, int]:
    """(samples per forward, forwards) of the train probe: training's forward of sgd_batch
    samples (the guard of a layer decides over one forward's groups), or the largest multiple
    of norm_batch the probe set holds when that is fewer; as many as fit in the first
    MAX_TRAIN_SAMPLES of the probe set (at least one), at most MAX_TRAIN_FORWARDS."""
    chunk = min(sgd_batch, n_probe // norm_batch * norm_batch)
    if chunk == 0:
        raise ValueError(f"probe set of {n_probe} samples is smaller than micro-batch {norm_batch}")
    return chunk, max(1, min(min(n_probe, MAX_TRAIN_SAMPLES) // chunk, MAX_TRAIN_FORWARDS))


@contextlib.contextmanager
def probing(layers, mode: str):
    """Every layer carries a fresh Probe(mode) inside the block; yields the probes."""
    probes = [Probe(mode) for _ in layers]
    try:
        for (_, layer), probe in zip(layers, probes):
            layer.probe = probe
        yield probes
    finally:
        for _, layer in layers:
            layer.probe = None


@torch.no_grad()
def population_stats(model: nn.Module, layers, x: torch.Tensor) -> list[Stats]:
    """Per layer, the mean and biased variance (C,) of its input over all of x (N, ...), each
    layer's predecessors normalized by their own population statistics (PreciseBN)."""
    with probing(layers, "population") as probes:
        model(x)
    return [(p.stats["input"][0][0], p.stats["input"][1][0]) for p in probes]


@torch.no_grad()
def train_stats(model: nn.Module, layers, x: torch.Tensor, chunk: int,
                forwards: int) -> list[dict[str, Stats]]:
    """Per layer, {name: (mean (G, C), var (G, C))} of what `forwards` training forwards of
    `chunk` consecutive samples of x compute ("used", and any other pair a layer records),
    the groups of all forwards concatenated."""
    found: list[dict[str, list[Stats]]] = [{} for _ in layers]
    for i in range(forwards):
        with probing(layers, "train") as probes:
            model(x[i * chunk:(i + 1) * chunk])
        for pairs, probe in zip(found, probes):
            for name, stat in probe.stats.items():
                pairs.setdefault(name, []).append(stat)
    return [{name: (torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts]))
             for name, parts in pairs.items()} for pairs in found]
