"""Bad input through the CLI: exit status 2 and one line on stderr starting with "error:",
never a traceback (--debug shows it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from bknbench.cli import app

runner = CliRunner()
RUN = ["run", "--dataset", "synthetic", "--epochs", "1", "--seeds", "0", "--workers", "1",
       "--quiet"]



def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """A finished one-run sweep: gn at micro-batch 16."""
    out = tmp_path_factory.mktemp("results")
    result = runner.invoke(app, RUN + ["--norms", "gn", "--batch-sizes", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("args, words", [
    (["--norms", "foo"], ["unknown normalizer 'foo'"]),
    (["--norms", "bkn:p=2"], ["p=2", "[0, 1]"]),
    (["--norms", "bkn:p=abc"], ["p=abc"]),
    (["--norms", "bkn:foo=1"], ["unknown option 'foo'"]),
    (["--norms", "bkn:running=exact"], ["running=exact", "observed, posterior, authors"]),
    (["--norms", "bkn:borders=zero"], ["borders=zero", "exact, ignore"]),
    (["--norms", "bkn:stream=input"], ["stream=input", "authors, posterior"]),
    (["--norms", "bkn:guard_scope=all"], ["guard_scope=all", "layer, group"]),
    (["--norms", "gkn:running=observed"], ["unknown option 'running'"]),
    (["--norms", "bn:p=abc"], ["unknown option 'p'"]),
    (["--norms", "brn:warmup=2"], ["warmup=2", "[0, 1]"]),
    (["--norms", "brn:warmup=0.5,relax=0.1"], ["relax=0.1", "warmup=0.5"]),
    (["--norms", "brn:r_max=0.5"], ["r_max=0.5", ">= 1"]),
    (["--norms", "mabn:center=2"], ["center=2", "0 or 1"]),
    (["--norms", "mabn:ema_init=zero"], ["ema_init=zero", "first, one"]),
    (["--norms", "cbn:window=-1"], ["window=-1", ">= 0"]),
    (["--norms", "cbn:total=-5"], ["total=-5", ">= 0"]),
    (["--norms", "frn:learned_eps=maybe"], ["learned_eps=maybe"]),
    (["--norms", "evonorm-b0:unbiased=2"], ["unbiased=2"]),
    (["--norms", "evonorm-s0:groups=0"], ["groups=0"]),
    (["--norms", "ws-gn:ws_eps=0"], ["ws_eps=0", "> 0"]),
    (["--norms", "gn", "--batch-sizes", "0"], ["--batch-sizes", "0"]),
    (["--norms", "gn", "--batch-sizes", "-2"], ["--batch-sizes", "-2"]),
    (["--norms", "gn", "--batch-sizes", "x"], ["'x' is not an integer"]),
    (["--norms", "gn", "--batch-sizes", "2.5"], ["'2.5' is not an integer"]),
    (["--norms", "gn", "--batch-sizes", "100000"], ["100000", "461 training samples"]),
    (["--norms", "gn", "--epochs", "0"], ["--epochs"]),
    (["--norms", "gn", "--epochs", "-1"], ["--epochs"]),
    (["--norms", "gn", "--evals-per-epoch", "-1"], ["--evals-per-epoch", ">= 0"]),
    (["--norms", "gn", "--dataset", "nope"], ["unknown dataset 'nope'"]),
    (["--norms", "gn", "--model", "nope"], ["unknown model 'nope'"]),
    (["--norms", "gn", "--plugin", "/nonexistent/mine.py"], ["plugin /nonexistent/mine.py",
                                                             "no such file"]),
    (["--norms", "gn", "--plugin", "no_such_module_19"], ["plugin no_such_module_19",
                                                          "no module named"]),
    (["--norms", "gn", "--dataset", "npz:/nonexistent/d.npz"], ["npz:/nonexistent/d.npz",
                                                                "no such file"]),
    (["--norms", "gn", "--model", "resnet20:padding=same"], ["padding=same", "torch, tf"]),
    (["--norms", "gn", "--model", "resnet20:depth=3"],
     ["unknown option 'depth' for model resnet20", "padding"]),
    (["--norms", "gn", "--model", "mlp:padding=tf"], ["unknown option 'padding' for model mlp"]),
    (["--norms", "gn", "--model", "resnet20:padding"], ["bad model option 'padding'"]),
    (["--norms", "bkn:running_groups=last"], ["running_groups=last", "all, first"]),
    (["--norms", "bkn:stem_var=half"], ["stem_var=half", "biased, unbiased"]),
    (["--norms", "bkn:stem_grad=no"], ["stem_grad=no", "flows, stopped"]),
    (["--norms", "bkn:shortcut_pad=left"], ["shortcut_pad=left", "group, flat"]),
    (["--norms", "bkn-authors:one_value=maybe"], ["one_value=maybe", "refuse, allow"]),
    (["--norms", "gkn:stem_var=unbiased"], ["unknown option 'stem_var'"]),
    (["--norms", "gn", "--workers", "0"], ["--workers"]),
    (["--norms", "gn", "--lr", "0"], ["--lr must be positive, got 0.0"]),
    (["--norms", "gn", "--lr", "-0.1"], ["--lr must be positive"]),
    (["--norms", "gn", "--schedule", "linear"], ["--schedule must be cosine or step", "linear"]),
    (["--norms", "gn", "--momentum", "1"], ["--momentum must be in [0, 1), got 1.0"]),
    (["--norms", "gn", "--momentum", "-0.5"], ["--momentum must be in [0, 1)"]),
    (["--norms", "gn", "--weight-decay", "-1"], ["--weight-decay must be >= 0"]),
    (["--norms", "gn", "--warmup-epochs", "-1"], ["--warmup-epochs must be >= 0"]),
    (["--norms", "gn", "--milestones", "3,x"], ["--milestones", "'x' is not an integer"]),
    (["--norms", "gn", "--accumulate-to", "0"], ["--accumulate-to must be positive, got 0"]),
    (["--norms", "gn", "--batch-sizes", "4", "--accumulate-to", "6"],
     ["--accumulate-to 6 is not a multiple of micro-batch 4"]),
    (["--norms", "gn", "--seeds", "-1"], ["--seeds must be non-negative"]),
    (["--norms", "gn", "--seeds", "1,2,1"], ["--seeds", "repeats a value"]),
    (["--norms", "gn", "--device", "tpu"], ["unknown device 'tpu'"]),
    pytest.param(["--norms", "gn", "--device", "cuda"], ["no CUDA device is available"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
    (["--norms", "gn", "--threads", "0"], ["--threads must be at least 1, got 0"]),
    (["--norms", "gn", "--device", "cpu", "--cudnn-benchmark"],
     ["--cudnn-benchmark is for --device cuda", "--device cpu"]),
    (["--norms", "gn", "--preset", "nope"], ["unknown preset 'nope'"]),
    (["--norms", "gn", "--verify"], ["--verify checks the files of cifar10, cifar100",
                                     "--dataset synthetic has none to check"]),
    (["--norms", "gn", "--dataset", "cifar10", "--verify"], ["--verify needs --data-dir"]),
    (["--norms", "gn", "--executor", "dask"], ["--executor must be local or ray, got 'dask'"]),
    (["--norms", "gn", "--address", "127.0.0.1:6379"], ["--address is for --executor ray"]),
    (["--norms", "gn", "--executor", "ray"], ["--workers is for --executor local"]),
    # the fair protocol: validation split, tuning, workloads
    (["--norms", "gn", "--val-fraction", "0.6"], ["--val-fraction must be in [0, 0.5], got 0.6"]),
    (["--norms", "gn", "--val-fraction", "-0.1"], ["--val-fraction must be in [0, 0.5]"]),
    (["--norms", "gn", "--val-fraction", "0.001"], ["leaves 1 validation samples",
                                                    "fewer than its 4 classes"]),
    (["--norms", "gn", "--tune", "beta=1,2"], ["--tune: unknown key 'beta'", "tunable: lr"]),
    (["--norms", "gn", "--tune", "lr="], ["--tune lr: no value given"]),
    (["--norms", "gn", "--tune", "lr=0.1,abc"], ["--tune lr: 'abc' is not a number"]),
    (["--norms", "gn", "--tune", "lr"], ["expected KEY=VALUES"]),
    (["--norms", "gn", "--tune", "lr=0.1,0.1"], ["repeats a value"]),
    (["--norms", "gn", "--tune", "lr=0:1:log3"], ["is not a range LOW:HIGH:logN"]),
    (["--norms", "gn", "--tune", "lr=-0.1,0.2"], ["--tune lr: every value must be positive"]),
    (["--norms", "gn", "--tune", "momentum=0.5,1"], ["must be in [0, 1), got 1"]),
    (["--norms", "gn", "--tune", "lr=0.1", "--tune", "lr=0.2"], ["--tune names lr twice"]),
    (["--norms", "gn", "--tune", "lr=0.1,0.2", "--lr", "0.1"], ["either --lr or --tune lr"]),
    (["--norms", "gn", "--tune-seeds", "0"], ["--tune-seeds needs --tune"]),
    (["--norms", "gn", "--tune", "lr=0.1,0.2", "--tune-seeds", "x"],
     ["--tune-seeds: 'x' is not an integer"]),
    (["--norms", "gn", "--tune", "lr=0.1,0.2", "--val-fraction", "0"],
     ["--val-fraction 0 leaves none"]),
    (["--norms", "gn", "--workloads", "mnist1d-mlp,nope"], ["unknown workload 'nope'",
                                                           "known: mnist1d-mlp"]),
    (["--norms", "gn", "--workloads", ","], ["--workloads: no workload given"]),
    (["--norms", "gn", "--workloads", "digits-cnn"], ["--workloads sets the dataset and model",
                                                      "--dataset"]),
    (["--norms", "gm"], ["unknown normalizer 'gm' (did you mean 'gn'?)"]),
    (["--norms", "BN"], ["unknown normalizer 'BN' (did you mean 'bn'?)"]),
    (["--norms", "bkn:pp=0.5"], ["unknown option 'pp' for bkn (did you mean 'p'?)"]),
    (["--norms", "gn", "--dataset", "mnist"], ["unknown dataset 'mnist' (did you mean 'mnist1d'?)"]),
    (["--norms", "gn", "--model", "resnet21"], ["unknown model 'resnet21' (did you mean 'resnet20'?)"]),
    (["--norms", "gn", "--norms", "gn"], ["--norms names the same spec twice"]),
    (["--norms", "gn", "--seeds", "0", "--seeds", "0"], ["--seeds", "repeats a value"]),
    (["--norms", "gn", "--name", "x"], ["--name", "not both"]),
    (["--norms", "gn", "--log", "mlflo"], ["--log 'mlflo' (did you mean 'mlflow'?)", "known: mlflow"]),
    (["--norms", "gn", "--log", "mlflow", "--log", "mlflow"], ["--log", "repeats"]),
])
def test_bad_run_input(tmp_path, args, words):
    out = tmp_path / "out"
    result = runner.invoke(app, RUN + ["--out", str(out)] + args)
    assert_one_line_error(result, *words)
    assert not (out / "runs.csv").exists()


@pytest.mark.parametrize("args, words", [
    (["bn", "--compile-backend", "fast"], ["--compile-backend", "'fast'"]),
    (["nope"], ["unknown normalizer 'nope'"]),
    (["bn", "--plugin", "/nonexistent/mine.py"], ["plugin /nonexistent/mine.py"]),
])
def test_bad_check_input(args, words):
    assert_one_line_error(runner.invoke(app, ["check", *args]), *words)


@pytest.mark.parametrize("layout", ["missing", "empty", "partial", "garbage"])
def test_bad_data_dir(tmp_path, layout):
    data = tmp_path / "data"
    if layout != "missing":
        (data / "cifar-10-batches-py").mkdir(parents=True)
    names = {"partial": ["data_batch_1"], "garbage": [f"data_batch_{i}" for i in range(1, 6)]
             + ["test_batch", "batches.meta"]}.get(layout, [])
    for name in names:
        (data / "cifar-10-batches-py" / name).write_bytes(b"not a pickle\n")
    result = runner.invoke(app, ["run", "--dataset", "cifar10", "--data-dir", str(data),
                                 "--out", str(tmp_path / "out"), "--quiet"])
    assert_one_line_error(result, "CIFAR-10" if layout != "garbage" else "not a CIFAR pickle")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder under a regular file cannot be made, even by root
    result = runner.invoke(app, RUN + ["--norms", "gn", "--batch-sizes", "16",
                                       "--out", str(blocker / "out")])
    assert_one_line_error(result, "cannot write to output folder")


def test_resume_without_sweep(tmp_path):
    assert_one_line_error(runner.invoke(app, ["run", "--resume", str(tmp_path)]),
                          "nothing to resume")


@pytest.mark.parametrize("text", ["{not json", '{"specs": ["gn"]}'])
def test_resume_with_corrupt_sweep_json(tmp_path, text):
    (tmp_path / "sweep.json").write_text(text)
    assert_one_line_error(runner.invoke(app, ["run", "--resume", str(tmp_path)]),
                          f"{tmp_path / 'sweep.json'}")


def test_resume_with_flags_that_change_the_sweep(results_dir):
    result = runner.invoke(app, ["run", "--resume", str(results_dir), "--epochs", "5",
                                 "--norms", "bn", "--quiet"])
    assert_one_line_error(result, "--norms, --epochs would change it", "--out")


def test_resume_with_tune_of_a_sweep_made_without(results_dir):
    result = runner.invoke(app, ["run", "--resume", str(results_dir), "--tune", "lr=0.1,0.2",
                                 "--quiet"])
    assert_one_line_error(result, "--tune would change it")


def test_resume_of_a_sweep_from_before_the_validation_split(tmp_path, results_dir):
    import json

    sweep = json.loads((results_dir / "sweep.json").read_text())
    del sweep["base"]["val_fraction"]
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    assert_one_line_error(runner.invoke(app, ["run", "--resume", str(tmp_path)]),
                          "written before bknbench had a validation split", "--out")


def test_compare_several_folders_without_aggregate(results_dir):
    assert_one_line_error(runner.invoke(app, ["compare", str(results_dir), str(results_dir)]),
                          "give --aggregate")


def test_compare_aggregate_bad_format(results_dir):
    assert_one_line_error(runner.invoke(app, ["compare", str(results_dir), "--aggregate",
                                              "--format", "xml"]), "--format must be table")


def test_folder_in_use_by_another_sweep(results_dir):
    from bknbench.sweep.store import Store

    other = Store(results_dir)
    other.prepare()  # as a `bknbench run` on the folder would, until it ends
    try:
        result = runner.invoke(app, ["run", "--resume", str(results_dir), "--quiet"])
    finally:
        other.close()
    assert_one_line_error(result, f"{results_dir} is in use by another `bknbench run`")


@pytest.mark.parametrize("args, words", [
    (["--cpus-per-run", "0"], ["--cpus-per-run must be at least 1, got 0"]),
    (["--gpus-per-run", "1.5", "--device", "cuda"], ["--gpus-per-run must be a fraction"]),
    (["--gpus-per-run", "0.5", "--device", "cpu"], ["--device cpu with --gpus-per-run 0.5"]),
    (["--retries", "-1"], ["--retries must be >= 0, got -1"]),
    (["--cpus-per-run", "2", "--threads", "3"],
     ["--threads 3 is more than the --cpus-per-run 2 a Ray task reserves"]),
])
def test_bad_ray_input(tmp_path, monkeypatch, args, words):
    """Checked before Ray is imported or started (a stand-in module proves it)."""
    import types

    import bknbench.device

    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    monkeypatch.setattr(bknbench.device, "resolve_device",
                        lambda name, remote_gpus=False: name)  # cuda or not
    i = RUN.index("--workers")
    base = RUN[:i] + RUN[i + 2:]  # --workers is for the local executor
    result = runner.invoke(app, base + ["--norms", "gn", "--batch-sizes", "16", "--executor",
                                        "ray", "--out", str(tmp_path / "out")] + args)
    assert_one_line_error(result, *words)


def test_usage_error_exits_2():
    result = runner.invoke(app, ["run", "--epochs", "abc"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--epochs'" in result.stderr


def corrupt(folder, how):
    runs = folder / "runs.csv"
    text = runs.read_text()
    if how == "truncated":  # cut inside the last row, as a kill during a plain write would
        runs.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2])
    elif how == "malformed":
        runs.write_text("run_id,spec\nabc,bn,extra\n")
    elif how == "bad-number":
        header, row = text.splitlines()[:2]
        fields = row.split(",")
        fields[header.split(",").index("norm_batch")] = "sixteen"
        runs.write_text(header + "\n" + ",".join(fields) + "\n")
    elif how == "header-only":
        runs.write_text(text.splitlines()[0] + "\n")
    elif how == "metrics-truncated":
        metrics = folder / "metrics.csv"
        text = metrics.read_text()
        metrics.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2])


@pytest.mark.parametrize("command", ["compare", "plot"])
@pytest.mark.parametrize("how, words", [
    ("nonexistent", ["does not exist"]),
    ("empty", ["no results"]),
    ("truncated", ["runs.csv"]),
    ("malformed", ["runs.csv"]),
    ("bad-number", ["norm_batch='sixteen'"]),
    ("header-only", ["no runs"]),
])
def test_bad_results_folder(tmp_path, results_dir, command, how, words):
    folder = tmp_path / "res"
    if how != "nonexistent":
        folder.mkdir()
    if how not in ("nonexistent", "empty"):
        for name in ("runs.csv", "metrics.csv"):
            (folder / name).write_bytes((results_dir / name).read_bytes())
        corrupt(folder, how)
    result = runner.invoke(app, [command, str(folder)])
    assert_one_line_error(result, *words)


def test_plot_truncated_metrics(tmp_path, results_dir):
    for name in ("runs.csv", "metrics.csv"):
        (tmp_path / name).write_bytes((results_dir / name).read_bytes())
    corrupt(tmp_path, "metrics-truncated")
    assert_one_line_error(runner.invoke(app, ["plot", str(tmp_path)]), "metrics.csv")


@pytest.mark.parametrize("command", ["compare", "plot"])
@pytest.mark.parametrize("flt, words", [
    (["--norms", "zzz"], ["unknown normalizer 'zzz'"]),
    (["--norms", "bn"], ["the filter selected no runs", "specs present: gn"]),
    (["--batch-sizes", "999"], ["the filter selected no runs", "batch sizes: 16"]),
])
def test_filter_selecting_nothing(tmp_path, results_dir, command, flt, words):
    extra = ["--out", str(tmp_path)] if command == "plot" else []
    result = runner.invoke(app, [command, str(results_dir), *flt, *extra])
    assert_one_line_error(result, *words)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("debug", [False, True])
def test_real_process_traceback_only_with_debug(tmp_path, debug):
    cmd = [sys.executable, "-m", "bknbench", *RUN, "--norms", "foo", "--out", str(tmp_path)]
    proc = subprocess.run(cmd + ["--debug"] * debug, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if debug:
        assert proc.returncode != 0
        assert "Traceback" in proc.stderr and "ConfigError: unknown normalizer" in proc.stderr
    else:
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.splitlines() == [
            "error: unknown normalizer 'foo'; known: " + proc.stderr.split("known: ")[1].strip()]


def test_report_errors(tmp_path, results_dir):
    """report: a missing folder, a folder with no results, a sweep without one ok run, an
    --out that cannot be written: one line each, exit 2, no file left behind."""
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "nowhere")]),
                          "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "empty")]),
                          "no results in", "runs.csv")
    failed = tmp_path / "failed"
    result = runner.invoke(app, RUN + ["--model", "mlp", "--norms", "bn", "--batch-sizes", "1",
                                       "--out", str(failed)])
    assert result.exit_code == 0, result.output
    assert_one_line_error(runner.invoke(app, ["report", str(failed)]),
                          "no successful runs in", "nothing to report")
    assert not (failed / "report.html").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(runner.invoke(app, ["report", str(results_dir), "--out",
                                              str(blocker / "r.html")]), "cannot write")
    assert_one_line_error(runner.invoke(app, ["report", str(results_dir), "--out",
                                              str(tmp_path)]), "cannot write", "is a folder")


# ---------------------------------------------------------------- diagnostics options
@pytest.mark.parametrize("args, words", [
    (["--metric", "nope"], ["--metric must be final_test_acc, final_val_acc, "
                            "final_val_acc_population", "'nope'"]),
    (["--metric", "final_val_acc_population"], ["final_val_acc_population is empty in every "
                                                "successful run", "--diagnose"]),
    (["--metric", "final_val_acc_population", "--format", "csv"], ["is empty"]),
])
def test_bad_compare_metric(results_dir, args, words):
    """gn alone was run: the population accuracy applies to none of it."""
    assert_one_line_error(runner.invoke(app, ["compare", str(results_dir), *args]), *words)


def test_diagnose_takes_no_value(tmp_path):
    result = runner.invoke(app, RUN + ["--norms", "bn", "--out", str(tmp_path), "--diagnose=yes"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--diagnose" in result.stderr and "does not take a value" in result.stderr


def test_plot_truncated_stats(tmp_path, results_dir):
    for name in ("runs.csv", "metrics.csv"):
        (tmp_path / name).write_bytes((results_dir / name).read_bytes())
    run_id = (results_dir / "runs.csv").read_text().splitlines()[1].split(",")[0]
    (tmp_path / "stats.csv").write_text("run_id,epoch,layer,layer_name,metric,value\n"
                                        f"{run_id},1,0,1,mean_err_used,0.5\n{run_id},1,0")
    assert_one_line_error(runner.invoke(app, ["plot", str(tmp_path)]), "stats.csv")


@pytest.mark.parametrize("text, words", [
    ("epoch = 3\n", ["unknown option 'epoch' (did you mean 'epochs'?)", "options: "]),
    ("epochs = 'many'\n", ["epochs = 'many'", "integer"]),
    ("epochs = \n", ["is not TOML"]),
    ("[sweep]\nepochs = 3\n", ["[sweep] is not a table of `run`"]),
    (None, ["cannot read --config", "No such file"]),
])
def test_bad_config_file(tmp_path, text, words):
    study = tmp_path / "study.toml"
    if text is not None:
        study.write_text(text)
    result = runner.invoke(app, RUN + ["--config", str(study), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a/b", "..", " "])
def test_bad_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, RUN + ["--norms", "gn", "--name", name])
    assert_one_line_error(result, "--name", "a folder name")
    assert not (tmp_path / "results").exists()


def test_log_mlflow_without_mlflow(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    result = runner.invoke(app, RUN + ["--norms", "gn", "--log", "mlflow",
                                       "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "--log mlflow needs mlflow", "pip install")
    assert not (tmp_path / "out" / "runs.csv").exists()


def test_another_sweep_in_the_folder(results_dir):
    before = (results_dir / "runs.csv").read_bytes()
    result = runner.invoke(app, RUN + ["--norms", "gn", "--batch-sizes", "16", "--epochs", "2",
                                       "--out", str(results_dir)])
    assert_one_line_error(result, "holds another sweep", "--epochs 1 there, 2 here",
                          f"--resume {results_dir}")
    assert (results_dir / "runs.csv").read_bytes() == before
