"""The sweep: plan the grid, skip finished runs, execute the rest, commit each result.

Runs are independent units (run.py); the driver alone writes results (Store.commit), as
runs finish. The serial executor is here; the process pool is local.py, Ray is ray.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from ..config import GRID_AXES, RunConfig, SweepConfig
from ..errors import ConfigError
from ..plugins import SHA
from .run import execute_run
from .store import Store


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
    earlier_failed: list[dict] = field(default_factory=list)  # rows of those not ok
    finished: list[dict] = field(default_factory=list)  # rows finished now
    interrupted: bool = False
    stopped_early: bool = False  # --fail-fast

    @property
    def failed(self) -> list[dict]:
        """Every run of the sweep that is not ok, whether it failed now or before."""
        return self.earlier_failed + [r for r in self.finished if r["status"] != "ok"]


@dataclass
class SweepEvents:
    """Callbacks for progress rendering; the library itself prints nothing."""

    on_plan: Callable[[int, int], None] = lambda total, todo: None
    on_start: Callable[[RunConfig], None] = lambda cfg: None
    on_epoch: Callable[[RunConfig, dict], None] | None = None
    on_finish: Callable[[RunConfig, dict], None] = lambda cfg, row: None
    on_todo: Callable[[list[RunConfig]], None] = lambda todo: None  # the runs to do, planned


def sweep_to_dict(sweep: SweepConfig) -> dict:
    d = dataclasses.asdict(sweep)
    d["base"] = sweep.base.to_dict()
    d["plugins"] = [{"source": label.rpartition(SHA)[0], "sha256": label.rpartition(SHA)[2],
                     "provides": list(provides)} for label, provides in sweep.plugins]
    d["tune"] = {key: list(grid) for key, grid in sweep.tune}  # {key: grid}, in order
    return d


def sweep_from_dict(d: dict) -> SweepConfig:
    """The sweep saved by sweep_to_dict; ConfigError when `d` is not one."""
    try:
        return SweepConfig(specs=tuple(d["specs"]), batch_sizes=tuple(d["batch_sizes"]),
                           seeds=tuple(d["seeds"]), base=RunConfig.from_dict(d["base"]),
                           accumulate_to=d.get("accumulate_to"),
                           default_accumulate_to=d.get("default_accumulate_to", 128),
                           plugins=tuple((f"{p['source']}{SHA}{p['sha256']}",
                                          tuple(p["provides"])) for p in d.get("plugins", [])),
                           tune=tuple((k, tuple(float(v) for v in grid))
                                      for k, grid in d.get("tune", {}).items()),
                           tune_seeds=tuple(d.get("tune_seeds", ())))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"not a bknbench sweep ({type(e).__name__}: {e})") from None


def plan(sweep: SweepConfig | list[RunConfig], store: Store, retry_failed: bool = False):
    """(all runs, runs still to do) of a sweep (its expand()) or a list of runs. A run is
    done when the index holds it (and, with retry_failed, it is ok); no record is read."""
    runs = sweep.expand() if isinstance(sweep, SweepConfig) else list(sweep)
    ids = [cfg.run_id for cfg in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError("the sweep repeats a configuration (a spec, batch or seed given twice)")
    done = store.finished()
    todo = [cfg for cfg in runs if cfg.run_id not in done
            or (retry_failed and done[cfg.run_id] != "ok")]
    return runs, todo


# ---------------------------------------------------------------- one sweep per folder


def _settings(d: dict) -> dict:
    """A saved sweep's settings outside its grid, flattened: {"epochs": 3, ...}; the
    round trip through SweepConfig fills fields added since the folder was written."""
    d = sweep_to_dict(sweep_from_dict(d))
    flat = {k: v for k, v in d.items() if k not in GRID_AXES and k != "base"}
    flat.update({k: v for k, v in d["base"].items() if k != "spec"})
    return flat


def grid_of(d: dict) -> dict:
    """The grid axes of a sweep as sweep.json holds them (lists, not tuples: a grid compares
    equal before and after the round trip through JSON)."""
    return json.loads(json.dumps({k: d[k] for k in GRID_AXES if k in d}))


def extend_sweep(saved: dict | None, sweep: SweepConfig, out: Path) -> dict:
    """The sweep.json of `out` once `sweep` runs there: `sweep`, with "history" listing the
    grids run in the folder, in order. ConfigError, naming the settings, when the folder
    holds a sweep that differs in anything but its grid."""
    new = sweep_to_dict(sweep)
    if saved is None:
        return {**new, "history": [grid_of(new)]}
    try:
        there = _settings(saved)
    except ConfigError as e:
        raise ConfigError(f"{Path(out) / 'sweep.json'}: {e}") from None
    here = _settings(new)
    diffs = [k for k in dict.fromkeys([*there, *here]) if there.get(k) != here.get(k)]
    if diffs:
        from ..report.reproduce import flag_name

        said = "; ".join(f"{flag_name(k)} {_text(there.get(k))} there, {_text(here.get(k))} "
                         "here" for k in diffs)
        raise ConfigError(f"{out} holds another sweep ({said}); a folder holds one sweep, "
                          f"whose grid (norms, batch sizes, seeds) may grow: give a new --out "
                          f"folder, or continue that sweep with --resume {out}")
    history = saved.get("history") or [grid_of(saved)]
    if grid_of(new) not in history:
        history = [*history, grid_of(new)]
    return {**new, "history": history}


def _text(value) -> str:
    if value is None:
        return "unset"
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def earlier_grids(saved: dict) -> tuple[SweepConfig, ...]:
    """Every grid of a folder's sweep.json as a SweepConfig (its settings, that grid)."""
    return tuple(sweep_from_dict({**saved, **grid}) for grid in saved.get("history", []))


@contextlib.contextmanager
def ctrl_c_deferred():
    """A Ctrl-C inside the block takes effect as it ends: a commit (milliseconds) is never
    cut in half, so a run on disk is also in the index and in the report."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield  # Ctrl-C is ignored, or someone else's to handle
        return
    caught = []
    signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def run_sweep(sweep: SweepConfig, out: Path, executor: Executor | None = None,
              events: SweepEvents | None = None, fail_fast: bool = False,
              retry_failed: bool = False, log: tuple[str, ...] = ()) -> SweepReport:
    """Run every unfinished run of the sweep in `out`, committing each as it finishes (and
    handing its record to each logger of `log`, sweep/logs.py). A tuned sweep first runs
    its trials in `out`/trials, writes `out`/tuning.csv and then the runs at the chosen
    points in `out` (a tuning seed's trial at its cell's chosen point is copied, not trained
    again). KeyboardInterrupt is caught: finished runs are kept and the report says so."""
    events = events or SweepEvents()
    executor = executor or SerialExecutor()
    store = Store(out)
    try:
        store.prepare()
        saved = extend_sweep(store.saved_sweep(), sweep, out)
        store.save_sweep(saved)  # before a Ctrl-C may say "resume"
        from ..report.reproduce import run_toml

        store.save_config(run_toml(saved, out))
        if log:
            from .logs import open_logs

            loggers = open_logs(log, out, saved)
        else:
            loggers = []
    except BaseException:
        store.close()
        raise
    report = SweepReport(out=Path(out))
    try:
        runs, tables = {}, []  # every grid of the folder (this one last), each run once
        for grid in earlier_grids(saved):
            chosen = None
            if grid.tune:
                chosen = _tune(grid, store, executor, events, report, fail_fast, retry_failed,
                               tables)
                if chosen is None:
                    return report
            runs.update((cfg.run_id, cfg) for cfg in grid.expand(chosen))
        _execute(list(runs.values()), store, executor, events, report, fail_fast,
                 retry_failed, loggers)
    finally:
        store.close()
        for logger in loggers:
            logger.close(report.interrupted)
    return report


def _tune(sweep, store: Store, executor, events, report, fail_fast, retry_failed,
          tables: list):
    """The trials (sweep/tune.py); {(spec, norm_batch): chosen point}, or None when they
    did not all finish (interrupted, --fail-fast). tuning.csv holds the trials of this
    grid and of the tuned grids before it in `tables`, to which this one is added."""
    from .tune import TRIALS, choose, write_tuning

    trials = Store(store.root / TRIALS)
    trials.prepare()
    try:
        _execute([cfg for _, cfg in sweep.trials()], trials, executor, events, report,
                 fail_fast, retry_failed)
        if report.interrupted or report.stopped_early:
            return None
        rows = {run_id: trials.load_record(run_id)["row"] for run_id in trials.finished()}
        chosen, table = choose(sweep, rows)
        tables.append((sweep, table))
        write_tuning(store.root, tables)
        done = store.finished()  # the tuning seeds' trials at the chosen points are final
        for cfg in sweep.expand(chosen):
            if cfg.run_id in rows and cfg.run_id not in done:
                with ctrl_c_deferred():
                    store.commit(trials.load_record(cfg.run_id))
        return chosen
    except KeyboardInterrupt:  # between two copies: the next run copies the rest
        report.interrupted = True
        return None
    finally:
        trials.close()


def _execute(runs: list[RunConfig], store: Store, executor: Executor, events: SweepEvents,
             report: SweepReport, fail_fast: bool, retry_failed: bool,
             loggers: list = ()) -> None:
    """Run the runs not finished in `store`, committing each (and logging it to
    `loggers`); adds to `report`."""
    results = None
    try:
        runs, todo = plan(runs, store, retry_failed)
        report.planned += len(runs)
        report.skipped += len(runs) - len(todo)
        done, redo = store.finished(), {cfg.run_id for cfg in todo}
        report.earlier_failed += [store.load_record(cfg.run_id)["row"] for cfg in runs
                                  if done.get(cfg.run_id, "ok") != "ok"
                                  and cfg.run_id not in redo]
        events.on_plan(len(runs), len(todo))
        events.on_todo(todo)
        if not todo:
            return
        results = executor.map(todo, store, events)
        for cfg, record in results:
            with ctrl_c_deferred():
                store.commit(record)
                report.finished.append(record["row"])
            for logger in loggers:
                logger.log(record)
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
