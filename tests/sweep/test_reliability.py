"""Sweeps that survive kills, failures and Ctrl-C: resume, failure isolation, determinism.

Subprocess sweeps use the tiny `synthetic` dataset and one torch thread each (tiny models
run fastest that way, and a busy machine does not slow them down a hundredfold).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.config import RunConfig, SweepConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 8 runs of 0.3-1 s each on one core: long enough that the three kills below (each at most
# 0.6 s after a run finished) cannot let the whole sweep finish
# (one evaluation per epoch: a metric row per epoch keeps the checks below simple)
GRID = ["--dataset", "synthetic", "--norms", "gn,ln", "--batch-sizes", "2,4",
        "--seeds", "0,1", "--epochs", "3", "--evals-per-epoch", "1", "--quiet"]
TIMING = {"train_time_s", "samples_per_s", "wall_s"}  # the only columns allowed to differ
runner = CliRunner()


def start(*args) -> subprocess.Popen:
    """`bknbench ARGS` in its own process group, as a terminal would run it: with Ctrl-C's
    default action, even where pytest runs as a background job of a script, which a shell
    starts with SIGINT ignored (children inherit that, and Python then leaves it ignored)."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # exec resets it to default
    try:
        return subprocess.Popen([sys.executable, "-m", "bknbench", *args], env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def bknbench(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bknbench", *args], env=ENV, text=True,
                          capture_output=True, timeout=300)


def wait_for(condition, timeout_s: float = 120.0, every_s: float = 0.02) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(every_s)


def records(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/record.json")}


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, strict=True))


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def mid_run(out: Path) -> bool:
    """A run without a record has checkpointed an epoch: the sweep is inside a run."""
    return any(not (p.parent / "record.json").exists() for p in out.glob("runs/*/checkpoint.pt"))


def check_consistent(out: Path, seen_rows: dict, seen_csv: dict) -> None:
    """The state a kill may leave: whole records; an index that parses, has no duplicate
    and lags at most the one record committed at the kill; finished rows unchanged."""
    recs = records(out)
    for run_id, rec in recs.items():
        assert seen_rows.setdefault(run_id, rec["row"]) == rec["row"]
    if not (out / "runs.csv").exists():
        return
    index = rows(out / "runs.csv")
    ids = [r["run_id"] for r in index]
    assert len(ids) == len(set(ids)) and set(ids) <= set(recs) and len(recs) - len(ids) <= 1
    for r in index:
        assert seen_csv.setdefault(r["run_id"], r) == r
    metric_keys = [(m["run_id"], m["epoch"]) for m in rows(out / "metrics.csv")]
    assert len(metric_keys) == len(set(metric_keys))


def test_sigkill_at_random_moments_then_resume(tmp_path):
    out = tmp_path / "sweep"
    rng = random.Random(1)
    seen_rows, seen_csv = {}, {}
    # (workers, kill the whole process group or the driver only), resumed either way
    for i, (workers, group) in enumerate([(1, True), (2, False), (1, True)]):
        where = ["--out", str(out)] + GRID if i % 2 == 0 else ["--resume", str(out), "--quiet"]
        before = len(records(out))
        proc = start("run", *where, "--workers", str(workers))
        wait_for(lambda: len(records(out)) > before or proc.poll() is not None)
        if rng.random() < 0.5:  # else at once: in the commit of the record just seen
            wait_for(lambda: mid_run(out) or proc.poll() is not None)
        workers_pids = children(proc.pid)
        with contextlib.suppress(ProcessLookupError):  # unless it has finished already
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:  # the workers notice and exit instead of training on as orphans
                os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        wait_for(lambda: not any(map(alive, workers_pids)), timeout_s=10)
        check_consistent(out, seen_rows, seen_csv)
    assert 0 < len(seen_rows) < 8, "the kills should leave the sweep unfinished"
    done = bknbench("run", "--out", str(out), *GRID, "--workers", "1")  # the same command again
    assert done.returncode == 0, done.stderr
    check_consistent(out, seen_rows, seen_csv)
    index = rows(out / "runs.csv")
    assert sorted((r["spec"], r["norm_batch"], r["seed"]) for r in index) == sorted(
        (s, b, seed) for s in ("gn", "ln") for b in ("2", "4") for seed in ("0", "1"))
    assert len(rows(out / "metrics.csv")) == 8 * 3
    assert all(r["status"] == "ok" for r in index)
    from bknbench.report.results import load_results

    assert len(load_results(out).runs) == 8
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("checkpoint.pt"))


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_keeps_finished_runs(tmp_path, workers):
    out = tmp_path / "sweep"
    proc = start("run", "--out", str(out), *GRID, "--workers", str(workers))
    # the event, not a delay: at once when the first run is committed, so the Ctrl-C lands
    # in or near the next commit, or in the next run
    wait_for(lambda: records(out) or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()[1]
    spawned = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    finished = records(out)
    assert 1 <= len(finished) < 8
    assert stderr.splitlines()[-1] == (f"interrupted: {len(finished)} finished run(s) kept in "
                                       f"{out}; resume with: bknbench run --resume {out}")
    assert {r["run_id"] for r in rows(out / "runs.csv")} == set(finished)
    wait_for(lambda: not any(map(alive, spawned)), timeout_s=10)


def test_ctrl_c_during_a_commit_lets_it_finish(tmp_path, monkeypatch):
    """A Ctrl-C between a run's record and its index rows: the commit completes, the run is
    in runs.csv and counted as finished, and the sweep stops."""
    from bknbench.sweep.plan import run_sweep
    from bknbench.sweep.store import Store

    class Instant:  # each run finishes at once
        def map(self, tasks, store, events):
            for cfg in tasks:
                yield cfg, {"row": {"run_id": cfg.run_id, "status": "ok"}, "metrics": [],
                            "finished_at": 0.0}

    append = Store._append

    def ctrl_c_first(store, record):  # between the first record and the index
        monkeypatch.setattr(Store, "_append", append)
        signal.raise_signal(signal.SIGINT)
        append(store, record)

    monkeypatch.setattr(Store, "_append", ctrl_c_first)
    sweep = SweepConfig(specs=("gn",), batch_sizes=(16,), seeds=(0, 1),
                        base=RunConfig(spec="", dataset="synthetic"))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        report = run_sweep(sweep, tmp_path, Instant())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert report.interrupted and len(report.finished) == 1
    assert [r["run_id"] for r in rows(tmp_path / "runs.csv")] == list(records(tmp_path))


DET_ONE = ["run", "--dataset", "synthetic", "--norms", "gn", "--batch-sizes", "16", "--seeds",
           "0", "--epochs", "1", "--evals-per-epoch", "1", "--deterministic", "--device",
           "cpu", "--quiet"]


def test_deterministic_serial_equals_a_worker_process(tmp_path):
    """--deterministic fixes the thread count at 1: this process (2 threads) and a worker
    process (a pool of one gets all cores) give the same rows, and --threads 2 is recorded
    as asked. Whether 2 threads change the floating-point sums depends on the CPU and its
    BLAS, so no test asserts a difference (test_ray.py compares Ray on this same run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, extra in (("serial", ["--workers", "1"]), ("pool", ["--workers", "2"]),
                            ("two", ["--workers", "1", "--threads", "2"])):
            result = runner.invoke(app, [*DET_ONE, *extra, "--out", str(tmp_path / name)])
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
    [serial], [pool], [two] = (rows(tmp_path / n / "runs.csv") for n in ("serial", "pool", "two"))
    assert serial["threads"] == pool["threads"] == "1" and two["threads"] == "2"
    assert without_timing([serial]) == without_timing([pool])
    assert without_timing(rows(tmp_path / "serial" / "metrics.csv")) == without_timing(
        rows(tmp_path / "pool" / "metrics.csv"))


def reports_its_process(cfg, run_dir: str) -> dict:
    """Stand-in for execute_run: which GPU and how many threads its worker was given.
    Seed 0 waits until seed 1 has started (a file), so two workers must be running."""
    import torch

    import dataclasses

    (Path(run_dir) / "started").write_text("")
    if cfg.seed == 0:
        other = Path(run_dir).parent / dataclasses.replace(cfg, seed=1).run_id / "started"
        wait_for(other.exists, timeout_s=60)
    return {"row": {"run_id": cfg.run_id, "status": "ok", "pid": os.getpid(),
                    "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "threads": torch.get_num_threads()}, "metrics": [], "finished_at": 0.0}


def dies_at_seed_1(cfg, run_dir: str) -> dict:
    """Stand-in for execute_run in a worker: seed 1 kills its process, every time, after
    leaving its pid; the others wait until that process is dead, so a run beside it is in
    flight when it dies (or queued behind it)."""
    with open(Path(run_dir) / "calls", "a") as f:
        f.write("x")
    pid_file = Path(run_dir).parent / "seed1.pid"
    if cfg.seed == 1:
        pid_file.write_text(str(os.getpid()))
        os._exit(1)
    wait_for(lambda: pid_file.exists() and not alive(int(pid_file.read_text() or 0)),
             timeout_s=60)
    return {"row": {"run_id": cfg.run_id, "status": "ok"}, "metrics": [], "finished_at": 0.0}


def test_workers_pinned_to_gpus_in_turn_with_their_share_of_threads(tmp_path, monkeypatch):
    from bknbench.sweep.local import ProcessExecutor, cpu_cores
    from bknbench.sweep.plan import SweepEvents
    from bknbench.sweep.store import Store

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # the GPUs this process may use
    store = Store(tmp_path)

    def run(executor, seeds):
        tasks = SweepConfig(specs=("gn",), batch_sizes=(16,), seeds=seeds,
                            base=RunConfig(spec="", dataset="synthetic")).expand()
        for cfg in tasks:
            store.run_dir(cfg.run_id).mkdir(parents=True, exist_ok=True)
        return [r["row"] for _, r in executor.map(tasks, store, SweepEvents())]

    both = run(ProcessExecutor(2, fn=reports_its_process, device="cuda"), (0, 1))
    assert all(r["status"] == "ok" for r in both), both
    assert len({r["pid"] for r in both}) == 2 and {r["gpu"] for r in both} == {"5", "7"}
    assert {r["threads"] for r in both} == {max(1, cpu_cores() // 2)}
    # fewer runs than workers: fewer workers, each with more threads; no GPU pinning on cpu
    [alone] = run(ProcessExecutor(8, fn=reports_its_process), (2,))
    assert alone["threads"] == cpu_cores() and alone["gpu"] == "5,7"


def test_default_workers_one_per_core_or_gpu(monkeypatch):
    import bknbench.sweep.local as local
    from bknbench.commands import make_executor
    from bknbench.sweep.plan import SerialExecutor

    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [local.default_workers(d) for d in ("cpu", "cuda", "cuda:1", "mps")] == [3, 4, 1, 1]
    executor = make_executor(None, "cpu")
    assert isinstance(executor, local.ProcessExecutor) and executor.workers == 3
    assert make_executor(None, "cuda").workers == 4 and make_executor(None, "cuda").device == "cuda"
    assert isinstance(make_executor(None, "cuda:1"), SerialExecutor)
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: {0})
    assert isinstance(make_executor(None, "cpu"), SerialExecutor)


def test_worker_death_reruns_the_others_and_fails_the_culprit(tmp_path):
    from bknbench.sweep.local import ProcessExecutor
    from bknbench.sweep.store import Store
    from bknbench.sweep.plan import SweepEvents

    tasks = SweepConfig(specs=("gn",), batch_sizes=(16,), seeds=(0, 1, 2),
                        base=RunConfig(spec="", dataset="synthetic")).expand()
    store = Store(tmp_path)
    for cfg in tasks:
        store.run_dir(cfg.run_id).mkdir(parents=True)
    done = list(ProcessExecutor(2, threads=1, fn=dies_at_seed_1).map(tasks, store,
                                                                     SweepEvents()))
    by_seed = {cfg.seed: record["row"] for cfg, record in done}
    assert len(done) == 3 and sorted(by_seed) == [0, 1, 2]
    assert by_seed[0]["status"] == by_seed[2]["status"] == "ok", by_seed
    assert by_seed[1]["status"] == "failed" and "worker process died" in by_seed[1]["reason"]
    # the culprit ran twice: with the others, then alone
    assert (store.run_dir(tasks[1].run_id) / "calls").read_text() == "xx"


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path):
    # BN is undefined with one value per channel; GN at micro-batch 1 is fine
    result = runner.invoke(app, ["run", "--dataset", "synthetic", "--model", "mlp", "--norms",
                                 "bn,gn", "--batch-sizes", "1", "--seeds", "0", "--epochs", "1",
                                 "--workers", "1", "--out", str(tmp_path / "b1")])
    assert result.exit_code == 0, result.output
    by_spec = {r["spec"]: r for r in rows(tmp_path / "b1" / "runs.csv")}
    assert by_spec["bn"]["status"] == "failed"
    assert "undefined with 1 value per channel" in by_spec["bn"]["reason"]
    assert by_spec["gn"]["status"] == "ok" and float(by_spec["gn"]["final_val_acc"]) > 80
    assert "1 run(s) did not finish ok" in result.stderr
    assert "  bn b=1 seed=0: failed: BatchNorm is undefined" in result.stderr


def test_retry_failed_reruns_the_failed_runs_only(tmp_path, monkeypatch):
    import bknbench.train

    out = tmp_path / "sweep"
    real = bknbench.train.train_run

    def flaky(cfg, *args, **kw):  # a fault that goes away (a full disk, a lost GPU)
        if cfg.seed == 1:
            raise RuntimeError("a passing fault")
        return real(cfg, *args, **kw)

    monkeypatch.setattr(bknbench.train, "train_run", flaky)
    first = runner.invoke(app, ["run", "--dataset", "synthetic", "--norms", "gn",
                                "--batch-sizes", "16", "--seeds", "0,1", "--epochs", "1",
                                "--evals-per-epoch", "1", "--workers", "1", "--out", str(out)])
    monkeypatch.undo()
    assert first.exit_code == 0, first.output
    before = {r["seed"]: r for r in rows(out / "runs.csv")}
    assert before["1"]["status"] == "failed" and before["1"]["reason"] == (
        "RuntimeError: a passing fault")
    kept = records(out)
    again = runner.invoke(app, ["run", "--resume", str(out)])  # failed runs count as done
    assert again.exit_code == 0 and "2 already finished, 0 to run" in again.stderr
    assert "1 run(s) did not finish ok" in again.stderr and records(out) == kept
    retry = runner.invoke(app, ["run", "--resume", str(out), "--retry-failed"])
    assert retry.exit_code == 0 and "1 already finished, 1 to run" in retry.stderr
    assert "did not finish ok" not in retry.stderr
    after = {r["seed"]: r for r in rows(out / "runs.csv")}
    assert len(rows(out / "runs.csv")) == 2 and after["0"] == before["0"]
    assert after["1"]["status"] == "ok" and after["1"]["run_id"] == before["1"]["run_id"]
    assert records(out)[before["0"]["run_id"]] == kept[before["0"]["run_id"]]  # untouched
    assert len(rows(out / "metrics.csv")) == 2  # one epoch each, the failed run had none


def test_divergence_strict_and_fail_fast(tmp_path):
    def sweep(out, *flags):
        return runner.invoke(app, ["run", "--dataset", "synthetic", "--norms", "gn,bn",
                                   "--batch-sizes", "16", "--seeds", "0", "--epochs", "2",
                                   "--lr", "1e9", "--workers", "1",
                                   "--out", str(tmp_path / out), *flags])

    strict = sweep("strict", "--strict")
    assert strict.exit_code == 1, strict.output
    found = rows(tmp_path / "strict" / "runs.csv")
    assert [r["spec"] for r in found] == ["gn", "bn"]  # the sweep went on after gn diverged
    for r in found:
        assert r["status"] == "diverged" and r["final_val_acc"] == ""
        assert r["reason"] == "training loss became nan in epoch 1"
    # what a kill can leave: temporary files, an index a record behind; the next run clears it
    folder = tmp_path / "strict"
    stale = [folder / ".runs.csv.x1.tmp",
             folder / "runs" / found[0]["run_id"] / "checkpoint.pt.tmp"]
    for path in stale:
        path.write_text("half")
    (folder / "runs.csv").write_text((folder / "runs.csv").read_text().rsplit("\n", 2)[0] + "\n")
    # resumed, the earlier failures still count: listed at the end, and fail --strict
    again = sweep("strict", "--strict")
    assert again.exit_code == 1 and "2 run(s) did not finish ok" in again.stderr
    assert rows(folder / "runs.csv") == found and not any(p.exists() for p in stale)
    assert sweep("strict").exit_code == 0  # without --strict, failed runs are results
    fast = sweep("fast", "--fail-fast")
    assert fast.exit_code == 1 and "--fail-fast" in fast.stderr
    assert [r["spec"] for r in rows(tmp_path / "fast" / "runs.csv")] == ["gn"]


# ---------------------------------------------------------------- determinism, checkpoints
DET = ["--dataset", "synthetic", "--norms", "bn,gn", "--batch-sizes", "8", "--seeds", "0",
       "--epochs", "3", "--evals-per-epoch", "1", "--deterministic", "--workers", "1",
       "--quiet"]


def without_timing(table: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in table),
                  key=lambda r: (r["run_id"], r.get("epoch", "")))


@pytest.fixture(scope="module")
def deterministic_pair(tmp_path_factory):
    """The same deterministic sweep, run twice at once in two processes."""
    outs = [tmp_path_factory.mktemp("det") for _ in range(2)]
    procs = [start("run", *DET, "--out", str(out)) for out in outs]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    return outs


def test_deterministic_twice_gives_identical_csvs(deterministic_pair):
    a, b = deterministic_pair
    for name in ("runs.csv", "metrics.csv"):
        ra, rb = without_timing(rows(a / name)), without_timing(rows(b / name))
        assert ra == rb and len(ra) in (2, 2 * 3)
    run = rows(a / "runs.csv")[0]
    assert run["deterministic"] == "True" and run["device"] == "cpu"
    assert run["torch_version"] == torch.__version__ and "numpy" in json.loads(run["versions"])
    assert json.loads(run["versions"])["kernels"] in ("native", "torch")
    assert RunConfig.from_dict(json.loads(run["config"])).run_id == run["run_id"]


def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(tmp_path, deterministic_pair):
    out = tmp_path / "sweep"
    proc = start("run", *DET, "--out", str(out))
    wait_for(lambda: list(out.glob("runs/*/checkpoint.pt")) or proc.poll() is not None,
             every_s=0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not records(out), "killed too late: the first run finished"
    checkpoint = next(out.glob("runs/*/checkpoint.pt"))
    saved = torch.load(checkpoint, weights_only=True)["epochs"]  # 1 or 2 epochs done
    done = bknbench("run", "--resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    # it continued from the checkpoint: the epochs done before the kill are kept as they were
    metrics = [m for m in rows(out / "metrics.csv") if m["run_id"] == checkpoint.parent.name]
    assert [float(m["wall_s"]) for m in metrics[:len(saved)]] == [e["wall_s"] for e in saved]
    clean = deterministic_pair[0]
    for name in ("runs.csv", "metrics.csv"):
        assert without_timing(rows(out / name)) == without_timing(rows(clean / name))
