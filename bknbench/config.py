"""Configuration as data: one frozen dataclass per run, one per sweep, and the expansion.

A `RunConfig` is everything that can change a run's numbers; its hash is the run id, so a
resumed sweep recognises finished runs. Execution choices that must not change results
(workers, executor, output folder) live in `SweepConfig` only.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field

from .errors import ConfigError

# The SGD batch the base learning rate refers to; lr = base_lr * sgd_batch / LR_REF_BATCH.
LR_REF_BATCH = 128
# Evaluation points per run when --evals-per-epoch is not given: K = ceil(MIN_EVALS / epochs).
MIN_EVALS = 20
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class RunConfig:
    """One training run. Every field can change the result, so every field is hashed."""

    spec: str  # normalizer spec string, e.g. "bkn:p=0.5,transition=sampled"
    dataset: str = "digits"  # `bknbench run`'s quick look: BN collapses at micro-batch 1
    model: str = "cnn"
    norm_batch: int = 2  # samples behind each normalization statistic (the micro-batch)
    sgd_batch: int = 2  # samples per optimizer step (> norm_batch when accumulating)
    seed: int = 0  # fixes weight init and data order
    epochs: int = 3  # passes over the training split
    base_lr: float = 0.2  # peak learning rate per LR_REF_BATCH samples of SGD batch
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty, per step
    schedule: str = "cosine"  # "cosine" (per step, to 0) or "step" (x0.1 at milestones)
    warmup_epochs: float = 0.0  # linear warm-up length, epochs
    milestones: tuple[int, ...] = ()  # epochs at which "step" divides the lr by 10
    augment: bool = False  # random crop (pad 4) + flip, image datasets only
    data_dir: str | None = None  # local copy of a dataset that cannot be embedded
    device: str = "cpu"  # resolved device: cpu, cuda, cuda:1, mps
    amp: bool = False  # bf16 autocast
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # bitwise repeatable kernels
    threads: int | None = None  # torch intra-op threads; None: 1 if deterministic, else the
    # executor's share of the cores (see sweep/run.py run_threads)
    eval_batch: int = 1024  # samples per evaluation forward (eval mode: no effect on results)
    # held-out evaluations per epoch, evenly spaced in optimizer steps (0: ceil(MIN_EVALS /
    # epochs)); they change the metric rows only, never the training, so the run id omits it
    evals_per_epoch: int = 0
    diagnose: bool = False  # per-layer statistics after every epoch (bknbench/diagnose)

    def __post_init__(self):
        if self.norm_batch <= 0 or self.sgd_batch % self.norm_batch or (
                self.sgd_batch < self.norm_batch):
            raise ConfigError(f"SGD batch {self.sgd_batch} must be a positive multiple of the "
                              f"micro-batch (norm_batch) {self.norm_batch}")

    @property
    def lr(self) -> float:
        """Peak learning rate after the linear scaling rule."""
        return self.base_lr * self.sgd_batch / LR_REF_BATCH

    @property
    def evals(self) -> int:
        """Evaluations per epoch, resolved."""
        return self.evals_per_epoch or math.ceil(MIN_EVALS / max(1, self.epochs))

    @functools.cached_property
    def run_id(self) -> str:  # computed once: a sweep of 10,000 runs asks often
        return run_id(self)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # all scalars
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "milestones" in kw:
            kw["milestones"] = tuple(int(m) for m in kw["milestones"])
        return cls(**kw)


def run_id(cfg: RunConfig) -> str:
    """Stable id: the hash of the fully resolved configuration (eval_batch,
    evals_per_epoch and diagnose excluded: they cannot change a result — a diagnosed run
    trains exactly as the same run without, tests/diagnose; threads only when set, so ids
    from before it existed hold)."""
    d = cfg.to_dict()
    for unhashed in ("eval_batch", "evals_per_epoch", "diagnose"):
        d.pop(unhashed)
    if d["threads"] is None:
        d.pop("threads")
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


# The SweepConfig fields a results folder's sweep may grow along (its grid); "tune" and
# "tune_seeds" are the tuned grids where a SweepConfig has them. Any other difference makes
# another experiment, which a folder never mixes in (sweep/plan.py extend_sweep).
GRID_AXES = ("specs", "batch_sizes", "seeds", "tune", "tune_seeds")


@dataclass(frozen=True)
class SweepConfig:
    """The grid: specs x micro-batch sizes x seeds over one base RunConfig."""

    specs: tuple[str, ...]
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # micro-batch sizes (norm_batch)
    seeds: tuple[int, ...] = (0,)
    base: RunConfig = field(default_factory=lambda: RunConfig(spec=""))
    accumulate_to: int | None = None  # SGD batch for every spec; None: only accumulating specs
    default_accumulate_to: int = 128  # SGD batch of accumulating specs (bn-accum) when unset

    def sgd_batch_for(self, spec: str, norm_batch: int) -> int:
        from .norms import parse_spec  # local: keeps config import-light

        if self.accumulate_to is not None:
            target = self.accumulate_to
        elif parse_spec(spec).entry.accumulates:
            target = self.default_accumulate_to
        else:
            return norm_batch
        if target < norm_batch:
            return norm_batch
        if target % norm_batch:
            raise ConfigError(
                f"--accumulate-to {target} is not a multiple of micro-batch {norm_batch}"
            )
        return target

    def expand(self) -> list[RunConfig]:
        """All runs, in the order they are executed (largest groups of work first is
        not attempted: order is specs, then batch sizes, then seeds, for readable logs)."""
        runs = []
        for spec in self.specs:
            for b in self.batch_sizes:
                sgd = self.sgd_batch_for(spec, b)
                for seed in self.seeds:
                    runs.append(dataclasses.replace(self.base, spec=spec, norm_batch=b,
                                                    sgd_batch=sgd, seed=seed))
        return runs
