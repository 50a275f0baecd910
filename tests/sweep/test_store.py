"""The results folder without training: commits append to the index and read nothing back,
every state a kill can leave is repaired to what a rebuild from the records gives, planning
reads the index, not the records, and a table is added by one line."""
from __future__ import annotations

import csv
import io
import json
import os

import pytest

import bknbench.sweep.index as index_mod
import bknbench.sweep.store as store_mod
from bknbench.config import RunConfig, SweepConfig
from bknbench.errors import ConfigError
from bknbench.sweep.plan import plan
from bknbench.sweep.index import LOG, TABLES, Table, listed
from bknbench.sweep.store import Store

SWEEP = SweepConfig(specs=("bn", "gn"), batch_sizes=(2, 4, 8), seeds=(0, 1),
                    base=RunConfig(spec="", dataset="synthetic"))


def record(cfg: RunConfig, t: float, status: str = "ok", epochs: int = 2) -> dict:
    """A synthetic record: a runs.csv row with a quote, a comma and a non-ASCII reason,
    and `epochs` metrics rows (none for a failed run)."""
    row = {"run_id": cfg.run_id, "spec": cfg.spec, "norm_batch": cfg.norm_batch,
           "seed": cfg.seed, "status": status, "reason": "" if status == "ok" else
           'x, "y" \u2013 z', "config": json.dumps(cfg.to_dict())}
    metrics = [{"epoch": e + 1, "val_acc": 50.0 + e + t} for e in range(epochs)]
    return {"row": row, "metrics": metrics if status == "ok" else [], "finished_at": t}


def committed(root, n: int, **kw) -> Store:
    store = Store(root)
    store.prepare()
    for i, cfg in enumerate(SWEEP.expand()[:n]):
        store.commit(record(cfg, float(i), **kw))
    return store


def index_files(root) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in [t.name for t in TABLES] + [LOG]}


def rebuilt(root) -> dict[str, bytes]:
    """What a rebuild from the records alone writes."""
    Store(root).rebuild_index()
    return index_files(root)


def table(root, name: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO((root / name).read_text()), strict=True))


def test_commits_append_what_a_rebuild_writes(tmp_path):
    store = committed(tmp_path, 7)
    store.commit(record(SWEEP.expand()[7], 7.0, status="failed"))
    store.close()
    appended = index_files(tmp_path)
    assert appended == rebuilt(tmp_path)
    runs = table(tmp_path, "runs.csv")
    assert [r["run_id"] for r in runs] == [c.run_id for c in SWEEP.expand()[:8]]
    assert runs[7]["reason"] == 'x, "y" \u2013 z' and runs[7]["status"] == "failed"
    assert len(table(tmp_path, "metrics.csv")) == 7 * 2
    log = (tmp_path / LOG).read_text().splitlines()
    assert len(log) == 1 + 8 and log[8].split()[:2] == [SWEEP.expand()[7].run_id, "failed"]
    # each line ends with each table's length once that run's rows were in
    assert [int(n) for n in log[8].split()[2:]] == [len(appended[t.name]) for t in TABLES]


def test_a_commit_reads_no_record_and_no_table(tmp_path, monkeypatch):
    store = committed(tmp_path, 10)

    def refuse(*args, **kw):
        raise AssertionError("a commit must not read the folder back")

    monkeypatch.setattr(Store, "load_record", refuse)
    monkeypatch.setattr(Store, "records", refuse)
    monkeypatch.setattr(store_mod.Path, "read_bytes", refuse)
    monkeypatch.setattr(store_mod.Path, "read_text", refuse)
    store.commit(record(SWEEP.expand()[10], 10.0))
    store.close()
    monkeypatch.undo()
    assert len(table(tmp_path, "runs.csv")) == 11


def test_plan_reads_the_index_not_the_records(tmp_path, monkeypatch):
    runs = SWEEP.expand()
    store = committed(tmp_path, 5)
    store.commit(record(runs[5], 5.0, status="failed"))
    monkeypatch.setattr(Store, "load_record", lambda *a: pytest.fail("read a record"))
    all_runs, todo = plan(SWEEP, store)
    assert all_runs == runs and todo == runs[6:]
    assert plan(SWEEP, store, retry_failed=True)[1] == runs[5:]


# ---------------------------------------------------------------- what a kill can leave
def cut_commit(root, store):
    """A commit killed after its record and part of its rows, before index.log."""
    cfg = SWEEP.expand()[6]
    rec = record(cfg, 6.0)
    store.run_dir(cfg.run_id).mkdir(parents=True)
    (store.record_path(cfg.run_id)).write_text(json.dumps(rec))
    rows = index_mod.rows_of(TABLES[0], rec)
    with open(root / "runs.csv", "ab") as f:
        f.write(rows[: len(rows) // 2])  # a row cut in the middle


def torn_log(root, store):
    cut_commit(root, store)
    with open(root / LOG, "ab") as f:
        f.write(b"abc ok 12")  # no newline: never finished


def lagging(root, store):
    """Records index.log does not hold: killed between a record and its rows."""
    for i in (6, 7):
        cfg = SWEEP.expand()[i]
        store.run_dir(cfg.run_id).mkdir(parents=True)
        store.record_path(cfg.run_id).write_text(json.dumps(record(cfg, float(i))))


def no_log(root, store):
    (root / LOG).unlink()  # killed inside a rebuild, or an index from an older version


def table_cut_short(root, store):
    text = (root / "metrics.csv").read_bytes()
    (root / "metrics.csv").write_bytes(text[:-30])


def record_deleted(root, store):  # a user removed a run's folder to have it run again
    import shutil

    shutil.rmtree(store.run_dir(SWEEP.expand()[2].run_id))


def old_header(root, store):  # a folder written before a column was added
    text = (root / "runs.csv").read_text().split("\n", 1)
    (root / "runs.csv").write_text(text[0].replace(",threads", "") + "\n" + text[1])


def log_twice(root, store):
    lines = (root / LOG).read_text().splitlines(keepends=True)
    (root / LOG).write_text("".join(lines + lines[-1:]))


@pytest.mark.parametrize("damage", [cut_commit, torn_log, lagging, no_log, table_cut_short,
                                    record_deleted, old_header, log_twice])
def test_prepare_repairs_what_a_kill_or_a_user_leaves(tmp_path, damage):
    store = committed(tmp_path, 6)
    store.close()
    damage(tmp_path, store)
    expected_ids = sorted(Store(tmp_path).record_ids())
    again = Store(tmp_path)
    again.prepare()
    assert sorted(again.finished()) == expected_ids
    repaired = index_files(tmp_path)
    assert repaired == rebuilt(tmp_path)
    ids = [r["run_id"] for r in table(tmp_path, "runs.csv")]
    assert sorted(ids) == expected_ids and len(set(ids)) == len(ids)


@pytest.mark.parametrize("damage, lag", [(cut_commit, 1), (torn_log, 1), (lagging, 2)])
def test_a_torn_index_is_truncated_and_appended_not_rebuilt(tmp_path, monkeypatch, damage,
                                                            lag):
    """What a killed commit leaves: the tables and the log are cut back to index.log's last
    lengths and the lagging records appended; no rebuild, no other record read."""
    store = committed(tmp_path, 6)
    store.close()
    before = index_files(tmp_path)
    damage(tmp_path, store)
    read = []
    real_load = Store.load_record
    monkeypatch.setattr(Store, "rebuild_index", lambda *a: pytest.fail("rebuilt"))
    monkeypatch.setattr(Store, "records", lambda *a: pytest.fail("read every record"))
    monkeypatch.setattr(Store, "load_record",
                        lambda self, run_id: read.append(run_id) or real_load(self, run_id))
    again = Store(tmp_path)
    again.prepare()
    again.close()
    monkeypatch.undo()
    assert sorted(read) == sorted(c.run_id for c in SWEEP.expand()[6:6 + lag])
    repaired = index_files(tmp_path)
    for name, old in before.items():  # what was there before the kill is kept as it was
        assert repaired[name].startswith(old), name
    assert repaired == rebuilt(tmp_path)


def test_recommitting_a_run_replaces_its_rows(tmp_path):
    runs = SWEEP.expand()
    store = committed(tmp_path, 4)
    store.commit(record(runs[1], 1.0, status="failed"))  # e.g. --retry-failed, reversed
    store.commit(record(runs[1], 9.0))
    store.close()
    ids = [r["run_id"] for r in table(tmp_path, "runs.csv")]
    assert ids == [runs[i].run_id for i in (0, 2, 3, 1)]  # once, where it finished last
    metrics = [(m["run_id"], m["val_acc"]) for m in table(tmp_path, "metrics.csv")]
    assert metrics[-2:] == [(runs[1].run_id, "59.0"), (runs[1].run_id, "60.0")]
    assert len(metrics) == 8 and index_files(tmp_path) == rebuilt(tmp_path)


def test_a_new_folder_has_no_index_until_its_first_commit(tmp_path):
    store = Store(tmp_path / "new")
    store.prepare()
    assert store.finished() == {} and not (tmp_path / "new" / "runs.csv").exists()
    store.commit(record(SWEEP.expand()[0], 0.0))
    assert len(table(tmp_path / "new", "runs.csv")) == 1


def test_one_sweep_per_folder_at_a_time(tmp_path):
    first = Store(tmp_path)
    first.prepare()
    with pytest.raises(ConfigError, match=f"{tmp_path} is in use by another `bknbench run`"):
        Store(tmp_path).prepare()
    first.close()
    second = Store(tmp_path)
    second.prepare()  # released
    second.close()


def test_a_table_is_one_line(tmp_path, monkeypatch):
    """One more per-run table (rows under record["extra"]): written with every commit, and
    added to a folder written before it existed."""
    store = committed(tmp_path, 3)
    store.close()
    extra = Table("extra.csv", ("run_id", "layer", "value"), listed("extra"))
    monkeypatch.setattr(index_mod, "TABLES", TABLES + (extra,))
    again = Store(tmp_path)
    again.prepare()  # an index without extra.csv: rebuilt, the old runs have no extra rows
    assert table(tmp_path, "extra.csv") == [] and len(table(tmp_path, "runs.csv")) == 3
    rec = record(SWEEP.expand()[3], 3.0)
    rec["extra"] = [{"layer": "conv1", "value": 0.5}, {"layer": "conv2", "value": 1.5}]
    again.commit(rec)
    assert table(tmp_path, "extra.csv") == [
        {"run_id": rec["row"]["run_id"], "layer": "conv1", "value": "0.5"},
        {"run_id": rec["row"]["run_id"], "layer": "conv2", "value": "1.5"}]
    assert index_files(tmp_path) == rebuilt(tmp_path)


@pytest.mark.parametrize("text, words", [("{", "cannot read"), ("[1, 2]", "not a bknbench"),
                                         ('{"specs": ["bn"]}', "not a bknbench sweep")])
def test_corrupt_sweep_json_is_one_line(tmp_path, text, words):
    from bknbench.request import RunRequest, build_sweep

    (tmp_path / "sweep.json").write_text(text)
    with pytest.raises(ConfigError, match=words):
        build_sweep(RunRequest(resume=tmp_path))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_are_as_readable_as_the_umask_says(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        store = committed(tmp_path, 3)
        store.save_sweep({"specs": ["bn"]})
        store._drop(SWEEP.expand()[0].run_id)  # a rebuild: every table replaced
        store.close()
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]
    assert {p.name for p in files} >= {"runs.csv", "metrics.csv", "index.log", "sweep.json",
                                       "record.json"}
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
            for p in files} == {p.relative_to(tmp_path).as_posix(): oct(mode) for p in files}
