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
    val_fraction: float = 0.1  # share of the training split held out for validation
    # (data.registry.VAL_FRACTION; stratified, a fixed seed of its own; 0: none)
    device: str = "cpu"  # resolved device: cpu, cuda, cuda:1, mps
    amp: bool = False  # bf16 autocast
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # bitwise repeatable kernels
    cudnn_benchmark: bool = False  # cuDNN picks its fastest convolution algorithms (CUDA)
    threads: int | None = None  # torch intra-op threads; None: 1 if deterministic, else the
    # executor's share of the cores (see sweep/run.py run_threads)
    eval_batch: int = 1024  # samples per evaluation forward (eval mode: no effect on results)
    # held-out evaluations per epoch, evenly spaced in optimizer steps (0: ceil(MIN_EVALS /
    # epochs)); they change the metric rows only, never the training, so the run id omits it
    evals_per_epoch: int = 0
    diagnose: bool = False  # per-layer statistics after every epoch (bknbench/diagnose)
    # the plugins providing its normalizer, model or dataset, "source@sha256:HEX" each
    # (bknbench/plugins.py): a plugin's code is part of the run's configuration
    plugins: tuple[str, ...] = ()

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
        d["plugins"] = list(self.plugins)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "milestones" in kw:
            kw["milestones"] = tuple(int(m) for m in kw["milestones"])
        if "plugins" in kw:
            kw["plugins"] = tuple(str(p) for p in kw["plugins"])
        return cls(**kw)


def run_id(cfg: RunConfig) -> str:
    """Stable id: the hash of the fully resolved configuration (eval_batch,
    evals_per_epoch and diagnose excluded: they cannot change a result — a diagnosed run
    trains exactly as the same run without, tests/diagnose; threads, cudnn_benchmark and
    plugins only when set and val_fraction only when not 0, so ids from before they existed
    hold)."""
    d = cfg.to_dict()
    for unhashed in ("eval_batch", "evals_per_epoch", "diagnose"):
        d.pop(unhashed)
    for unset in ("threads", "cudnn_benchmark", "plugins"):  # only when set
        if not d[unset]:
            d.pop(unset)
    if d["val_fraction"] == 0:  # the whole training split, as every run before the split
        d.pop("val_fraction")
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


# The keys `--tune` accepts -> the RunConfig field each sets, in the units of its flag
# (lr: the peak rate per LR_REF_BATCH samples, as --lr).
TUNABLE = {"lr": "base_lr", "weight_decay": "weight_decay", "momentum": "momentum",
           "warmup_epochs": "warmup_epochs"}

# The SweepConfig fields a results folder's sweep may grow along (its grid); "tune" and
# "tune_seeds" are the tuned grids. Any other difference makes another experiment, which a
# folder never mixes in (sweep/plan.py extend_sweep).
GRID_AXES = ("specs", "batch_sizes", "seeds", "tune", "tune_seeds")


@dataclass(frozen=True)
class SweepConfig:
    """The grid: specs x micro-batch sizes x seeds over one base RunConfig. Tuned (`tune`
    not empty): every (spec, micro-batch) cell trains each point of the tuning grid on
    the tuning seeds (`trials`), then all seeds at the point chosen on validation
    (`expand(chosen)`; sweep/tune.py chooses)."""

    specs: tuple[str, ...]
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # micro-batch sizes (norm_batch)
    seeds: tuple[int, ...] = (0,)
    base: RunConfig = field(default_factory=lambda: RunConfig(spec=""))
    accumulate_to: int | None = None  # SGD batch for every spec; None: only accumulating specs
    default_accumulate_to: int = 128  # SGD batch of accumulating specs (bn-accum) when unset
    # the plugins the sweep uses: ("source@sha256:HEX", ("norm:NAME", "model:NAME", ...))
    plugins: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tune: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (TUNABLE key, its grid) per key
    tune_seeds: tuple[int, ...] = ()  # seeds of the tuning trials; (): the first of seeds

    def plugins_for(self, spec: str) -> tuple[str, ...]:
        """The plugins a run of `spec` on the base model and dataset uses."""
        used = {f"norm:{spec.partition(':')[0].strip()}",  # names without their options
                f"model:{self.base.model.partition(':')[0].strip()}",
                f"dataset:{self.base.dataset}"}
        return tuple(label for label, provides in self.plugins if used & set(provides))

    @property
    def trial_seeds(self) -> tuple[int, ...]:
        return self.tune_seeds or self.seeds[:1]

    def points(self) -> list[dict[str, float]]:
        """The tuning grid: the cartesian product of the keys' values, {key: value} each."""
        points = [{}]
        for key, grid in self.tune:
            points = [{**p, key: v} for p in points for v in grid]
        return points

    def trials(self) -> list[tuple[dict[str, float], RunConfig]]:
        """(point, run) of every tuning trial: cells x points x tuning seeds, in order."""
        runs, n = self._cells(self.trial_seeds), len(self.trial_seeds)
        return [(point, at_point(cfg, point)) for i in range(0, len(runs), n)
                for point in self.points() for cfg in runs[i:i + n]]

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

    def expand(self, chosen: dict[tuple[str, int], dict[str, float]] | None = None
               ) -> list[RunConfig]:
        """All runs, in the order they are executed (largest groups of work first is
        not attempted: order is specs, then batch sizes, then seeds, for readable logs).
        chosen: {(spec, norm_batch): point} of a tuned sweep, whose runs are at its cell's
        point (a cell without one is left out)."""
        runs = self._cells(self.seeds)
        if chosen is None:
            return runs
        return [at_point(cfg, chosen[cfg.spec, cfg.norm_batch]) for cfg in runs
                if (cfg.spec, cfg.norm_batch) in chosen]

    def _cells(self, seeds: tuple[int, ...]) -> list[RunConfig]:
        runs = []
        for spec in self.specs:
            for b in self.batch_sizes:
                sgd = self.sgd_batch_for(spec, b)
                for seed in seeds:
                    runs.append(dataclasses.replace(self.base, spec=spec, norm_batch=b,
                                                    sgd_batch=sgd, seed=seed,
                                                    plugins=self.plugins_for(spec)))
        return runs


def at_point(cfg: RunConfig, point: dict[str, float]) -> RunConfig:
    """The run with the tuned keys set to a grid point's values."""
    return dataclasses.replace(cfg, **{TUNABLE[k]: v for k, v in point.items()})
