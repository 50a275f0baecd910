"""The sweep: plan the grid, skip finished runs, execute the rest, commit each result.

Runs are independent units: `execute_run(cfg, run_dir) -> record` is all an executor
needs, so the serial, process and Ray executors differ only in where that call happens.
The driver alone writes results (Store.commit), as runs finish.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .config import ConfigError, RunConfig, SweepConfig
from .store import Store


# ---------------------------------------------------------------- one run, anywhere
@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None):
    from .data import load_dataset

    return load_dataset(name, data_dir)


@lru_cache(maxsize=1)
def provenance() -> dict:
    """Versions and the git commit of the bknbench checkout, when there is one."""
    import numpy
    import torch

    from . import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"torch_version": torch.__version__, "git_commit": commit,
            "versions": {"python": platform.python_version(), "numpy": numpy.__version__,
                         "bknbench": __version__}}


def wants_kernels(cfg: RunConfig) -> bool:
    """Whether the C++ kernels of native.py serve the run when built: on the CPU, eager
    (the compiler traces the reference functions instead)."""
    from .train import resolve_device

    try:
        return resolve_device(cfg.device) == "cpu" and not cfg.compile
    except ValueError:
        return False


def kernels(cfg: RunConfig) -> str:
    """Which code ran BKN's and grouped BN's training math: 'native' (the C++ kernels) or
    'torch' (PyTorch ops: the autograd nodes, or what the compiler made). Same results,
    different speed."""
    from . import native

    return "native" if wants_kernels(cfg) and native.module() is not None else "torch"


def make_row(cfg: RunConfig, outcome) -> dict:
    from .norms import parse_spec

    last = outcome.epochs[-1] if outcome.epochs else {}
    accs = [e["val_acc"] for e in outcome.epochs]
    ok = outcome.status == "ok"
    return {
        "run_id": cfg.run_id, "spec": cfg.spec, "norm": parse_spec(cfg.spec).name,
        "dataset": cfg.dataset, "model": cfg.model, "norm_batch": cfg.norm_batch,
        "sgd_batch": cfg.sgd_batch, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
        "status": outcome.status, "reason": outcome.reason,
        "final_val_acc": last.get("val_acc") if ok else None,
        "best_val_acc": max(accs) if ok and accs else None,
        "final_train_loss": last.get("train_loss"),
        "train_time_s": round(outcome.train_time_s, 4),
        "samples_per_s": round(outcome.samples / outcome.train_time_s, 2)
        if outcome.train_time_s > 0 else None,
        "peak_mem_mb": outcome.peak_mem_mb, "device": cfg.device, "amp": cfg.amp,
        "compile": cfg.compile, "deterministic": cfg.deterministic,
        **provenance(), "versions": json.dumps({**provenance()["versions"],
                                                "kernels": kernels(cfg)}),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
    }


def failed_record(cfg: RunConfig, reason: str) -> dict:
    """The record of a run that could not report itself (its worker died)."""
    from .train import RunOutcome

    return {"row": make_row(cfg, RunOutcome(status="failed", reason=reason)), "metrics": [],
            "finished_at": time.time()}


def execute_run(cfg: RunConfig, run_dir: str | None = None,
                on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train one run and return its record {"row", "metrics", "finished_at"}. Any error of
    the run becomes a failed record; a checkpoint in run_dir lets it continue."""
    from .train import train_run

    checkpoint = Path(run_dir) / "checkpoint.pt" if run_dir else None
    try:
        outcome = train_run(cfg, _dataset(cfg.dataset, cfg.data_dir), on_epoch, checkpoint)
    except Exception as e:  # isolation: one broken run never stops the sweep
        return failed_record(cfg, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    return {"row": make_row(cfg, outcome), "metrics": outcome.epochs, "finished_at": time.time()}


# ---------------------------------------------------------------- executors
class Executor(Protocol):
    """Runs tasks, yielding (cfg, record) as each finishes, in any order; calls
    events.on_start when a run starts and events.on_epoch where it can observe epochs."""

    def map(self, tasks: list[RunConfig], store: Store,
            events: "SweepEvents") -> Iterator[tuple[RunConfig, dict]]:
        ...


class SerialExecutor:
    """In this process, one run after the other; reports every epoch."""

    def map(self, tasks, store, events):
        for cfg in tasks:
            events.on_start(cfg)
            cb = (lambda row, cfg=cfg: events.on_epoch(cfg, row)) if events.on_epoch else None
            yield cfg, execute_run(cfg, str(store.run_dir(cfg.run_id)), cb)


# ---------------------------------------------------------------- the sweep
@dataclass
class SweepReport:
    out: Path
    planned: int = 0
    skipped: int = 0  # finished before this invocation
    earlier: list[dict] = field(default_factory=list)  # their rows
    finished: list[dict] = field(default_factory=list)  # rows finished now
    interrupted: bool = False
    stopped_early: bool = False  # --fail-fast

    @property
    def failed(self) -> list[dict]:
        """Every run of the sweep that is not ok, whether it failed now or before."""
        return [r for r in self.earlier + self.finished if r["status"] != "ok"]


@dataclass
class SweepEvents:
    """Callbacks for progress rendering; the library itself prints nothing."""

    on_plan: Callable[[int, int], None] = lambda total, todo: None
    on_start: Callable[[RunConfig], None] = lambda cfg: None
    on_epoch: Callable[[RunConfig, dict], None] | None = None
    on_finish: Callable[[RunConfig, dict], None] = lambda cfg, row: None


def sweep_to_dict(sweep: SweepConfig) -> dict:
    d = dataclasses.asdict(sweep)
    d["base"] = sweep.base.to_dict()
    return d


def sweep_from_dict(d: dict) -> SweepConfig:
    return SweepConfig(specs=tuple(d["specs"]), batch_sizes=tuple(d["batch_sizes"]),
                       seeds=tuple(d["seeds"]), base=RunConfig.from_dict(d["base"]),
                       accumulate_to=d.get("accumulate_to"),
                       default_accumulate_to=d.get("default_accumulate_to", 128))


def plan(sweep: SweepConfig, store: Store, retry_failed: bool = False):
    """(all runs, runs still to do). A run is done when its record exists (and, with
    retry_failed, is ok)."""
    runs = sweep.expand()
    ids = [cfg.run_id for cfg in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError("the sweep repeats a configuration (a spec, batch or seed given twice)")
    todo = []
    for cfg in runs:
        rec = store.load_record(cfg.run_id)
        if rec is None or (retry_failed and rec["row"]["status"] != "ok"):
            todo.append(cfg)
    return runs, todo


def run_sweep(sweep: SweepConfig, out: Path, executor: Executor | None = None,
              events: SweepEvents | None = None, fail_fast: bool = False,
              retry_failed: bool = False) -> SweepReport:
    """Run every unfinished run of the sweep in `out`, committing each as it finishes.
    KeyboardInterrupt is caught: finished runs are kept and the report says so."""
    events = events or SweepEvents()
    executor = executor or SerialExecutor()
    store = Store(out)
    store.prepare()
    report = SweepReport(out=Path(out))
    results = None
    try:
        store.save_sweep(sweep_to_dict(sweep))
        runs, todo = plan(sweep, store, retry_failed)
        report.planned, report.skipped = len(runs), len(runs) - len(todo)
        redo = {cfg.run_id for cfg in todo}
        report.earlier = [store.load_record(cfg.run_id)["row"] for cfg in runs
                          if cfg.run_id not in redo]
        events.on_plan(len(runs), len(todo))
        if not todo:
            return report
        results = executor.map(todo, store, events)
        for cfg, record in results:
            store.commit(record)
            report.finished.append(record["row"])
            events.on_finish(cfg, record["row"])
            if fail_fast and record["row"]["status"] != "ok":
                report.stopped_early = True
                break
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        close = getattr(results, "close", None)
        if close:
            close()
    return report
