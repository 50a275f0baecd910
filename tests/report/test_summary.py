"""summary.py's intervals in their corners: one seed, all seeds equal, 0% and 100%, pairing;
and, over random inputs, that no interval `compare` prints (table, csv, json, markdown)
leaves [0, 100]."""
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.report.schema import RUN_COLUMNS
from bknbench.report.summary import acc_interval, diff_interval, summarize

from test_results import run_row, write_csv, write_results

runner = CliRunner()


def test_one_seed_has_a_mean_and_no_interval():
    assert acc_interval([97.5], 450)[0] == 97.5
    assert all(math.isnan(v) for v in acc_interval([97.5], 450)[1:])
    assert all(math.isnan(v) for v in acc_interval([], 450))


T975 = {2: 4.302652729911275, 3: 3.182446305284263}  # t(0.975, dof)


@pytest.mark.parametrize("value", [0.0, 37.5, 100.0])
def test_all_seeds_equal_leave_the_rounding_of_one_test_sample(value):
    """Four seeds at the same count out of 450: no measured spread, but an accuracy moves in
    steps of 100/450 points, so the interval keeps Sheppard's floor (sd >= step / sqrt(12)):
    about t(0.975, 3) * 0.064 / 2 = 0.10 points a side in the middle, one-sided at a bound."""
    mean, std, low, high = acc_interval([value] * 4, 450)
    assert (mean, std) == (value, 0.0)
    assert 0.0 <= low <= value <= high <= 100.0 and high - low > 0
    floor = T975[3] * (100 / 450) / math.sqrt(12) / 2
    if value == 37.5:
        assert (value - low, high - value) == pytest.approx((floor, floor), rel=0.02)
    else:  # at a bound the interval reaches it and lies on one side
        assert (low, high)[value == 100.0] == value and 0 < high - low < 1.0


def test_zero_and_hundred_percent_stay_inside_and_include_the_data():
    for accs in ([100.0, 100.0, 99.0], [0.0, 0.0, 1.0], [0.0, 100.0], [0.0, 50.0, 100.0]):
        mean, _, low, high = acc_interval(accs, 450)
        assert 0.0 <= low <= high <= 100.0
        assert low <= min(accs) + 1e-9 or high >= max(accs) - 1e-9
    _, _, low, high = acc_interval([100.0, 100.0, 99.0], 450)
    assert high == 100.0 and 90.0 < low < 99.0  # the side of the bound is short, not cut
    _, _, low, high = acc_interval([0.0, 100.0], 450)
    assert (low, high) == (0.0, 100.0)  # two seeds at the extremes: nothing is known


def test_the_correction_uses_the_test_set_size():
    """The half-sample correction: with more test samples an accuracy of 100% sits
    further out on the logit scale, so the same spread of seeds is wider there."""
    small = acc_interval([100.0, 99.0, 98.0], 100)
    large = acc_interval([100.0, 99.0, 98.0], 10000)
    assert large[2] < small[2]
    assert acc_interval([90.0, 92.0], None) == acc_interval([90.0, 92.0], 1000)  # unknown N


def test_paired_by_seed_and_welch_otherwise():
    ref = pd.Series([90.0, 92.0, 94.0], index=[0, 1, 2])
    same = pd.Series([91.0, 92.5, 95.5], index=[2, 0, 1])  # same seeds, another order
    d, low, high, method, n = diff_interval(same, ref)
    diffs = np.array([92.5 - 90, 95.5 - 92, 91 - 94])
    half = T975[2] * diffs.std(ddof=1) / math.sqrt(3)
    assert (method, n) == ("paired", 3) and d == pytest.approx(diffs.mean())
    assert (low, high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    other = pd.Series([91.0, 92.5, 95.5], index=[3, 4, 5])  # other seeds: Welch
    assert diff_interval(other, ref)[3] == "welch"
    # pairing removes the seed-to-seed part both share: a constant shift is exact
    shifted = ref - 30.0
    floor = T975[2] * (100 / 450) / math.sqrt(6) / math.sqrt(3)  # rounding of two counts
    assert diff_interval(shifted, ref, 450)[1:3] == pytest.approx((-30 - floor, -30 + floor))
    assert diff_interval(shifted.set_axis([5, 6, 7]), ref)[1] < -34  # unpaired: wide
    # a Δ interval is bounded by what is possible too
    d, low, high, _, _ = diff_interval(pd.Series([0.0, 100.0, 0.0]), pd.Series([100.0, 0.0, 100.0]))
    assert -100.0 <= low <= d <= high <= 100.0 and (low, high) == (-100.0, 100.0)


NUMBER = re.compile(r"-?\d+\.\d+")


def _random_sweep(rng, tmp_path, i):
    """A random results folder: accuracies drawn near the bounds and in the middle, some
    cells with one seed, some all equal, some failures."""
    runs = []
    for spec in ("bn", "gn", "bkn"):
        for b in (1, 2, 128):
            kind = rng.integers(5)
            n = int(rng.integers(1, 6))
            for seed in range(n):
                if kind == 0:
                    acc = float(rng.choice([0.0, 100.0, 100.0 / 450]))
                elif kind == 1:
                    acc = 100.0 * round(float(rng.uniform(0.97, 1.0)) * 450) / 450
                elif kind == 2:
                    acc = 55.0
                else:
                    acc = float(rng.uniform(0, 100))
                status = "ok" if rng.random() > 0.1 else "diverged"
                runs.append(run_row(spec, b, seed, acc, status))
    if not any(r["status"] == "ok" for r in runs):
        runs[0] = run_row("bn", 128, 0, 50.0)
    return write_results(tmp_path / f"r{i}", runs)


def test_no_interval_printed_by_compare_leaves_0_100(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = _random_sweep(rng, tmp_path, i)
        s = summarize(pd.read_csv(folder / "runs.csv"))
        ok = s[s["n"] > 1]
        assert ((ok["ci_low"] >= 0) & (ok["ci_low"] <= ok["ci_high"]) & (ok["ci_high"] <= 100)).all()
        out = {fmt: runner.invoke(app, ["compare", str(folder), "--format", fmt])
               for fmt in ("table", "csv", "json", "markdown")}
        assert all(r.exit_code == 0 for r in out.values()), [r.output for r in out.values()]
        for rec in json.loads(out["json"].stdout):
            for key in ("ci_low", "ci_high", "mean"):
                assert rec[key] is None or 0.0 <= rec[key] <= 100.0, (key, rec)
            for key in ("ref_diff_low", "ref_diff_high"):
                assert rec[key] is None or -100.0 <= rec[key] <= 100.0, (key, rec)
            assert rec["ci_method"] == ("logit-t" if rec["n"] > 1 else "")
        csv = pd.read_csv(__import__("io").StringIO(out["csv"].stdout))
        bounds = csv[["ci_low", "ci_high"]].to_numpy().ravel()
        assert ((bounds >= 0) & (bounds <= 100) | np.isnan(bounds)).all()
        # the text formats: every bracketed accuracy interval [a, b] within [0, 100]
        for fmt in ("table", "markdown"):
            for a, b in re.findall(r"\[(\d+\.\d+), (\d+\.\d+)\]", out[fmt].stdout):
                assert 0.0 <= float(a) <= float(b) <= 100.0, (fmt, a, b)


def test_older_results_without_val_samples_say_what_was_assumed(tmp_path):
    runs = [run_row("bn", 128, s, a) for s, a in enumerate([90.0, 92.0, 94.0])]
    old = ("val_samples", "test_samples", "final_test_acc")  # as before either existed
    for r in runs:
        for k in old:
            del r[k]
    folder = tmp_path / "old"
    folder.mkdir()
    write_csv(folder / "runs.csv", [c for c in RUN_COLUMNS if c not in old], runs)
    result = runner.invoke(app, ["compare", str(folder), "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert "test-set size not recorded: N = 1000 assumed" in result.stdout
    # the accuracies of a folder from before the validation split are the test split's
    assert result.stderr.count("before bknbench had a validation split") == 1
    low, high = acc_interval([90.0, 92.0, 94.0], 1000)[2:]
    assert f"92.00 [{low:.2f}, {high:.2f}]" in result.stdout


# ---------------------------------------------------------------- by hand, and degenerate
def _logit(p):
    return math.log(p) - math.log1p(-p)


def test_logit_t_interval_of_two_seeds_by_hand():
    """90% and 92% of N = 1000: g(a) = logit((10 a + 1/2) / 1001), t(0.975, 1) = 12.7062."""
    y = [_logit((900 + 0.5) / 1001), _logit((920 + 0.5) / 1001)]
    s_y = abs(y[0] - y[1]) / math.sqrt(2)  # sample std of two; the floor is far below
    p = 910.5 / 1001
    assert s_y > 1000 / 100 / 1001 / (p * (1 - p)) * 0.1 / math.sqrt(12)
    half = 12.706204736174707 * s_y / math.sqrt(2)
    back = [100 * (1001 / (1 + math.exp(-v)) - 0.5) / 1000
            for v in ((y[0] + y[1]) / 2 - half, (y[0] + y[1]) / 2 + half)]
    mean, std, low, high = acc_interval([90.0, 92.0], 1000)
    assert (mean, std) == (91.0, pytest.approx(math.sqrt(2)))
    assert (low, high) == pytest.approx(back, abs=1e-9)
    assert 0 < low < 90 and 92 < high <= 100  # and the clip at 100 holds


def test_welch_by_hand():
    """Two seeds against three others: va = 2 / 2, vr = 16 / 3, dof = (19/3)^2 / (1 + (16/3)^2
    / 2) = 361/137."""
    from scipy.stats import t

    a = pd.Series([90.0, 92.0], index=[0, 1])
    r = pd.Series([80.0, 84.0, 88.0], index=[2, 3, 4])
    half = t.ppf(0.975, 361 / 137) * math.sqrt(1 + 16 / 3)
    assert diff_interval(a, r, 1000) == pytest.approx((7.0, 7.0 - half, 7.0 + half, "welch", 2))


def test_one_seed_on_each_side_has_a_difference_and_no_interval():
    runs = pd.DataFrame([run_row("bn", 2, 0, 90.0), run_row("gn", 2, 0, 93.0),
                         run_row("bkn", 2, 1, 95.0), run_row("bkn", 2, 2, 96.0)])
    s = summarize(runs).set_index("spec")
    assert bool(s.loc["bn", "is_ref"]) and s.loc["bn", "ref_diff"] == 0.0
    assert s.loc["bn", "ref_diff_method"] == "" and s.loc["bn", "ref_diff_n"] == 0
    gn = s.loc["gn"]
    assert (gn["n"], gn["mean"], gn["ci_method"]) == (1, 93.0, "")
    assert math.isnan(gn["std"]) and math.isnan(gn["ci_low"]) and math.isnan(gn["ci_high"])
    assert gn["ref_diff"] == 3.0 and (gn["ref_diff_method"], gn["ref_diff_n"]) == ("welch", 1)
    assert math.isnan(gn["ref_diff_low"]) and math.isnan(gn["ref_diff_high"])
    assert not gn["ref_diff_excludes_0"]
    bkn = s.loc["bkn"]  # two seeds against one: a difference, still no interval
    assert bkn["ref_diff"] == 5.5 and bkn["ref_diff_n"] == 1
    assert math.isnan(bkn["ref_diff_low"]) and not bkn["ref_diff_excludes_0"]
    assert bkn["ci_method"] == "logit-t" and bkn["ci_low"] < 95.0
    # the same single seed on both sides is not a pair
    assert diff_interval(pd.Series([93.0], index=[0]), pd.Series([90.0], index=[0]))[3:] == (
        "welch", 1)


def test_markdown_of_several_datasets_names_them():
    from bknbench.report.summary import format_summary

    runs = pd.DataFrame([run_row("bn", 2, 0, 90.0), run_row("bn", 2, 0, 80.0, dataset="digits")])
    table = format_summary(summarize(runs), "markdown").splitlines()
    assert table[0] == "| dataset | model | spec | batch | n | acc % [95% CI] | Δ vs ref [95% CI] |"
    assert table[1] == "|---|---|---|---:|---:|---|---|"
    assert table[2].startswith("| mnist1d | cnn | bn | 2 | 1 |")
    assert table[3].startswith("| digits | cnn | bn | 2 | 1 |")
    single = format_summary(summarize(runs[:1]), "markdown").splitlines()
    assert single[0] == "| spec | batch | n | acc % [95% CI] | Δ vs ref [95% CI] |"
