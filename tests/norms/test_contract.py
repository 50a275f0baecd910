"""`bknbench check`: every registered normalizer meets its contract (a test over the
registry), and the checks can fail: a normalizer that leaks statistics across the
micro-batches of one forward fails isolation, exit status 1."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.norms.contract import check_spec
from bknbench.norms.registry import REGISTRY, Carries, NormEntry, names, parse_spec

runner = CliRunner()


@pytest.mark.parametrize("name", names())
def test_every_registered_normalizer_passes_its_check(name):
    checks = check_spec(parse_spec(name), backend="aot_eager")
    failed = [(c.name, c.detail) for c in checks if not c.passed]
    assert not failed, failed
    assert len(checks) == 13


@pytest.mark.parametrize("name", ["brn", "mabn", "cbn", "bkn"])
def test_the_stateful_rivals_declare_what_they_carry(name):
    iso = {c.name: c for c in check_spec(parse_spec(name), backend=None)}["micro-batch isolation"]
    assert parse_spec(name).carries is not None and "nothing carried" not in iso.detail
    assert parse_spec("bkn:guard_scope=group").carries is None


class WholeBatchNorm(nn.Module):
    """Normalizes over the whole training batch: every micro-batch sees the others."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x):
        return self.bn(x.flatten(2)).reshape(x.shape) if x.dim() > 2 else self.bn(x)


def register_leaky(monkeypatch, name="leaky", carries=None):
    entry = NormEntry(name, lambda c, b: WholeBatchNorm(c), "leaks", carries=carries)
    monkeypatch.setitem(REGISTRY, name, entry)
    return parse_spec(name)


def test_a_normalizer_over_the_whole_batch_fails_isolation(monkeypatch):
    checks = {c.name: c for c in check_spec(register_leaky(monkeypatch), backend=None)}
    assert not checks["micro-batch isolation"].passed
    assert "before it" in checks["micro-batch isolation"].detail
    assert [n for n, c in checks.items() if not c.passed] == ["micro-batch isolation"]


def test_a_declared_later_carry_does_not_excuse_an_earlier_change(monkeypatch):
    """Declaring sequential state allows later micro-batches to change, not earlier ones."""
    spec = register_leaky(monkeypatch, carries=Carries("running statistics"))
    checks = {c.name: c for c in check_spec(spec, backend=None)}
    assert not checks["micro-batch isolation"].passed
    spec = register_leaky(monkeypatch, "leaky2", carries=Carries("everything", backwards=True))
    assert {c.name: c for c in check_spec(spec, backend=None)}["micro-batch isolation"].passed


LEAKY_PLUGIN = '''
import torch
from bknbench import register_norm


class WholeBatch(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(c)

    def forward(self, x):
        return self.bn(x.flatten(2)).reshape(x.shape) if x.dim() > 2 else self.bn(x)


@register_norm("whole-batch", "BN over the whole training batch, not each micro-batch")
def make(num_features, norm_batch):
    return WholeBatch(num_features)
'''


def test_check_exits_1_on_a_leaking_plugin_and_0_on_bn(tmp_path, plugin_sandbox):
    path = tmp_path / "leaky.py"
    path.write_text(LEAKY_PLUGIN)
    result = runner.invoke(app, ["check", "whole-batch", "--plugin", str(path),
                                 "--compile-backend", "none"])
    assert result.exit_code == 1, result.output
    assert "FAIL  micro-batch isolation" in result.stdout
    assert "failed: micro-batch isolation" in result.stdout
    result = runner.invoke(app, ["check", "bn", "--compile-backend", "none"])
    assert result.exit_code == 0 and "12 of 12 checks passed" in result.stdout


def test_micro_batch_one_refused_with_its_own_message(monkeypatch):
    def refuse(c, b):
        if b == 1:
            raise ValueError("needs two samples per micro-batch")
        return nn.GroupNorm(1, c)

    monkeypatch.setitem(REGISTRY, "two", NormEntry("two", refuse, "refuses micro-batch 1"))
    check = {c.name: c for c in check_spec(parse_spec("two"), backend=None)}["micro-batch 1"]
    assert check.passed and check.detail == ("(N, C) refused: needs two samples per "
                                             "micro-batch; (N, C, L) refused: needs two "
                                             "samples per micro-batch")
    bn = {c.name: c for c in check_spec(parse_spec("bn"), backend=None)}["micro-batch 1"]
    assert bn.passed and bn.detail.startswith("(N, C) refused: BatchNorm is undefined with 1")
    assert bn.detail.endswith("; (N, C, L) works")


def test_a_layer_that_does_not_compile_says_so_on_its_entry(monkeypatch):
    monkeypatch.setitem(REGISTRY, "nc", NormEntry("nc", lambda c, b: nn.GroupNorm(1, c), "x",
                                                  compiles=False))
    check = {c.name: c for c in check_spec(parse_spec("nc"))}["torch.compile"]
    assert check.passed and "declared" in check.detail


def test_nan_output_fails(monkeypatch):
    class Nan(nn.Module):
        def forward(self, x):
            return x * float("nan")

    monkeypatch.setitem(REGISTRY, "nan", NormEntry("nan", lambda c, b: Nan(), "nan"))
    failed = {c.name for c in check_spec(parse_spec("nan"), backend=None) if not c.passed}
    assert {"train (N, C)", "eval (N, C, H, W)", "micro-batch 1"} <= failed
