"""results.py: loading with clear errors, selection, statistics against hand computation."""
import csv
import io
import json
import math

import pandas as pd
import pytest
from rich.console import Console

from bknbench.errors import ConfigError
from bknbench.report.summary import failed_runs, format_summary, summarize
from bknbench.report.results import load_results, select
from bknbench.render import summary_table
from bknbench.report.schema import METRIC_COLUMNS, RUN_COLUMNS

T975_DOF2 = 4.302652729911275  # t(0.975, 2), from tables
T975_DOF4 = 2.7764451051977987  # t(0.975, 4)


def run_row(spec, norm_batch, seed, acc, status="ok", dataset="mnist1d", model="cnn"):
    """A runs.csv row as the sweep writes it; JSON fields exercise CSV quoting."""
    ok = status == "ok"
    cfg = {"spec": spec, "norm_batch": norm_batch, "seed": seed, "milestones": []}
    return {
        "run_id": f"{dataset}-{model}-{spec}-{norm_batch}-{seed}", "spec": spec,
        "norm": spec.split(":")[0], "dataset": dataset, "model": model,
        "norm_batch": norm_batch, "sgd_batch": norm_batch, "seed": seed, "epochs": 3,
        "lr": 0.2 * norm_batch / 128, "status": status,
        "reason": "" if ok else f"{status}: CUDA out of memory, tried 2.0 GiB",
        "final_val_acc": acc if ok else "", "final_test_acc": acc if ok else "",
        "best_val_acc": acc + 0.5 if ok else "", "val_samples": 500 if ok else "",
        "test_samples": 500 if ok else "",
        "final_train_loss": 0.31 if ok else "", "train_time_s": 12.5,
        "samples_per_s": 3900.0, "peak_mem_mb": "", "device": "cpu", "amp": False,
        "compile": False, "deterministic": False, "torch_version": "2.4.0",
        "versions": json.dumps({"python": "3.11.9", "numpy": "1.26.4"}),
        "git_commit": "abc1234", "config": json.dumps(cfg),
    }


def metric_rows(run_id, final_acc, epochs=3):
    return [{"run_id": run_id, "epoch": e, "step": 125 * e, "samples_seen": 4000 * e,
             "train_loss": 1.0 / e, "train_acc": final_acc - 5 + e, "val_loss": 1.2 / e,
             "val_acc": final_acc - (epochs - e) * 3.0, "lr": 0.1 / e, "wall_s": 4.0 * e}
            for e in range(1, epochs + 1)]


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_results(folder, runs, with_metrics=True):
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "runs.csv", RUN_COLUMNS, runs)
    if with_metrics:
        metrics = [m for r in runs if r["status"] == "ok"
                   for m in metric_rows(r["run_id"], r["final_val_acc"])]
        write_csv(folder / "metrics.csv", METRIC_COLUMNS, metrics)
    return folder


@pytest.fixture
def sweep(tmp_path):
    """gn written first (so it is listed first), batches out of order, one failure, one n=1."""
    runs = [run_row("gn", 8, s, a) for s, a in enumerate([86.0, 88.0, 90.0])]
    runs += [run_row("gn", 2, 0, 80.0), run_row("gn", 2, 1, 82.0), run_row("gn", 2, 2, 0, "oom")]
    runs += [run_row("bn", 128, s, a) for s, a in enumerate([90.0, 92.0, 94.0])]
    runs += [run_row("bn", 2, 0, 0, "diverged"), run_row("bn", 2, 1, 0, "diverged")]
    runs += [run_row("bkn:p=0.5", 2, 0, 91.0)]
    return write_results(tmp_path / "res", runs)


def test_load_coerces_types_and_reads_metrics(sweep):
    res = load_results(sweep)
    assert len(res.runs) == 12 and res.path == sweep
    for col in ("norm_batch", "sgd_batch", "seed", "epochs"):
        assert res.runs[col].dtype == "int64"
    assert res.runs["final_val_acc"].dtype == "float64"
    assert math.isnan(res.runs.loc[res.runs["status"] == "oom", "final_val_acc"].iloc[0])
    assert json.loads(res.runs["config"].iloc[0])["spec"] == "gn"  # quoted JSON survives
    assert res.metrics["epoch"].dtype == "int64" and len(res.metrics) == 9 * 3


def _logit_t(accs, n_test, t975):
    """The logit-t interval of summary.py, by hand (with math, not numpy)."""
    y = [math.log(p / (1 - p)) for p in ((a / 100 * n_test + 0.5) / (n_test + 1) for a in accs)]
    m = sum(y) / len(y)
    half = t975 * math.sqrt(sum((v - m) ** 2 for v in y) / (len(y) - 1)) / math.sqrt(len(y))
    back = lambda v: 100 * ((n_test + 1) / (1 + math.exp(-v)) - 0.5) / n_test  # noqa: E731
    return back(m - half), back(m + half)


def test_mean_and_logit_t_interval_match_hand_computation(sweep):
    s = summarize(load_results(sweep).runs).set_index(["spec", "norm_batch"])
    bn = s.loc[("bn", 128)]
    low, high = _logit_t([90.0, 92.0, 94.0], 500, T975_DOF2)
    assert (bn["n"], bn["mean"], bn["std"], bn["samples"]) == (3, 92.0, 2.0, 500)
    assert bn["ci_low"] == pytest.approx(low) and bn["ci_high"] == pytest.approx(high)
    assert bn["ci_method"] == "logit-t"
    # bounded above by 100 where Student-t on the raw scale gave 96.97: narrower toward it
    assert 92 - bn["ci_low"] > bn["ci_high"] - 92 and bn["ci_high"] < 100
    assert bn["best_mean"] == pytest.approx(92.5)


def test_difference_to_reference_paired_and_welch(sweep):
    from scipy.stats import t

    s = summarize(load_results(sweep).runs).set_index(["spec", "norm_batch"])
    assert bool(s.loc[("bn", 128), "is_ref"]) and s.loc[("bn", 128), "ref_diff"] == 0.0
    assert s.loc[("bn", 128), "ref_diff_method"] == ""  # the reference has no Δ interval
    # gn@8 ran seeds 0, 1, 2 like the reference: paired; 86-90, 88-92, 90-94 are all -4
    gn = s.loc[("gn", 8)]
    assert (gn["ref_diff"], gn["ref_diff_method"], gn["ref_diff_n"]) == (-4.0, "paired", 3)
    # no spread at all, but accuracies are counts out of 500: the rounding floor remains
    half = T975_DOF2 * math.sqrt(2 * 0.2**2 / 12) / math.sqrt(3)
    assert gn["ref_diff_low"] == pytest.approx(-4 - half) and gn["ref_diff_excludes_0"]
    assert gn["ref_diff_high"] == pytest.approx(-4 + half) and half == pytest.approx(0.2028, abs=1e-4)
    # gn@2 lost seed 2 (oom): Welch over 80, 82 and 90, 92, 94
    gn2 = s.loc[("gn", 2)]
    va, vr = 2.0 / 2, 4.0 / 3  # both above the rounding floor (0.2^2 / 12)
    dof = (va + vr) ** 2 / (va**2 / 1 + vr**2 / 2)
    half = t.ppf(0.975, dof) * math.sqrt(va + vr)
    assert (gn2["ref_diff"], gn2["ref_diff_method"], gn2["ref_diff_n"]) == (-11.0, "welch", 2)
    assert gn2["ref_diff_low"] == pytest.approx(-11 - half)
    assert gn2["ref_diff_high"] == pytest.approx(-11 + half)
    assert gn2["ref_diff_excludes_0"] == (half < 11)


def test_single_seed_has_no_interval(sweep):
    s = summarize(load_results(sweep).runs).set_index(["spec", "norm_batch"])
    one = s.loc[("bkn:p=0.5", 2)]
    assert one["n"] == 1 and one["mean"] == 91.0 and one["ref_diff"] == pytest.approx(-1.0)
    assert math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    assert math.isnan(one["ref_diff_low"]) and math.isnan(one["ref_diff_high"])
    assert one["ref_diff_method"] == "welch" and one["ci_method"] == ""
    assert "91.00 (CI n/a)" in format_summary(s.reset_index(), "markdown")


def test_failures_are_counted_and_all_failed_cells_kept(sweep):
    runs = load_results(sweep).runs
    s = summarize(runs).set_index(["spec", "norm_batch"])
    gn2 = s.loc[("gn", 2)]
    assert (gn2["n"], gn2["failed"], gn2["failed_statuses"], gn2["mean"]) == (2, 1, "1 oom", 81.0)
    bn2 = s.loc[("bn", 2)]
    assert bn2["n"] == 0 and bn2["failed"] == 2 and bn2["failed_statuses"] == "2 diverged"
    assert math.isnan(bn2["mean"]) and math.isnan(bn2["ref_diff"])
    failed = failed_runs(runs)
    assert list(failed.columns) == ["spec", "norm_batch", "seed", "status", "reason"]
    assert sorted(failed["status"]) == ["diverged", "diverged", "oom"]
    assert failed["reason"].str.contains("out of memory").all()


def test_order_is_first_appearance_then_batch_ascending(sweep):
    s = summarize(load_results(sweep).runs)
    assert list(zip(s["spec"], s["norm_batch"])) == [
        ("gn", 2), ("gn", 8), ("bn", 2), ("bn", 128), ("bkn:p=0.5", 2)]
    assert "dataset" not in s.columns  # one dataset/model: no redundant columns


def test_explicit_and_fallback_references(sweep, tmp_path):
    runs = load_results(sweep).runs
    s = summarize(runs, reference="gn@8").set_index(["spec", "norm_batch"])
    assert s.loc[("bn", 128), "ref_diff"] == pytest.approx(4.0)
    assert bool(s.loc[("gn", 8), "is_ref"])
    assert summarize(runs, reference="gn")["is_ref"].tolist()[1]  # SPEC alone: largest batch
    no_bn = summarize(runs[runs["spec"] != "bn"])  # sorted first: bkn:p=0.5 at batch 2
    assert no_bn.loc[no_bn["is_ref"], "spec"].tolist() == ["bkn:p=0.5"]
    for bad, msg in [("gn@64", "not in the results"), ("ln@8", "not in the results"),
                     ("bn@2", "no successful runs"), ("bn@x", "SPEC@BATCH")]:
        with pytest.raises(ConfigError, match=msg):
            summarize(runs, reference=bad)


def test_several_datasets_get_columns_and_own_reference(tmp_path):
    runs = [run_row("bn", b, 0, a, dataset=d) for d, base in [("mnist1d", 90), ("cifar10", 70)]
            for b, a in [(4, base - 5), (32, base)]]
    s = summarize(load_results(write_results(tmp_path / "r", runs)).runs)
    assert list(s.columns[:2]) == ["dataset", "model"]
    assert s["ref_diff"].tolist() == [-5.0, 0.0, -5.0, 0.0]
    assert "| dataset | model | spec |" in format_summary(s, "markdown")


def test_formats(sweep):
    s = summarize(load_results(sweep).runs)
    records = json.loads(format_summary(s, "json"))
    assert len(records) == 5 and records[0]["spec"] == "gn"
    assert records[4]["ci_low"] is None  # NaN -> null
    ref = records[3]
    low, high = _logit_t([90.0, 92.0, 94.0], 500, T975_DOF2)
    assert (ref["spec"], ref["n"], ref["ci_method"]) == ("bn", 3, "logit-t")
    assert ref["ci_low"] == pytest.approx(low) and ref["ci_high"] == pytest.approx(high)
    assert records[1]["ref_diff_method"] == "paired" and records[1]["ref_diff_n"] == 3
    assert records[1]["ref_diff_low"] == pytest.approx(-4.2028, abs=1e-4)
    assert records[1]["ref_diff_high"] == pytest.approx(-3.7972, abs=1e-4)
    assert pd.read_csv(io.StringIO(format_summary(s, "csv")))["n"].tolist() == [2, 3, 0, 3, 1]
    md = format_summary(s, "markdown").splitlines()
    assert md[0] == "| spec | batch | n | acc % [95% CI] | Δ vs ref [95% CI] |"
    assert len(md) == 2 + 5 + 2 and md[-2] == "" and "logit scale" in md[-1]
    assert f"| bn | 128 | 3 | 92.00 [{low:.2f}, {high:.2f}] | ref |" in md
    assert "| gn | 8 | 3 | 88.00 [" in md[3] and "| -4.00 [-4.20, -3.80] P * |" in md[3]
    assert "| gn | 2 | 2 (+1 oom) |" in md[2] and md[2].endswith(" W * |")
    with pytest.raises(ConfigError, match="unknown format 'html'"):
        format_summary(s, "html")


def test_rich_table_renders(sweep):
    table = summary_table(summarize(load_results(sweep).runs), "mnist1d / cnn")
    assert table.row_count == 5
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    text = " ".join(console.file.getvalue().split())  # the caption wraps where it likes
    low, high = _logit_t([90.0, 92.0, 94.0], 500, T975_DOF2)
    for piece in ("92.00", f"[{low:.2f}, {high:.2f}]", "n/a", "ref", "all failed", "✗ 1 oom",
                  "-4.00 [-4.20, -3.80] P *", "logit scale", "on the test split"):
        assert piece in " ".join(text.split()), piece  # the caption wraps anywhere


def test_select_filters_runs_and_metrics(sweep):
    res = select(load_results(sweep), specs=["gn"], batch_sizes=[8])
    assert len(res.runs) == 3 and set(res.metrics["run_id"]) == set(res.runs["run_id"])
    assert len(select(load_results(sweep), specs=[], datasets=None).runs) == 12  # empty: all
    with pytest.raises(ConfigError, match="selected no runs; specs present: gn, bn, bkn:p=0.5"):
        select(load_results(sweep), specs=["ln"])


def test_missing_metrics_is_allowed(tmp_path):
    folder = write_results(tmp_path / "r", [run_row("bn", 4, 0, 90.0)], with_metrics=False)
    res = load_results(folder)
    assert res.metrics.empty and list(res.metrics.columns) == list(METRIC_COLUMNS)


def _rewrite(folder, name, edit):
    path = folder / name
    path.write_text(edit(path.read_text()))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda t: "", "runs.csv is empty"),
    (lambda t: t.splitlines(keepends=True)[0], "header but no runs"),
    (lambda t: t[: t.rstrip("\n").rfind("\n") + 60], "truncated or malformed row"),  # cut row
    (lambda t: t[:-25], "malformed CSV"),  # cut inside the quoted config JSON
    (lambda t: t.replace("final_val_acc,", "", 1), "lacks column"),
    (lambda t: t.replace(",90.0,", ",9O.0,", 1), "final_val_acc='9O.0' is not a number"),
    (lambda t: t.replace("mnist1d,cnn,4,", "mnist1d,cnn,four,", 1), "norm_batch='four'"),
    (lambda t: t.replace(",ok,", ",okay,", 1), "unknown status 'okay'"),
])
def test_bad_runs_csv_is_a_config_error(tmp_path, edit, message):
    runs = [run_row("bn", 4, s, 90.0 + s) for s in range(3)]
    folder = _rewrite(write_results(tmp_path / "r", runs), "runs.csv", edit)
    with pytest.raises(ConfigError, match=message) as info:
        load_results(folder)
    assert "\n" not in str(info.value)  # one line for the CLI


def test_bad_folders_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        load_results(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"expected runs.csv written by `bknbench run`"):
        load_results(tmp_path / "empty")


def test_bad_metrics_csv_is_a_config_error(tmp_path):
    folder = write_results(tmp_path / "r", [run_row("bn", 4, 0, 90.0)])
    _rewrite(folder, "metrics.csv", lambda t: t.replace(",1,125,4000,", ",one,125,4000,", 1))
    with pytest.raises(ConfigError, match=r"metrics.csv:2: epoch='one' is not an integer"):
        load_results(folder)


def test_ok_run_without_accuracy_is_rejected(tmp_path):
    row = run_row("bn", 4, 0, 90.0)
    row["final_test_acc"] = ""
    with pytest.raises(ConfigError, match="is ok but has no final_test_acc"):
        load_results(write_results(tmp_path / "r", [row], with_metrics=False))


def test_metrics_without_step_still_load(tmp_path):
    """A folder resumed across the upgrade holds rows written before `step` existed."""
    folder = write_results(tmp_path / "r", [run_row("bn", 4, 0, 90.0)])
    _rewrite(folder, "metrics.csv", lambda t: t.replace(",1,125,4000,", ",1,,4000,", 1))
    m = load_results(folder).metrics
    assert math.isnan(m["step"].iloc[0]) and m["step"].iloc[1] == 250


# ---------------------------------------------------------------- the type checks, each way
@pytest.mark.parametrize("old, new, message", [
    (",90.0,", ",90.0,x,", r"runs.csv:2: \d+ fields where the header has \d+: truncated or "
                           r"malformed row$"),
    ("mnist1d,cnn,4,", "mnist1d,cnn,4.5,", r"runs.csv:2: norm_batch='4.5' is not an integer$"),
    ("mnist1d,cnn,4,", "mnist1d,cnn,inf,", r"runs.csv:2: norm_batch='inf' is not an integer$"),
    ("mnist1d,cnn,4,", "mnist1d,cnn,,", r"runs.csv:2: norm_batch='' is not an integer$"),
    (",90.0,", ",ninety,", r"runs.csv:2: final_val_acc='ninety' is not a number$"),
])
def test_each_type_check_of_the_loader(tmp_path, old, new, message):
    folder = write_results(tmp_path / "r", [run_row("bn", 4, 0, 90.0)])
    _rewrite(folder, "runs.csv", lambda t: t.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_results(folder)


@pytest.mark.parametrize("value", ["", "nan", "NaN", " 12.5 "])
def test_a_measurement_may_be_empty_or_nan_and_a_whole_number_may_be_float_text(tmp_path,
                                                                                value):
    """Measurements: empty (not measured) and nan (diverged) load as NaN; an integer column
    accepts "4.0" (whole)."""
    folder = write_results(tmp_path / "r", [run_row("bn", 4, 0, 90.0)])
    _rewrite(folder, "runs.csv", lambda t: t.replace(",12.5,", f",{value},", 1).replace(
        "mnist1d,cnn,4,", "mnist1d,cnn,4.0,", 1))
    runs = load_results(folder).runs
    assert runs["norm_batch"].tolist() == [4] and runs["norm_batch"].dtype == "int64"
    got = runs["train_time_s"].iloc[0]
    assert got == 12.5 if value.strip() == "12.5" else math.isnan(got)
