"""Plugins: a user's normalizers, models and datasets in the same registries, recorded with
the runs that use them (source and sha256, in the run id), loaded again on resume, and
refused in one line when they fail to import, clash with a name, or changed."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import bknbench
from bknbench import plugins
from bknbench.cli import app
from bknbench.errors import ConfigError
from bknbench.norms.registry import REGISTRY, parse_spec

runner = CliRunner()

NORM = '''
import torch
from bknbench import register_norm


@register_norm("{name}", "GroupNorm with one group, by a user")
def make(num_features, norm_batch):
    return torch.nn.GroupNorm(1, num_features)
'''


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_the_public_api_is_the_registries_own_functions():
    from bknbench.data.registry import register_dataset
    from bknbench.models.registry import register_model
    from bknbench.norms.registry import register

    assert bknbench.register_norm is register
    assert bknbench.register_model is register_model
    assert bknbench.register_dataset is register_dataset
    assert set(bknbench.__all__) >= {"register_norm", "register_model", "register_dataset"}
    with pytest.raises(AttributeError):
        bknbench.nothing_here


def test_a_file_plugin_registers_and_is_recorded(tmp_path, plugin_sandbox):
    path = write(tmp_path / "mine.py", NORM.format(name="mine"))
    plugin = plugins.load(str(path))
    assert plugin.provides == ("norm:mine",) and plugin.source == str(path.resolve())
    assert len(plugin.sha256) == 64 and plugins.load(str(path)) is plugin  # once a process
    assert parse_spec("mine").build(4, 2)(__import__("torch").ones(2, 4)).shape == (2, 4)


def test_a_module_plugin_and_the_environment_variable(tmp_path, monkeypatch, plugin_sandbox):
    write(tmp_path / "user_norms.py", NORM.format(name="from-module"))
    write(tmp_path / "env_norm.py", NORM.format(name="from-env"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.ENV, str(tmp_path / "env_norm.py"))
    monkeypatch.setattr(plugins, "installed", lambda: [])
    loaded = plugins.load_all(["user_norms"])
    assert [p.provides for p in loaded] == [("norm:from-env",), ("norm:from-module",)]
    assert loaded[1].source == "user_norms"


def test_an_entry_point_plugin_is_loaded(tmp_path, monkeypatch, plugin_sandbox):
    write(tmp_path / "installed_norm.py", NORM.format(name="installed"))
    monkeypatch.syspath_prepend(str(tmp_path))

    class EntryPoint:
        value = "installed_norm"

    monkeypatch.setattr(plugins.metadata, "entry_points",
                        lambda group: [EntryPoint()] if group == "bknbench.plugins" else [])
    assert [p.provides for p in plugins.load_all()] == [("norm:installed",)]


@pytest.mark.parametrize("text, words", [
    (NORM.format(name="bn"), ["normalizer 'bn' is already registered"]),
    ("import torch\nraise RuntimeError('no GPU here')\n",
     ["failed to import", "RuntimeError: no GPU here"]),
    ("def broken(:\n", ["failed to import", "SyntaxError"]),
])
def test_a_broken_plugin_is_one_line_and_leaves_the_registries(tmp_path, plugin_sandbox,
                                                                text, words):
    path = write(tmp_path / "bad.py", NORM.format(name="first-ok") + text)
    before = dict(REGISTRY)
    with pytest.raises(ConfigError) as e:
        plugins.load(str(path))
    assert str(path) in str(e.value) and all(w in str(e.value) for w in words), e.value
    assert REGISTRY == before  # "first-ok" undone too
    result = runner.invoke(app, ["norms", "--plugin", str(path)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert all(w in result.stderr for w in words)


def test_norms_lists_a_plugins_normalizer(tmp_path, plugin_sandbox):
    path = write(tmp_path / "mine.py", NORM.format(name="listed-one"))
    result = runner.invoke(app, ["norms", "--plugin", str(path)])
    assert result.exit_code == 0, result.output
    assert "listed-one" in result.stdout and "norm:listed-one" in result.stdout


def sweep_args(out, path):
    return ["run", "--plugin", str(path), "--norms", "gn,mine", "--dataset", "synthetic",
            "--batch-sizes", "16", "--epochs", "1", "--workers", "1", "-q", "--out", str(out)]


def test_runs_record_their_plugin_and_a_changed_source_refuses_resume(tmp_path,
                                                                       plugin_sandbox):
    path = write(tmp_path / "mine.py", NORM.format(name="mine"))
    out = tmp_path / "out"
    result = runner.invoke(app, sweep_args(out, path))
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    plugin = plugins.LOADED[str(path.resolve())]
    assert sweep["plugins"] == [plugin.to_dict()]
    rows = {r["spec"]: r for r in __import__("csv").DictReader(open(out / "runs.csv"))}
    assert rows["gn"]["plugins"] == ""  # a built-in's run id does not follow the plugin
    assert json.loads(rows["mine"]["plugins"]) == [plugin.label]
    assert json.loads(rows["mine"]["config"])["plugins"] == [plugin.label]

    resumed = runner.invoke(app, ["run", "--resume", str(out), "-q"])  # nothing to do
    assert resumed.exit_code == 0, resumed.output
    path.write_text(path.read_text() + "# edited\n")
    refused = runner.invoke(app, ["run", "--resume", str(out), "-q"])
    assert refused.exit_code == 2, refused.output
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "changed since the sweep was planned" in lines[0], lines
    assert (out / "runs.csv").read_text().count("\n") == 3  # header + 2 runs, untouched
    del plugins.LOADED[str(path.resolve())], REGISTRY["mine"]  # as in a fresh process
    extended = runner.invoke(app, sweep_args(out, path))  # --out on it again: refused too
    assert extended.exit_code == 2 and "holds runs of plugin" in extended.stderr
    assert len(extended.stderr.strip().splitlines()) == 1
    assert (out / "runs.csv").read_text().count("\n") == 3


def test_a_worker_refuses_a_plugin_that_changed(tmp_path, plugin_sandbox):
    """A run whose plugin changed after the sweep was planned fails with the cause."""
    from bknbench.sweep.run import execute_run

    path = write(tmp_path / "mine.py", NORM.format(name="mine"))
    plugin = plugins.load(str(path))
    label = plugin.label.replace(plugin.sha256, "0" * 64)
    cfg = __import__("bknbench.config", fromlist=["RunConfig"]).RunConfig(
        spec="mine", dataset="synthetic", epochs=1, norm_batch=16, sgd_batch=16,
        plugins=(label,))
    row = execute_run(cfg)["row"]
    assert row["status"] == "failed" and "changed since the sweep was planned" in row["reason"]


def test_each_run_carries_the_plugins_of_its_norm_model_and_dataset(monkeypatch):
    from bknbench.config import RunConfig, SweepConfig

    monkeypatch.setitem(REGISTRY, "mine", REGISTRY["gn"])  # a stand-in for a plugin's
    mine, model, data = "a.py@sha256:1", "b.py@sha256:2", "c.py@sha256:3"
    plugins_ = ((mine, ("norm:mine",)), (model, ("model:tiny",)), (data, ("dataset:waves",)))
    sweep = SweepConfig(specs=("bn", "mine:groups=4"), batch_sizes=(2,), plugins=plugins_,
                        base=RunConfig(spec="", model="tiny"))
    runs = {cfg.spec: cfg for cfg in sweep.expand()}
    assert runs["bn"].plugins == (model,) and runs["mine:groups=4"].plugins == (mine, model)
    plain = SweepConfig(specs=("bn",), batch_sizes=(2,), plugins=plugins_).expand()[0]
    assert plain.plugins == () and plain.run_id == RunConfig(spec="bn").run_id  # ids kept
    assert runs["bn"].run_id != RunConfig(spec="bn", model="tiny").run_id
