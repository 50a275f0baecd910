"""compare --aggregate and the performance profile against hand computation."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.report.aggregate import mean_ranks, profile, profile_area, ratios
from bknbench.report.schema import RUN_COLUMNS

from test_results import run_row, write_csv

runner = CliRunner()

# test accuracy (%) per (workload, micro-batch, spec); two seeds each, +-1 around it
ACC = {
    ("mnist1d", "mlp", 2): {"bn": 20.0, "gn": 50.0, "bkn": 50.0},  # gn and bkn tie
    ("mnist1d", "mlp", 128): {"bn": 60.0, "gn": 50.0, "bkn": 55.0},
    ("digits", "cnn", 2): {"bn": 80.0, "gn": 95.0, "bkn": None},  # bkn: every seed failed
    ("digits", "cnn", 128): {"bn": 98.0, "gn": 96.0, "bkn": 97.0},
}


def _runs():
    rows = []
    for (dataset, model, b), accs in ACC.items():
        for spec, acc in accs.items():
            for seed, d in ((0, -1.0), (1, 1.0)):
                status = "ok" if acc is not None else "diverged"
                rows.append(run_row(spec, b, seed, (acc or 0) + d, status, dataset, model))
    return rows


def _frame(rows):
    df = pd.DataFrame(rows)
    df["final_test_acc"] = pd.to_numeric(df["final_test_acc"].replace("", np.nan))
    df["test_samples"] = pd.to_numeric(df["test_samples"].replace("", np.nan))
    return df


def test_mean_ranks_by_hand():
    ranks = mean_ranks(_frame(_runs())).set_index(["spec", "norm_batch"])
    # b=2: mnist1d gn 1.5, bkn 1.5, bn 3; digits gn 1, bn 2, bkn 3 (no score: last)
    # b=128: mnist1d bn 1, bkn 2, gn 3; digits bn 1, bkn 2, gn 3
    expected = {("gn", 2): 1.25, ("bkn", 2): 2.25, ("bn", 2): 2.5,
                ("bn", 128): 1.0, ("bkn", 128): 2.0, ("gn", 128): 3.0}
    for key, value in expected.items():
        assert ranks.loc[key, "mean_rank"] == value, key
        assert ranks.loc[key, "workloads"] == 2
    assert list(ranks.index[:2]) == [("bn", 128), ("gn", 2)]  # best mean rank first


def test_profile_by_hand():
    runs = _frame(_runs())
    r = ratios(runs)
    assert len(r) == 4  # (workload, micro-batch) problems
    # digits b=128: errors bn 2, bkn 3, gn 4 -> ratios 1, 1.5, 2
    row = r.loc[("digits", "cnn", 128)]
    assert (row["bn"], row["bkn"], row["gn"]) == (1.0, 1.5, 2.0)
    assert math.isinf(r.loc[("digits", "cnn", 2), "bkn"])  # no score: never within tau
    rho = profile(runs, np.array([1.0, 1.6, 100.0]))
    # bn: ratios 80/50 = 1.6, 1, 20/5 = 4, 1 -> within 1: 2 of 4; within 1.6: 3 of 4
    assert list(rho["bn"]) == [0.5, 0.75, 1.0]
    # bkn: ratios 1, 45/40 = 1.125, inf, 1.5
    assert list(rho["bkn"]) == [0.25, 0.75, 0.75]
    area = profile_area(runs, tau_max=4.0)
    # bn: (max(0, 4 - r) / 3) over ratios 1.6, 1, 4, 1 -> (2.4 + 3 + 0 + 3) / 3 / 4
    assert area["bn"] == pytest.approx((2.4 + 3 + 0 + 3) / 12)
    assert 0 <= area.min() and area.max() <= 1


def test_compare_aggregate_over_two_sweeps(tmp_path):
    """Two results folders on different workloads: the json records of the issue."""
    rows = _runs()
    for name, dataset in (("a", "mnist1d"), ("b", "digits")):
        (tmp_path / name).mkdir()
        write_csv(tmp_path / name / "runs.csv", RUN_COLUMNS,
                  [r for r in rows if r["dataset"] == dataset])
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                                 "--aggregate", "--format", "json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert all(set(r) == {"spec", "norm_batch", "mean_rank", "workloads"} for r in records)
    got = {(r["spec"], r["norm_batch"]): (r["mean_rank"], r["workloads"]) for r in records}
    assert got[("gn", 2)] == (1.25, 2) and got[("bkn", 2)] == (2.25, 2)
    # the study folder holding both gives the same
    same = runner.invoke(app, ["compare", str(tmp_path), "--aggregate", "--format", "json"])
    assert json.loads(same.stdout) == records
    table = runner.invoke(app, ["compare", str(tmp_path), "--aggregate"])
    assert table.exit_code == 0 and "mean rank over 2 workload(s)" in table.stdout
