"""The format of a results folder's index: the per-run tables, their CSV encoding, and
index.log, which records what the tables hold (store.py says how they are kept whole).

index.log: a header naming the tables, then one line per indexed run, in table order:
    <run_id> <status> <bytes of each table once the run's rows were in>
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..report.schema import METRIC_COLUMNS, RUN_COLUMNS, STATS_COLUMNS


@dataclass(frozen=True)
class Table:
    """A per-run CSV of the index: its file, its columns, a record's rows for it."""

    name: str
    columns: tuple[str, ...]
    rows: Callable[[dict], list[dict]]


def listed(key: str) -> Callable[[dict], list[dict]]:
    """The rows a record lists under `key` (a list of dicts), each with the run's id."""
    def rows(record: dict) -> list[dict]:
        return [{"run_id": record["row"]["run_id"], **r} for r in record.get(key, ())]
    return rows


# The index. A table is one line here: written with every commit, repaired and rebuilt
# with the others; a folder from before it existed gets it at its next `bknbench run`.
TABLES = (
    Table("runs.csv", RUN_COLUMNS, lambda record: [record["row"]]),
    Table("metrics.csv", METRIC_COLUMNS, listed("metrics")),
    Table("stats.csv", STATS_COLUMNS, listed("stats")),
)
LOG = "index.log"


def file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under umask 022): what
    open() gives, where mkstemp's temporary files are 0600."""
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename it into place: a kill at
    any instant leaves the old file or the new one, readable as the umask says."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append(path: Path, data: bytes) -> None:
    """Append in one write() call; the file must exist (no header-less table)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it whole, unless the disk is full
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def to_csv(columns, rows, header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    if header:
        w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def header(table: Table) -> bytes:
    return to_csv(table.columns, []).encode()


def rows_of(table: Table, record: dict) -> bytes:
    return to_csv(table.columns, table.rows(record), header=False).encode()


def log_header() -> str:
    return f"bknbench index 1: run_id status {' '.join(t.name for t in TABLES)}\n"


def log_line(run_id: str, status: str, sizes: dict[str, int]) -> bytes:
    return f"{run_id} {status} {' '.join(str(sizes[t.name]) for t in TABLES)}\n".encode()



def read_log(path: Path) -> tuple[list[tuple[str, str, dict[str, int]]], int] | None:
    """index.log's entries without a cut last line, and its length up to that line; None
    when it is missing or not ours."""
    try:
        text = path.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    head = log_header()
    if not text.startswith(head):
        return None
    entries = []
    for line in text[len(head):].split("\n")[:-1]:  # the last piece is cut or ""
        fields = line.split(" ")
        if len(fields) != 2 + len(TABLES) or not all(f.isdigit() for f in fields[2:]):
            return None
        entries.append((fields[0], fields[1],
                        {t.name: int(f) for t, f in zip(TABLES, fields[2:])}))
    return entries, text.rindex("\n") + 1
