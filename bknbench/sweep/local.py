"""Parallel local execution: independent runs in worker processes.

The default is one worker per CPU core: the models are small, and a process per core keeps
every core busy where threads inside one small op cannot. With --device cuda it is one
worker per GPU, each worker pinned to its own GPU (CUDA_VISIBLE_DEVICES); a named device
(cuda:N, mps) gets one. Each worker gets cores // workers torch threads, so workers never
oversubscribe the machine, and a sweep with fewer runs than workers starts fewer workers,
each with more threads. Under --deterministic every run uses the same thread count
(run.run_threads), so its numbers do not depend on which process runs it.

Signals: workers ignore SIGINT, so Ctrl-C (which the terminal sends to every process of
the group) reaches only the driver, which terminates them; they start with it blocked, so
one during their start-up imports cannot stop them with a traceback either. A worker whose
driver died (kill -9) exits within a second instead of training on as an orphan.

A worker that dies (killed, out of memory) breaks the whole pool, and every run in flight
fails with it, though only one may be at fault. Those runs are rerun in a fresh pool, each
alone; a run that breaks the pool when alone is recorded as failed.
"""
from __future__ import annotations

import contextlib
import inspect
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.managers import SyncManager

from .run import epoch_sender, execute_run, failed_record, pass_epochs

WAIT_S = 0.5  # how often the driver passes on the epochs workers sent, at most


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. under taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: str = "cpu") -> int:
    """One per CPU core; with --device cuda one per GPU; one on a named device."""
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return cpu_cores() if device == "cpu" else 1


def gpu_slots(workers: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES of each worker: the visible GPUs in turn."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return [ids[i % len(ids)] for i in range(workers)] if ids else []


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # reparented: the driver is gone, nobody wants our result
            os._exit(1)


@contextlib.contextmanager
def _sigint_blocked():
    """Processes spawned in the block inherit SIGINT blocked until _init_worker ignores it
    (their imports come before it). The driver gets a Ctrl-C when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


_EPOCHS = None  # in a worker: the driver's queue of (run id, epoch row), when it wants them


def _init_worker(threads: int, gpus, epochs=None) -> None:
    global _EPOCHS
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: importing torch takes seconds
    _EPOCHS = epochs
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if gpus is not None:  # before torch sees CUDA: this worker's GPU becomes its cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get()
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def _run(fn, cfg, run_dir):
    """In a worker: fn(cfg, run_dir), its epochs sent to the driver when it wants them and
    fn takes on_epoch."""
    if _EPOCHS is None or "on_epoch" not in inspect.signature(fn).parameters:
        return fn(cfg, run_dir)
    return fn(cfg, run_dir, on_epoch=epoch_sender(_EPOCHS.put, cfg.run_id))


class ProcessExecutor:
    """Up to `workers` spawned processes (no more than there are runs); results are yielded
    as runs finish. `fn(cfg, run_dir) -> record` is what a worker runs (execute_run; a test
    may pass a stand-in). device "cuda": each worker pinned to a GPU, in turn."""

    def __init__(self, workers: int, threads: int | None = None, fn=execute_run,
                 device: str = "cpu"):
        self.workers = workers
        self.threads = threads  # None: cores // the workers started
        self.fn = fn
        self.device = device

    def _pool(self, workers: int, epochs=None) -> ProcessPoolExecutor:
        ctx = mp.get_context("spawn")
        slots = gpu_slots(workers) if self.device == "cuda" else []
        gpus = ctx.Queue() if slots else None
        for slot in slots:
            gpus.put(slot)
        threads = self.threads or max(1, cpu_cores() // workers)
        return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(threads, gpus, epochs))

    def map(self, tasks, store, events):
        workers = max(1, min(self.workers, len(tasks)))
        manager = epochs = None
        if events.on_epoch is not None:  # epoch rows come back through a manager's queue
            manager = SyncManager(ctx=mp.get_context("spawn"))
            with _sigint_blocked():  # Ctrl-C is the driver's to handle, never the manager's
                manager.start()
            epochs = manager.Queue()
        pool = self._pool(workers, epochs)
        pending = {}  # future -> cfg
        queue = deque(tasks)
        suspects = set()  # run ids in flight when a worker died: rerun alone

        def may_submit() -> bool:
            if not queue or len(pending) >= workers:
                return False
            alone = queue[0].run_id in suspects or any(
                c.run_id in suspects for c in pending.values())
            return not (alone and pending)

        try:
            while queue or pending:
                while may_submit():
                    cfg = queue.popleft()
                    events.on_start(cfg)
                    with _sigint_blocked():  # submit spawns the workers
                        pending[pool.submit(_run, self.fn, cfg,
                                            str(store.run_dir(cfg.run_id)))] = cfg
                done, _ = wait(pending, timeout=WAIT_S if epochs else None,
                               return_when=FIRST_COMPLETED)
                pass_epochs(epochs, {c.run_id: c for c in pending.values()}, events)
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
                pool = self._pool(workers, epochs)
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
            # wait: quick, the workers are gone; joined here, the pool's thread cannot be
            # closing its pipe while Python 3.11's exit handler writes to it, which prints
            # "OSError: [Errno 9] Bad file descriptor" after a clean exit
            pool.shutdown(wait=True, cancel_futures=True)
            if manager is not None:
                manager.shutdown()
