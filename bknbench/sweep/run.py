"""One run, anywhere: ``execute_run(cfg, run_dir) -> record`` is all an executor needs, so
the serial, process and Ray executors differ only in where that call happens. A record is
{"row": the runs.csv row, "metrics": the metrics.csv rows, "stats": the stats.csv rows
(--diagnose), "finished_at"}.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ..config import RunConfig


# ---------------------------------------------------------------- one run, anywhere
@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None, val_fraction: float):
    from ..data import load_dataset

    return load_dataset(name, data_dir, val_fraction)


@lru_cache(maxsize=1)
def provenance() -> dict:
    """Versions and the git commit of the bknbench checkout, when there is one."""
    import numpy
    import torch

    from .. import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"torch_version": torch.__version__, "git_commit": commit,
            "versions": {"python": platform.python_version(), "numpy": numpy.__version__,
                         "bknbench": __version__}}


def wants_kernels(cfg: RunConfig) -> bool:
    """Whether the C++ kernels of kernels/native.py serve the run when built: on the CPU, eager
    (the compiler traces the reference functions instead)."""
    from ..device import resolve_device

    try:
        return resolve_device(cfg.device) == "cpu" and not cfg.compile
    except ValueError:
        return False


def kernels(cfg: RunConfig) -> str:
    """Which code ran BKN's and grouped BN's training math: 'native' (the C++ kernels) or
    'torch' (PyTorch ops: the autograd nodes, or what the compiler made). Same results,
    different speed."""
    from ..kernels import native

    return "native" if wants_kernels(cfg) and native.module() is not None else "torch"


def run_threads(cfg: RunConfig) -> int:
    """The torch intra-op threads a run trains with: cfg.threads when set; else 1 under
    --deterministic, since float sums follow the thread count and one count makes the
    serial, process and Ray executors give the same numbers; else the executor's share,
    which it set in this process (all cores when serial, cores // workers in a worker,
    --cpus-per-run on Ray)."""
    import torch

    return cfg.threads or (1 if cfg.deterministic else torch.get_num_threads())


def make_row(cfg: RunConfig, outcome, threads: int | None = None) -> dict:
    rows = outcome.epochs  # a row per evaluation; best_val_acc looks at epoch ends only,
    # so it does not depend on --evals-per-epoch
    last = rows[-1] if rows else {}
    accs = [r["val_acc"] for i, r in enumerate(rows) if r.get("val_acc") is not None
            and (i + 1 == len(rows) or rows[i + 1]["epoch"] != r["epoch"])]
    ok = outcome.status == "ok"
    return {
        "run_id": cfg.run_id, "spec": cfg.spec, "norm": cfg.spec.partition(":")[0].strip(),
        "dataset": cfg.dataset, "model": cfg.model, "norm_batch": cfg.norm_batch,
        "sgd_batch": cfg.sgd_batch, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
        "status": outcome.status, "reason": outcome.reason,
        "final_val_acc": last.get("val_acc") if ok else None,
        "final_test_acc": outcome.test_acc if ok else None,
        "final_val_acc_population": outcome.val_acc_population if ok else None,
        "best_val_acc": max(accs) if ok and accs else None,
        "val_samples": outcome.val_samples, "test_samples": outcome.test_samples,
        "final_train_loss": last.get("train_loss"),
        "train_time_s": round(outcome.train_time_s, 4),
        "samples_per_s": round(outcome.samples / outcome.train_time_s, 2)
        if outcome.train_time_s > 0 else None,
        "peak_mem_mb": outcome.peak_mem_mb, "device": cfg.device, "amp": cfg.amp,
        "compile": cfg.compile, "deterministic": cfg.deterministic, "threads": threads,
        "diagnose": cfg.diagnose,
        **provenance(), "versions": json.dumps({**provenance()["versions"],
                                                "kernels": kernels(cfg)}),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "plugins": json.dumps(list(cfg.plugins)) if cfg.plugins else None,
    }


def failed_record(cfg: RunConfig, reason: str) -> dict:
    """The record of a run that could not report itself (its worker died)."""
    from ..train import RunOutcome

    return {"row": make_row(cfg, RunOutcome(status="failed", reason=reason)), "metrics": [],
            "stats": [], "finished_at": time.time()}


def execute_run(cfg: RunConfig, run_dir: str | None = None,
                on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train one run with run_threads(cfg) torch threads and return its record {"row",
    "metrics", "stats", "finished_at"}. Any error of the run becomes a failed record; a
    checkpoint in run_dir lets it continue."""
    import torch

    from ..plugins import load_labels
    from ..train import train_run

    checkpoint = Path(run_dir) / "checkpoint.pt" if run_dir else None
    share, threads = torch.get_num_threads(), run_threads(cfg)
    torch.set_num_threads(threads)
    try:
        load_labels(cfg.plugins)  # a spawned worker or Ray task: the run's plugins, again
        data = _dataset(cfg.dataset, cfg.data_dir, cfg.val_fraction)
        outcome = train_run(cfg, data, on_epoch, checkpoint)
    except Exception as e:  # isolation: one broken run never stops the sweep
        return failed_record(cfg, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    finally:
        torch.set_num_threads(share)  # the next run of this process starts from the share
    return {"row": make_row(cfg, outcome, threads), "metrics": outcome.epochs,
            "stats": outcome.stats, "finished_at": time.time()}


# ---------------------------------------------------------------- epochs back to the driver
def epoch_sender(put: Callable[[tuple], None], run_id: str) -> Callable[[dict], None]:
    """The on_epoch of a run in a worker or a task: each row put on the driver's queue.
    Progress is best effort: a row that cannot be sent never fails the run."""
    def on_epoch(row: dict) -> None:
        try:
            put((run_id, row))
        except Exception:  # the queue is full or gone: the driver is stopping
            pass
    return on_epoch


def pass_epochs(queue, running: dict, events) -> None:
    """In the driver: hand the rows waiting on `queue` (a multiprocessing or Ray queue) to
    events.on_epoch, for runs still running (`running`: run id -> cfg)."""
    import queue as queues

    while queue is not None:
        try:
            run_id, row = queue.get_nowait()
        except (queues.Empty, OSError, EOFError):  # Ray's Empty is one; or the queue is gone
            return
        if run_id in running:
            events.on_epoch(running[run_id], row)

