"""Parallel local execution: independent runs in worker processes.

Each worker gets cores // workers torch threads so workers never oversubscribe the
machine; a run's numbers do not depend on which process runs it (same seeds, same
results as serial, up to the thread count's effect on float summation order).
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from .sweep import execute_run, failed_record


def default_workers() -> int:
    """One per GPU, else one per two CPU cores, at least 1."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 1) // 2)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


class ProcessExecutor:
    """`workers` spawned processes; results are yielded as runs finish."""

    def __init__(self, workers: int, threads: int | None = None):
        self.workers = workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.threads,))

    def map(self, tasks, store, events):
        pool = self._pool()
        pending = {}
        queue = list(tasks)
        try:
            while queue or pending:
                while queue and len(pending) < self.workers:
                    cfg = queue.pop(0)
                    events.on_start(cfg)
                    pending[pool.submit(execute_run, cfg, str(store.run_dir(cfg.run_id)))] = cfg
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    cfg = pending.pop(fut)
                    try:
                        record = fut.result()
                    except Exception as e:  # the worker process died (killed, out of memory)
                        record = failed_record(cfg, f"worker died: {type(e).__name__}")
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = self._pool()
                    yield cfg, record
        finally:
            for fut in pending:
                fut.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()  # Ctrl-C or --fail-fast: don't wait for running runs
            pool.shutdown(wait=False, cancel_futures=True)
