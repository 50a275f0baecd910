"""The numbers --diagnose writes, on a 2-group, 2-channel example worked out by hand: the
error and bias metrics with eps, the running statistics, the BKN ratio statistic, the
counters; and the reference statistics of the rivals that do not centre."""
import math

import pytest
import torch
from torch import nn

import bknbench.diagnose.diagnostics as diagnostics
from bknbench.norms.registry import parse_spec

L = math.log(2.0)
T = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731


class Layer(nn.Module):
    """A batch-dependent layer as the probes see it, eps 0.5; a BKN layer's pairs."""

    batch_dependent = True
    eps = 0.5

    def reference(self, mean, var):
        return mean, var

    def eval_statistics(self):  # running: (1.5, -1), (7.5, 1.5): + eps (8, 2)
        return T(1.5, -1.0), T(7.5, 1.5)

    def training_counters(self):
        return {"guard_trusted": torch.tensor(0.25), "gain_p": torch.tensor(math.nan)}

    def reset_counters(self):
        pass


def test_epoch_rows_against_hand_numbers(monkeypatch):
    # population mu (1, -1), var (3.5, 1.5): var + eps (4, 2)
    pop = [(T(1.0, -1.0), T(3.5, 1.5))]
    used = (T([2.0, -1.0], [0.0, -3.0]), T([3.5, 7.5], [15.5, 0.5]))  # v + eps: 4 8; 16 1
    observed = (T([1.0, -1.0], [1.0, -1.0]), T([1.0, 2.0], [4.0, 8.0]))
    predicted = (T([1.0, -1.0], [1.0, -1.0]), T([3.0, 4.0], [2.0, 16.0]))  # ratios 3 2 .5 2
    pairs = [{"used": used, "observed": observed, "predicted": predicted}]
    monkeypatch.setattr(diagnostics, "population_stats", lambda *a: pop)
    monkeypatch.setattr(diagnostics, "train_stats", lambda *a: pairs)
    model = nn.Sequential(Layer())
    diag = diagnostics.Diagnostics(model, torch.zeros(4, 2), 2, 2)
    rows = diag.epoch_rows(3)
    got = {r["metric"]: r["value"] for r in rows}
    assert {(r["epoch"], r["layer"], r["layer_name"]) for r in rows} == {(3, 0, "0")}
    want = {
        "population_mean": 0.0, "population_var": 2.5,
        # (m - mu)^2 / (var + eps): 1/4, 0; 1/4, 4/2 -> mean 0.625
        "mean_err_used": 0.625,
        # log((v + eps) / (var + eps))^2: 0, (2L)^2; (2L)^2, L^2 -> 9 L^2 / 4
        "logvar_err_used": 9 * L * L / 4,
        # per channel, the mean over groups: (1 - 1) / 2 = 0; (0 - 2) / 2 = -1 -> (0 + 1/2) / 2
        "mean_bias_used": 0.25,
        # L, L / 2 -> (L^2 + L^2 / 4) / 2
        "logvar_bias_used": 5 * L * L / 8,
        # running: (0.5^2 / 4 + 0) / 2; (log 2)^2 / 2
        "mean_err_running": 0.03125, "logvar_err_running": L * L / 2,
        "var_ratio_median": 2.0,
        "guard_trusted": 0.25,
    }
    for metric, value in want.items():
        assert got[metric] == pytest.approx(value, rel=1e-6), metric
    assert "gain_p" not in got  # a counter that counted nothing is left out
    assert "mean_bias_running" not in got and "mean_err_observed" in got
    assert got["mean_err_observed"] == pytest.approx((0 + 0 + 0 + 0) / 4, abs=1e-12)
    # observed variances + eps 1.5 2.5; 4.5 8.5 against 4 2
    lv = [math.log(1.5 / 4), math.log(2.5 / 2), math.log(4.5 / 4), math.log(8.5 / 2)]
    assert got["logvar_err_observed"] == pytest.approx(sum(v * v for v in lv) / 4, rel=1e-6)


@pytest.mark.parametrize("spec, want", [
    # no mean subtraction: MABN's statistic is E[x^2] = var + mean^2 (Yan et al., eq. 5)
    ("mabn", (T(0.0, 0.0), T(4.5, 2.5))),
    # EvoNorm-B0 divides x, not centred, by the batch std (Liu et al., 2020)
    ("evonorm-b0", (T(0.0, 0.0), T(3.5, 1.5))),
    # BKN and BN: the population mean and variance themselves
    ("bkn", (T(1.0, -1.0), T(3.5, 1.5))),
    ("bn", (T(1.0, -1.0), T(3.5, 1.5))),
])
def test_the_reference_statistics_by_hand(spec, want):
    layer = parse_spec(spec).build(2, 2).double()
    mean, var = layer.reference(T(1.0, -1.0), T(3.5, 1.5))
    torch.testing.assert_close(mean, want[0], rtol=0, atol=0)
    torch.testing.assert_close(var, want[1], rtol=0, atol=0)
