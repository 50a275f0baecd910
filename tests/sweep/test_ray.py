"""The Ray executor against a real local Ray (2 CPUs): the same rows as the local executor,
resume, and a worker killed mid-run.

Ray listens on the machine's network address even when asked for 127.0.0.1, and finds that
address by probing the network. So the Ray tests run in a child pytest inside a network
namespace that has only loopback (`unshare -n`, loopback brought up with `ip`): no test
traffic can leave the machine. Where namespaces are not permitted, they skip and say why.
The child's tests are the functions named `inner_*`, which only the child collects
(`-o python_functions=inner_*`), so a plain pytest run neither runs nor skips them.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bknbench.errors import ConfigError
from bknbench.config import RunConfig, SweepConfig

INNER = os.environ.get("BKNBENCH_RAY_NETNS") == "1"
REPO = Path(__file__).resolve().parents[2]
TIMING = {"train_time_s", "samples_per_s", "peak_mem_mb", "wall_s"}  # differ run to run


# ---------------------------------------------------------------- outside any namespace
def test_without_ray_says_how_to_install(monkeypatch):
    from bknbench.commands import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r'pip install "\.\[ray\]" in a bknbench checkout'):
        make_executor(None, "cpu", executor="ray")


@pytest.mark.parametrize("device, bad, words", [
    ("cpu", dict(executor="dask"), "--executor must be local or ray, got 'dask'"),
    ("cpu", dict(executor="ray", cpus_per_run=0), "--cpus-per-run must be at least 1, got 0"),
    # RayExecutor's own check: a cuda run passes make_executor's device check first
    ("cuda", dict(executor="ray", gpus_per_run=1.5), "--gpus-per-run must be a fraction of "
                                                     "one GPU .* got 1.5"),
    ("cpu", dict(executor="ray", retries=-1), "--retries must be >= 0, got -1"),
    ("cpu", dict(address="127.0.0.1:6379"), "--address is for --executor ray"),
    ("cpu", dict(executor="ray", gpus_per_run=0.5), "--device cpu with --gpus-per-run 0.5"),
    ("cuda", dict(executor="ray"), "--device cuda with --gpus-per-run 0: runs on cuda need"),
    ("cpu", dict(executor="ray", threads=2), "--threads 2 is more than the --cpus-per-run 1"),
])
def test_ray_options_are_checked_before_a_sweep(monkeypatch, device, bad, words):
    from bknbench.commands import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # every check comes before importing Ray
    with pytest.raises(ConfigError, match=words):
        make_executor(None, device, **bad)
    with pytest.raises(ConfigError, match="--workers is for --executor local"):
        make_executor(2, "cpu", executor="ray")


def loopback_namespace() -> tuple[list[str] | None, str]:
    """The command prefix that gives a new network namespace (as root, else as a user
    namespace's root), or None and why not."""
    if not sys.platform.startswith("linux"):
        return None, "network namespaces are Linux-only"
    if shutil.which("unshare") is None:
        return None, "`unshare` (util-linux) is not installed"
    if shutil.which("ip") is None:
        return None, "`ip` is not installed (apt-get install -y iproute2)"
    why = []
    for prefix in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        probe = subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], capture_output=True,
                               text=True, timeout=60)
        if probe.returncode == 0:
            return prefix, ""
        why.append(f"`{' '.join(prefix)}`: {probe.stderr.strip() or probe.returncode}")
    return None, "network namespaces are not permitted here (" + "; ".join(why) + ")"


@pytest.mark.skipif(INNER, reason="this is the outer test")
def test_ray_in_loopback_namespace():
    prefix, why = loopback_namespace()
    if prefix is None:
        pytest.skip(f"Ray tests need a loopback-only network namespace: {why}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(BKNBENCH_RAY_NETNS="1", RAY_USAGE_STATS_ENABLED="0")
    # token auth (on by default for local clusters since Ray 2.59) without writing ~/.ray
    env.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    script = ('ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider -rs '
              '-o python_functions="inner_*" "$1"')
    proc = subprocess.run([*prefix, "sh", "-c", script, sys.executable, __file__], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out[-4000:])
    assert proc.returncode == 0, out[-8000:]
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


# ---------------------------------------------------------------- inside the namespace
@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for all inner tests: 2 CPUs, loopback only, its files in a temp dir."""
    if not INNER:
        pytest.skip("runs in the namespace that test_ray_in_loopback_namespace starts")
    import ray

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             _node_ip_address="127.0.0.1", object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["run_id"]: r for r in csv.DictReader(f)}


def read_metrics(path: Path) -> dict[tuple, dict]:
    with open(path, newline="") as f:
        return {(r["run_id"], r["epoch"]): r for r in csv.DictReader(f)}


def untimed(rows: dict) -> dict:
    return {k: {c: v for c, v in r.items() if c not in TIMING} for k, r in rows.items()}


def assert_same(got: dict, want: dict) -> None:
    """Equal rows, timing aside; on failure, names the differing cells."""
    got, want = untimed(got), untimed(want)
    assert got.keys() == want.keys()
    diff = {(k, c): (v, want[k].get(c)) for k, r in got.items() for c, v in r.items()
            if v != want[k].get(c)}
    assert not diff, diff


SWEEP_ARGS = ["run", "--dataset", "synthetic", "--norms", "bn,gn", "--batch-sizes", "4,16",
              "--seeds", "0", "--epochs", "1", "--deterministic", "--device", "cpu", "--quiet"]


def inner_deterministic_rows_equal_on_every_executor(ray_local, tmp_path):
    """--deterministic: this process (2 threads here), 2 worker processes (1 thread each
    on 2 cores) and Ray tasks (2 CPUs, so 2 threads each) all train with 1 thread and give
    the same rows. test_reliability's test_deterministic_serial_equals_workers shows gn at
    micro-batch 16 changes with the thread count, so this can fail."""
    import torch
    from typer.testing import CliRunner

    from bknbench.cli import app

    runner = CliRunner()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the serial executor's share: not the 1 the rule gives
    try:
        local = runner.invoke(app, [*SWEEP_ARGS, "--workers", "1", "--out", str(tmp_path / "local")])
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0, local.output
    pool = runner.invoke(app, [*SWEEP_ARGS, "--workers", "2", "--out", str(tmp_path / "pool")])
    assert pool.exit_code == 0, pool.output
    on_ray = runner.invoke(app, [*SWEEP_ARGS, "--executor", "ray", "--cpus-per-run", "2",
                                 "--out", str(tmp_path / "ray")])
    assert on_ray.exit_code == 0, on_ray.output
    rows = read_rows(tmp_path / "ray" / "runs.csv")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    assert {r["threads"] for r in rows.values()} == {"1"}
    for other in ("local", "pool"):
        assert_same(rows, read_rows(tmp_path / other / "runs.csv"))
        assert_same(read_metrics(tmp_path / "ray" / "metrics.csv"),
                    read_metrics(tmp_path / other / "metrics.csv"))


def inner_example_plugin_on_ray(ray_local, tmp_path):
    """examples/mean_only_bn.py's normalizer and dataset in Ray tasks, which load the
    plugin again from its path; beside bn and gn, and reported."""
    from typer.testing import CliRunner

    from bknbench.cli import app

    runner = CliRunner()
    example = REPO / "examples" / "mean_only_bn.py"
    result = runner.invoke(app, ["run", "--plugin", str(example), "--norms", "bn,gn,mean-bn",
                                 "--dataset", "waves", "--batch-sizes", "16", "--epochs", "1",
                                 "-q", "--executor", "ray", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "runs.csv")
    assert sorted(r["spec"] for r in rows.values()) == ["bn", "gn", "mean-bn"]
    assert all(r["status"] == "ok" and "sha256" in r["plugins"] for r in rows.values())
    assert runner.invoke(app, ["report", str(tmp_path)]).exit_code == 0


def tiny_sweep(**base) -> SweepConfig:
    return SweepConfig(specs=("bn", "gn"), batch_sizes=(4, 16), seeds=(0,),
                       base=RunConfig(spec="", dataset="synthetic", epochs=1, **base))


def inner_resume_on_ray_runs_only_unfinished(ray_local, tmp_path):
    from bknbench.sweep.ray import RayExecutor
    from bknbench.sweep.store import Store
    from bknbench.sweep.plan import SweepEvents, run_sweep

    sweep = tiny_sweep()
    first = run_sweep(sweep, tmp_path, RayExecutor())
    assert len(first.finished) == 4 and not first.failed
    store = Store(tmp_path)
    before = {r["row"]["run_id"]: r["finished_at"] for r in store.records()}
    removed = sorted(before)[0]
    shutil.rmtree(store.run_dir(removed))

    seen = {"plan": None, "start": [], "finish": []}
    events = SweepEvents(on_plan=lambda total, todo: seen.update(plan=(total, todo)),
                         on_start=lambda cfg: seen["start"].append(cfg.run_id),
                         on_finish=lambda cfg, row: seen["finish"].append(cfg.run_id))
    again = run_sweep(sweep, tmp_path, RayExecutor(), events)
    assert (again.planned, again.skipped) == (4, 3)
    assert seen == {"plan": (4, 1), "start": [removed], "finish": [removed]}
    after = {r["row"]["run_id"]: r["finished_at"] for r in store.records()}
    assert set(after) == set(before)
    assert all(after[k] == before[k] for k in before if k != removed)  # untouched
    assert len(read_rows(tmp_path / "runs.csv")) == 4


def descendants_named(title: bytes) -> list[int]:
    """PIDs of this process's descendants whose command line starts with `title` (Ray
    names a worker `ray::<function>` while it runs a task)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(title):
                continue
            pid = int(entry.name)
            while pid > 1:  # walk up the parents
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    found.append(int(entry.name))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


def kill_worker_when(ready, timeout_s: float = 60.0) -> dict:
    """In a thread: SIGKILL the first `ray::bknbench_run` worker once ready() holds."""
    killed: dict = {}

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = descendants_named(b"ray::bknbench_run")
            if pids and ready():
                os.kill(pids[0], signal.SIGKILL)
                killed["pid"] = pids[0]
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def inner_killed_worker_is_a_failed_run(ray_local, tmp_path):
    from bknbench.sweep.ray import RayExecutor
    from bknbench.sweep.store import Store
    from bknbench.sweep.plan import run_sweep

    sweep = SweepConfig(specs=("bn",), batch_sizes=(4,), seeds=(0,),
                        base=RunConfig(spec="", dataset="synthetic", epochs=50))
    [cfg] = sweep.expand()
    killed = kill_worker_when(Store(tmp_path).checkpoint(cfg.run_id).exists)  # in epoch 2
    report = run_sweep(sweep, tmp_path, RayExecutor(retries=0))
    assert killed, "the run's worker was never seen"
    [row] = report.finished
    assert row["status"] == "failed" and row["reason"].startswith("ray worker died"), row
    [record] = Store(tmp_path).records()  # recorded, not lost
    assert record["row"]["status"] == "failed"
    assert read_rows(tmp_path / "runs.csv")[row["run_id"]]["status"] == "failed"


def inner_retried_run_continues_from_its_checkpoint(ray_local, tmp_path):
    """--retries: the killed run runs again, continues from its last epoch's checkpoint,
    and ends bitwise where an uninterrupted run ends."""
    from bknbench.sweep.ray import RayExecutor
    from bknbench.sweep.store import Store
    from bknbench.sweep.plan import run_sweep

    sweep = SweepConfig(specs=("bn",), batch_sizes=(4,), seeds=(0,),
                        base=RunConfig(spec="", dataset="synthetic", epochs=4,
                                       deterministic=True))
    ref = run_sweep(sweep, tmp_path / "ref", RayExecutor())
    [run_id] = [r["run_id"] for r in ref.finished]
    checkpoint = Store(tmp_path / "killed").checkpoint(run_id)
    killed = kill_worker_when(checkpoint.exists)
    report = run_sweep(sweep, tmp_path / "killed", RayExecutor(retries=1))
    assert killed, "the run's worker was never killed"
    [row] = report.finished
    assert row["status"] == "ok", row
    assert not checkpoint.exists()  # dropped on commit
    assert_same(read_rows(tmp_path / "killed" / "runs.csv"),
                read_rows(tmp_path / "ref" / "runs.csv"))
    metrics = read_metrics(tmp_path / "killed" / "metrics.csv")
    assert len(metrics) == 4
    assert_same(metrics, read_metrics(tmp_path / "ref" / "metrics.csv"))
    assert json.loads(row["config"])["epochs"] == 4


def inner_epochs_and_mlflow_from_ray_tasks(ray_local, tmp_path, monkeypatch):
    """Each task's epochs come back to the driver's events as they happen, and --log
    mlflow logs every run the tasks trained."""
    from bknbench.sweep.plan import SweepEvents, run_sweep
    from bknbench.sweep.ray import RayExecutor

    epochs, finished = [], []
    events = SweepEvents(on_epoch=lambda cfg, row: epochs.append((cfg.run_id, row["epoch"])),
                         on_finish=lambda cfg, row: finished.append(cfg.run_id))
    sweep = SweepConfig(specs=("bn", "gn"), batch_sizes=(16,), seeds=(0,),
                        base=RunConfig(spec="", dataset="synthetic", epochs=2))
    log = ("mlflow",) if importlib.util.find_spec("mlflow") else ()
    report = run_sweep(sweep, tmp_path, RayExecutor(), events, log=log)
    assert len(report.finished) == 2 and not report.failed
    assert sorted(epochs) == sorted((i, e) for i in finished for e in (1, 2))
    if log:
        import mlflow

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
        runs = mlflow.search_runs(experiment_names=["bknbench"])
        assert sorted(runs["tags.bknbench.run_id"].dropna()) == sorted(finished)
