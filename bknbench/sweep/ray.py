"""Ray execution: each run is a Ray task (core tasks, not Tune: the grid is fixed and
resume is the Store's); this process, the driver, commits every result as it finishes.

Ray does the placement. bknbench only keeps as many tasks in flight as the cluster has
room for (re-read as nodes join), so the progress shows runs that are running, and
Ctrl-C or --fail-fast cancels little. Ray is imported here only, and only when used.

Checkpoints: a task is given its run folder and checkpoints there only when that folder
exists on the node it runs on (the driver's machine, or an --out on a filesystem shared
by all nodes). Elsewhere it trains without checkpoints, so a run interrupted on another
node restarts from scratch; bknbench never creates folders on other nodes.

Failures: an error inside a run is already a failed record (execute_run). A worker or
node that dies is retried `retries` times by Ray; after that the run is a failed record
("ray worker died: ..."), never a missing one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import ConfigError
from .run import epoch_sender, execute_run, failed_record, pass_epochs

INSTALL_HINT = 'pip install ".[ray]" in a bknbench checkout (or: pip install "ray[default]>=2.9")'
WAIT_S = 1.0  # how often the driver wakes to notice Ctrl-C and nodes that joined


def import_ray():
    """The ray module, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}"
                          ) from None
    return ray


def bknbench_run(cfg, run_dir: str | None, threads: int, epochs=None) -> dict:
    """The Ray task (its worker shows as `ray::bknbench_run`): one run, with as many
    torch threads as CPUs it reserved; each epoch's row put on `epochs` (a Ray queue the
    driver reads), when given."""
    import torch

    torch.set_num_threads(threads)
    if run_dir is not None and not Path(run_dir).parent.is_dir():
        run_dir = None  # the output folder is not on this node: run without checkpoints

    on_epoch = epoch_sender(epochs.put_nowait, cfg.run_id) if epochs is not None else None
    return execute_run(cfg, run_dir, on_epoch)


class RayExecutor:
    """Runs each configuration as a Ray task with `cpus_per_run` CPUs and `gpus_per_run`
    GPUs (a fraction lets small runs share a GPU); yields results as tasks finish.

    address: a Ray cluster ("HOST:6379", "ray://HOST:10001", "auto"); None means
    RAY_ADDRESS, else a Ray already started on this machine, else a local Ray for the
    sweep. When Ray is already initialized in this process (a library user, the tests),
    that connection is used and left open.
    """

    def __init__(self, address: str | None = None, cpus_per_run: int = 1,
                 gpus_per_run: float = 0.0, retries: int = 0):
        if cpus_per_run < 1:
            raise ConfigError(f"--cpus-per-run must be at least 1, got {cpus_per_run}")
        if gpus_per_run < 0 or (gpus_per_run > 1 and gpus_per_run != int(gpus_per_run)):
            raise ConfigError("--gpus-per-run must be a fraction of one GPU (0 to 1) or a "
                              f"whole number of GPUs, got {gpus_per_run}")
        if retries < 0:
            raise ConfigError(f"--retries must be >= 0, got {retries}")
        import_ray()  # fail now, with the install hint, rather than mid-sweep
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.retries = retries

    def _connect(self, ray) -> bool:
        """Connect (or start a local Ray); True when this call did, so map() undoes it."""
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # unless the user chose
        try:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level="warning")  # Ray's warnings only; runs print nothing
        except ConnectionError as e:
            where = self.address or os.environ.get("RAY_ADDRESS") or "local"
            raise ConfigError(f"cannot connect to the Ray cluster at {where}: {e}") from None
        return True

    def capacity(self, ray) -> int:
        """How many runs the cluster can hold at once, from its total resources."""
        total = ray.cluster_resources()
        fits = [math.floor(total.get("CPU", 0) / self.cpus_per_run + 1e-9)]
        if self.gpus_per_run > 0:
            fits.append(math.floor(total.get("GPU", 0) / self.gpus_per_run + 1e-9))
        return min(fits)

    def map(self, tasks, store, events):
        ray = import_ray()
        connected_here = self._connect(ray)
        task = ray.remote(bknbench_run).options(
            num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
            max_retries=self.retries, retry_exceptions=False)  # run errors are records
        queue, pending = list(tasks), {}
        epochs = None
        try:
            if events.on_epoch is not None:  # an actor holding the tasks' epoch rows
                from ray.util.queue import Queue

                epochs = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
            room = self.capacity(ray)
            if room < 1:
                total = ray.cluster_resources()
                raise ConfigError(
                    f"the Ray cluster has {total.get('CPU', 0):g} CPUs and "
                    f"{total.get('GPU', 0):g} GPUs; a run asks for {self.cpus_per_run} CPUs "
                    f"and {self.gpus_per_run:g} GPUs (--cpus-per-run, --gpus-per-run)")
            while queue or pending:
                while queue and len(pending) < room:
                    cfg = queue.pop(0)
                    events.on_start(cfg)
                    ref = task.remote(cfg, str(store.run_dir(cfg.run_id)), self.cpus_per_run,
                                      epochs)
                    pending[ref] = cfg
                done, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
                pass_epochs(epochs, {c.run_id: c for c in pending.values()}, events)
                for ref in done:
                    cfg = pending.pop(ref)
                    yield cfg, self._record(ray, ref, cfg)
                room = max(1, self.capacity(ray))
        finally:
            for ref in pending:  # Ctrl-C, --fail-fast or an error: stop what still runs
                ray.cancel(ref, force=True)
            if epochs is not None:
                epochs.shutdown()
            if connected_here:
                ray.shutdown()

    @staticmethod
    def _record(ray, ref, cfg) -> dict:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # what execute_run could not catch
            cause = e.cause if getattr(e, "cause", None) is not None else e
            return failed_record(cfg, f"ray task failed: {type(cause).__name__}: "
                                      f"{(str(cause).splitlines() or [''])[0]}")
        except ray.exceptions.RayError as e:  # worker or node died, after the retries
            return failed_record(cfg, f"ray worker died: {type(e).__name__}: "
                                      f"{(str(e).strip().splitlines() or [''])[0]}")
