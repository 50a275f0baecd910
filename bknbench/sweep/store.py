"""The results folder: each run's record committed atomically, its rows appended to the index.

Layout of an output folder:
    sweep.json                  the sweep that was asked for (for --resume)
    runs/<run_id>/record.json   one finished run: its row and its rows of every table
    runs/<run_id>/checkpoint.pt the last epoch of an unfinished run
    runs.csv, metrics.csv,      the index (index.TABLES): the rows of every committed record
      stats.csv                 (stats.csv: the diagnostics' rows, with --diagnose)
    index.log                   which runs the index holds: a line per run with its status
                                and each table's length in bytes once its rows are in
    .lock                       held by the `bknbench run` using the folder

Commit: the record is written to a temporary file and renamed, so a kill at any instant
leaves no record or a whole one; then its rows are appended to each table (one write()
each) and its line to index.log. The cost does not grow with the number of runs. A kill
can leave a temporary file, a table longer than index.log says (part of the cut commit)
or an index behind the records; `prepare`, at the start of every `bknbench run`, removes
the first, truncates the tables to index.log's lengths and appends what the records hold
beyond it. Anything else (a table cut short or with another header, a deleted record or
index.log, a run indexed twice) rebuilds the index from the records, each table replaced
atomically. A run committed again (--retry-failed) first leaves the index, then is
appended. So the tables never hold a run twice, and a kill leaves them at most one run
behind. (Linux can cut one write() on SIGKILL only between two memory pages; prepare
truncates such a cut row as well.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from . import index
from .index import LOG, append, atomic_write, header, log_line, rows_of


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._status: dict[str, str] | None = None  # run id -> status of each indexed run
        self._sizes: dict[str, int] | None = None  # table -> bytes; None: no index yet
        self._lock: int | None = None

    # ------------------------------------------------------------ the folder
    def prepare(self) -> None:
        """Create the folder, or fail with one line when it cannot be written; take the
        folder's lock; then clear what a killed sweep may have left (temporary files, an
        index that lags or holds part of a commit)."""
        try:
            (self.root / "runs").mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_text("")
            probe.unlink()
            self._take_lock()
            ids, tmps = self._scan()
            for tmp in [*self.root.glob("*.tmp"), *tmps]:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot write to output folder {self.root}: {e.strerror}") from None
        self._recover(ids)

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no guard against two sweeps in one folder
            return
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.root} is in use by another `bknbench run` (it holds "
                              f"{self.root / '.lock'}); wait for it, or give another --out"
                              ) from None
        self._lock = fd

    def close(self) -> None:
        """Release the folder's lock (the kernel does so too when the process dies)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def checkpoint(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "checkpoint.pt"

    def record_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "record.json"

    def load_record(self, run_id: str) -> dict | None:
        try:
            return json.loads(self.record_path(run_id).read_text())
        except (OSError, ValueError):
            return None

    def _scan(self) -> tuple[set[str], list[Path]]:
        """One listing of each run folder, no record read: the ids of the committed
        records, and the temporary files a kill left in run folders."""
        ids, tmps = set(), []
        try:
            folders = [e for e in os.scandir(self.root / "runs") if e.is_dir()]
        except FileNotFoundError:
            return ids, tmps
        for folder in folders:
            names = os.listdir(folder.path)
            if "record.json" in names:
                ids.add(folder.name)
            tmps += [Path(folder.path, n) for n in names if n.endswith(".tmp")]
        return ids, tmps

    def record_ids(self) -> set[str]:
        """The ids of every committed record."""
        return self._scan()[0]

    def records(self) -> list[dict]:
        """Every committed record, in the order runs finished (reads them all)."""
        found = [r for r in map(self.load_record, self.record_ids()) if r is not None]
        return sorted(found, key=lambda r: (r.get("finished_at", 0), r["row"]["run_id"]))

    def finished(self) -> dict[str, str]:
        """{run id: status} of every finished run, from the index (no record read)."""
        if self._status is None:
            self._recover(self.record_ids())
        return dict(self._status)

    # ------------------------------------------------------------ commit
    def commit(self, record: dict) -> None:
        """Write one run's record, drop its checkpoint, append its rows to the index."""
        run_id = record["row"]["run_id"]
        if self._status is None:
            self._recover(self.record_ids())
        if run_id in self._status:  # a rerun: the old rows leave the index first
            self._drop(run_id)
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        atomic_write(self.record_path(run_id), json.dumps(record, indent=1))
        self.checkpoint(run_id).unlink(missing_ok=True)
        self._append(record)

    def _append(self, record: dict) -> None:
        if self._sizes is None:  # the first record of the folder: the index starts
            self.rebuild_index()
            return
        sizes = dict(self._sizes)
        try:
            for t in index.TABLES:
                data = rows_of(t, record)
                if data:
                    append(self.root / t.name, data)
                sizes[t.name] += len(data)
            run_id, status = record["row"]["run_id"], record["row"]["status"]
            append(self.root / LOG, log_line(run_id, status, sizes))
        except FileNotFoundError:  # a table or the log was removed under us
            self.rebuild_index()
            return
        self._sizes = sizes
        self._status[run_id] = status

    # ------------------------------------------------------------ repair and rebuild
    def _recover(self, ids: set[str]) -> None:
        """Bring the index in line with the records (their ids): cut what a killed commit
        left past index.log's lengths, append the records it lacks; anything else: rebuild."""
        log = index.read_log(self.root / LOG)
        if log is None:
            if ids or any((self.root / t.name).exists() for t in index.TABLES):
                self.rebuild_index()
            else:  # a new folder: the index starts with the first commit
                self._status, self._sizes = {}, None
            return
        entries, log_size = log
        status = {run_id: s for run_id, s, _ in entries}
        if len(status) != len(entries) or not status.keys() <= ids:
            self.rebuild_index()
            return
        sizes = entries[-1][2] if entries else {t.name: len(header(t)) for t in index.TABLES}
        for t in index.TABLES:
            try:
                with open(self.root / t.name, "rb") as f:
                    head = f.read(len(header(t)))
                    size = os.fstat(f.fileno()).st_size
            except OSError:
                head, size = b"", -1
            if head != header(t) or size < sizes[t.name]:
                self.rebuild_index()
                return
        for t in index.TABLES:
            os.truncate(self.root / t.name, sizes[t.name])
        os.truncate(self.root / LOG, log_size)
        self._status, self._sizes = status, dict(sizes)
        lagging = [r for r in map(self.load_record, ids - status.keys()) if r is not None]
        for record in sorted(lagging, key=lambda r: (r.get("finished_at", 0),
                                                     r["row"]["run_id"])):
            self._append(record)

    def rebuild_index(self) -> None:
        """Every table and index.log written anew from the records (reads them all)."""
        self._write_index([(r["row"]["run_id"], r["row"]["status"],
                            [rows_of(t, r) for t in index.TABLES]) for r in self.records()])

    def _write_index(self, runs: list[tuple[str, str, list[bytes]]]) -> None:
        """runs: (run id, status, its rows for each table), in index order."""
        (self.root / LOG).unlink(missing_ok=True)  # first: a kill below means "rebuild"
        sizes = {t.name: len(header(t)) for t in index.TABLES}
        log = [index.log_header().encode()]
        for run_id, status, blocks in runs:
            for t, block in zip(index.TABLES, blocks):
                sizes[t.name] += len(block)
            log.append(log_line(run_id, status, sizes))
        for i, t in enumerate(index.TABLES):
            atomic_write(self.root / t.name, b"".join([header(t)] + [b[i] for *_, b in runs]))
        atomic_write(self.root / LOG, b"".join(log))
        self._status = {run_id: status for run_id, status, _ in runs}
        self._sizes = sizes

    def _drop(self, run_id: str) -> None:
        """The index without one run: each run's rows cut out of the tables by the byte
        lengths of index.log, without reading a record."""
        log = index.read_log(self.root / LOG)
        if log is None:
            self.rebuild_index()
            return
        entries, _ = log
        data = {t.name: (self.root / t.name).read_bytes() for t in index.TABLES}
        runs, start = [], {t.name: len(header(t)) for t in index.TABLES}
        for rid, status, end in entries:
            if rid != run_id:
                runs.append((rid, status, [data[t.name][start[t.name]:end[t.name]]
                                           for t in index.TABLES]))
            start = end
        self._write_index(runs)

    # ------------------------------------------------------------ the sweep
    def save_sweep(self, sweep: dict) -> None:
        atomic_write(self.root / "sweep.json", json.dumps(sweep, indent=1))

    def save_config(self, toml: str) -> None:
        """config.toml: the sweep as a `bknbench run --config` file."""
        atomic_write(self.root / "config.toml", toml)

    def saved_sweep(self) -> dict | None:
        """sweep.json, or None in a folder without one."""
        if not (self.root / "sweep.json").exists():
            return None
        return self.load_sweep()

    def load_sweep(self) -> dict:
        path = self.root / "sweep.json"
        try:
            sweep = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"nothing to resume in {self.root}: no sweep.json "
                              "(written when `bknbench run --out DIR` starts)") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if not isinstance(sweep, dict):
            raise ConfigError(f"cannot read {path}: not a bknbench sweep")
        return sweep
