"""Parallel local execution: independent runs in worker processes.

Each worker gets cores // workers torch threads so workers never oversubscribe the
machine; a run's numbers do not depend on which process runs it (same seeds, same
results as serial, up to the thread count's effect on float summation order).

Signals: workers ignore SIGINT, so Ctrl-C (which the terminal sends to every process of
the group) reaches only the driver, which terminates them; a worker whose driver died
(kill -9) exits within a second instead of training on as an orphan.

A worker that dies (killed, out of memory) breaks the whole pool, and every run in flight
fails with it, though only one may be at fault. Those runs are rerun in a fresh pool, each
alone; a run that breaks the pool when alone is recorded as failed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .run import execute_run, failed_record


def default_workers() -> int:
    """One per GPU, else one per two CPU cores, at least 1."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 1) // 2)


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # reparented: the driver is gone, nobody wants our result
            os._exit(1)


def _init_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: importing torch takes seconds
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


class ProcessExecutor:
    """`workers` spawned processes; results are yielded as runs finish. `fn(cfg, run_dir)
    -> record` is what a worker runs (execute_run; a test may pass a stand-in)."""

    def __init__(self, workers: int, threads: int | None = None, fn=execute_run):
        self.workers = workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.fn = fn

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.threads,))

    def map(self, tasks, store, events):
        pool = self._pool()
        pending = {}  # future -> cfg
        queue = deque(tasks)
        suspects = set()  # run ids in flight when a worker died: rerun alone

        def may_submit() -> bool:
            if not queue or len(pending) >= self.workers:
                return False
            alone = queue[0].run_id in suspects or any(
                c.run_id in suspects for c in pending.values())
            return not (alone and pending)

        try:
            while queue or pending:
                while may_submit():
                    cfg = queue.popleft()
                    events.on_start(cfg)
                    pending[pool.submit(self.fn, cfg, str(store.run_dir(cfg.run_id)))] = cfg
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                broken = []
                for fut in done:
                    cfg = pending.pop(fut)
                    try:
                        record = fut.result()
                    except BrokenProcessPool:
                        broken.append(cfg)
                        continue
                    except Exception as e:  # e.g. a result that could not be sent back
                        record = failed_record(cfg, f"{type(e).__name__}: {e}")
                    yield cfg, record
                if not broken:
                    continue
                # The pool is unusable: every run still in it failed with the dead worker,
                # except one whose result arrived just before.
                for fut, cfg in pending.items():
                    if fut.done() and fut.exception() is None:
                        yield cfg, fut.result()
                    else:
                        broken.append(cfg)
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = self._pool()
                for cfg in reversed(broken):
                    if cfg.run_id in suspects:  # it ran alone: it is the one that died
                        yield cfg, failed_record(cfg, "its worker process died (killed, "
                                                      "e.g. out of memory), twice")
                    else:
                        suspects.add(cfg.run_id)
                        queue.appendleft(cfg)
        finally:
            for fut in pending:
                fut.cancel()
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()  # Ctrl-C or --fail-fast: don't wait for running runs
            pool.shutdown(wait=False, cancel_futures=True)
