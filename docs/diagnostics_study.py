"""The README's "Statistics diagnostics" tables, regenerated: bn, bkn and
bkn:propagate=output on mnist1d (cnn, SGD batch 128) at micro-batch 2 and 128, 3 seeds,
with --diagnose.

    python docs/diagnostics_study.py [--out results/diagnostics-study] [--epochs 4]

Runs the sweep with `bknbench run` (finished runs in --out are kept, so a rerun only prints),
then prints markdown tables: the accuracies, and per layer the last epoch's diagnostics,
mean over seeds (metric names: README, stats.csv).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPECS = "bn,bkn,bkn:propagate=output"


def per_layer(table, title: str, cell, specs=None) -> None:
    """A row per (spec, micro-batch), a column per layer; cell(values) -> text, values the
    layer's metrics (mean over seeds), or None to leave it empty."""
    layers = sorted(set(table.index.get_level_values("layer")))
    print(f"\n{title}\n")
    print("| spec | b | " + " | ".join(f"layer {i}" for i in layers) + " |")
    print("|---|---:|" + "---:|" * len(layers))
    for (spec, b), part in table.groupby(level=["spec", "norm_batch"], sort=False):
        if specs is not None and spec not in specs:
            continue
        cells = []
        for i in layers:
            values = part.xs(i, level="layer").droplevel([0, 1])
            cells.append(cell(values) or "")
        print(f"| {spec} | {b} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/diagnostics-study")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "bknbench", "run", "--dataset", "mnist1d", "--model", "cnn",
           "--norms", SPECS, "--batch-sizes", "2,128", "--accumulate-to", "128",
           "--epochs", str(args.epochs), "--seeds", "0,1,2", "--diagnose", "--out", args.out,
           "--quiet"]
    print("command: bknbench " + " ".join(cmd[3:]), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    from bknbench.report.results import load_results

    res = load_results(args.out)
    runs = res.runs[res.runs["status"] == "ok"]
    print(f"commit {runs['git_commit'].iloc[0][:7]}; {len(runs)} ok runs, seeds "
          f"{', '.join(map(str, sorted(set(runs['seed']))))}; mean (min, max) over seeds\n")
    print("| spec | b | val acc % | val acc % with population statistics |")
    print("|---|---:|---:|---:|")
    for (spec, b), cell in runs.groupby(["spec", "norm_batch"], sort=False):
        a, p = cell["final_val_acc"], cell["final_val_acc_population"]
        print(f"| {spec} | {b} | {a.mean():.1f} ({a.min():.1f}, {a.max():.1f}) | "
              f"{p.mean():.1f} ({p.min():.1f}, {p.max():.1f}) |")
    s = res.stats.merge(runs[["run_id", "spec", "norm_batch"]], on="run_id")
    s = s[s["epoch"] == s.groupby("run_id")["epoch"].transform("max")]
    table = s.groupby(["spec", "norm_batch", "layer", "metric"], sort=False)["value"].mean()

    def err(kind, pair):
        return lambda v: (f"{v[f'{kind}_err_{pair}']:.3g} ({v[f'{kind}_bias_{pair}']:.2g})"
                          if f"{kind}_err_{pair}" in v else None)

    per_layer(table, "Log-variance error of the statistics training normalizes with, "
              "`logvar_err_used` (in brackets its systematic part, `logvar_bias_used`):",
              err("logvar", "used"))
    per_layer(table, "Mean error, `mean_err_used` (`mean_bias_used`):", err("mean", "used"))
    per_layer(table, "BKN's prediction: `logvar_err_predicted` (`logvar_bias_predicted`); "
              "median var_hat / s; fraction of training forwards the guard rejected:",
              lambda v: (f"{v['logvar_err_predicted']:.3g} ({v['logvar_bias_predicted']:.2g}); "
                         f"{v['var_ratio_median']:.2g}; {v['guard_rejected']:.2g}")
              if "logvar_err_predicted" in v else None, specs=("bkn", "bkn:propagate=output"))
    per_layer(table, "BKN's observation: `logvar_err_observed` (`logvar_bias_observed`):",
              err("logvar", "observed"), specs=("bkn", "bkn:propagate=output"))
    per_layer(table, "Running statistics against the population's (what evaluation uses): "
              "`logvar_err_running`; `mean_err_running`:",
              lambda v: f"{v['logvar_err_running']:.3g}; {v['mean_err_running']:.2g}")


if __name__ == "__main__":
    main()
