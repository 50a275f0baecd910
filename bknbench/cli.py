"""The command line: parse, call one library function, render. Data on stdout; progress
and messages on stderr. Heavy imports (torch, pandas, matplotlib) happen inside commands
so `bknbench --help` stays fast."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import DEFAULT_BATCH_SIZES
from .errors import ConfigError
from .options import (Config, Debug, Only, OnlySizes, Plugins, Quiet, default, joined,
                      print_version)
from .presets import PRESETS
from .request import DEFAULT_NORMS, DEFAULT_SEEDS

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Benchmark normalization layers (BN, GN, Batch Kalman Normalization, ...) "
                       "across micro-batch sizes.")

@app.callback()
def main_options(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=print_version, is_eager=True, help="Print the version and exit.")] = None):
    """Benchmark normalization layers (BN, GN, Batch Kalman Normalization, ...) across
    micro-batch sizes."""


@contextlib.contextmanager
def errors(debug: bool):
    """Bad input: one line on stderr, exit 2. Ctrl-C: exit 130. Anything else: one line,
    exit 1 (--debug: the traceback)."""
    try:
        yield
    except ConfigError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    except typer.Exit:
        raise
    except KeyboardInterrupt:  # outside a sweep, which reports its own interruption
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130)
    except Exception as e:
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        raise typer.Exit(1)


def _flags(**given) -> dict:
    return {k: v for k, v in given.items() if v is not None}


@app.command()
def run(
    norms: Annotated[Optional[list[str]], typer.Option(metavar="SPECS", help="Comma-separated "
        "normalizer specs, e.g. "
        "bn,bkn:p=0.5,transition=sampled,gn:groups=4 (see `bknbench norms`). "
        f"[default: {DEFAULT_NORMS}]")] = None,
    batch_sizes: Annotated[Optional[list[str]], typer.Option(metavar="SIZES", help="Micro-batch "
        "sizes: samples behind "
        f"each statistic. [default: {','.join(map(str, DEFAULT_BATCH_SIZES))}]")] = None,
    seeds: Annotated[Optional[list[str]], typer.Option(metavar="SEEDS", help="Comma-separated "
        "seeds (a list option may be repeated). [default: "
        f"{','.join(map(str, DEFAULT_SEEDS))}]")] = None,
    dataset: Annotated[Optional[str], typer.Option(metavar="NAME",
        help="mnist1d, digits, digits32, synthetic, cifar10, cifar100, npz:PATH (your own), "
        f"or a plugin's. {default('dataset')}")] = None,
    model: Annotated[Optional[str], typer.Option(metavar="NAME",
        help="cnn, mlp, resnet20/32/56/110, or a plugin's; options as name:key=value "
        f"(resnet20:padding=tf: the authors' stride-2 padding). {default('model')}")] = None,
    epochs: Annotated[Optional[int], typer.Option(metavar="N", help=default("epochs"))] = None,
    lr: Annotated[Optional[float], typer.Option(metavar="LR",
        help="Peak learning rate per 128 samples of SGD "
        f"batch (linear scaling). {default('base_lr')}")] = None,
    momentum: Annotated[Optional[float], typer.Option(metavar="X",
        help=default("momentum"))] = None,
    weight_decay: Annotated[Optional[float], typer.Option(metavar="X",
        help=default("weight_decay"))] = None,
    schedule: Annotated[Optional[str], typer.Option(metavar="NAME",
        help=f"cosine or step. {default('schedule')}")] = None,
    milestones: Annotated[Optional[list[str]], typer.Option(metavar="EPOCHS",
        help="Epochs at which `step` divides the "
        f"lr by 10, comma-separated. {default('milestones')}")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(metavar="EPOCHS",
        help=default("warmup_epochs"))] = None,
    evals_per_epoch: Annotated[Optional[int], typer.Option(metavar="K",
        help="Held-out evaluations per "
        "epoch, evenly spaced in optimizer steps (convergence curves; the training is the "
        "same). [default: ceil(20 / epochs), at least 20 per run]")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(metavar="X", help="Share of the training split "
        "held out for validation (stratified, a fixed seed of its own; 0: none, e.g. to "
        "train on all of CIFAR's 50k), in [0, 0.5]; the curves and tuning use it, the final "
        f"comparison is on the test split. {default('val_fraction')}")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment",
        help=f"Random crop + flip (image datasets). {default('augment')}")] = None,
    tune: Annotated[Optional[list[str]], typer.Option(metavar="KEY=VALUES",
        help="Tune KEY (lr, weight_decay, momentum, warmup_epochs) over a grid, e.g. "
        "lr=0.05,0.2,0.8 or lr=0.0125:0.8:log4; repeatable (the cartesian product). Every "
        "spec x micro-batch trains every point on --tune-seeds, the best mean validation "
        "accuracy is chosen (ties: the smaller lr), then every seed runs there (tuning.csv, "
        "trials/). lr is per 128 samples, as --lr.")] = None,
    tune_seeds: Annotated[Optional[str], typer.Option(metavar="SEEDS",
        help="Seeds of the tuning trials. [default: the first of --seeds]")] = None,
    accumulate_to: Annotated[Optional[int], typer.Option(metavar="N",
        help="SGD batch: micro-batches "
        "accumulate to this many samples per step. Unset: 128 for accumulating specs "
        "(bn-accum), one step per micro-batch for the others. Presets: 128.")] = None,
    workloads: Annotated[Optional[str], typer.Option(metavar="NAMES", help="Comma-separated workloads "
        "(`bknbench workloads`): the sweep runs on each, in OUT/<workload>, lr tuned over "
        "the workload's grid unless --tune or --lr is given.")] = None,
    preset: Annotated[Optional[str], typer.Option(metavar="NAME", help="A published setup: "
        f"{', '.join(PRESETS)}; every value can be overridden by its flag.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(metavar="DIR",
        help="Local copy of a dataset (CIFAR).")] = None,
    verify: Annotated[bool, typer.Option(help="Check the CIFAR files' MD5 sums first.")] = False,
    device: Annotated[Optional[str], typer.Option(metavar="DEVICE",
        help="auto, cpu, cuda, cuda:N or mps. "
        "[default: auto]")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp", help="bf16 autocast.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile", help="torch.compile the "
        "model.")] = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic", help="Bitwise "
        "repeatable runs, the same on every executor (1 torch thread per run unless "
        "--threads).")] = None,
    cudnn_benchmark: Annotated[Optional[bool], typer.Option("--cudnn-benchmark",
        help="cuDNN times its convolution algorithms and keeps the fastest (CUDA; not with "
        "--deterministic).")] = None,
    threads: Annotated[Optional[int], typer.Option(metavar="N",
        help="Torch threads per run. [default: 1 "
        "with --deterministic, else the executor's share: all cores when serial, cores / "
        "workers, --cpus-per-run on Ray]")] = None,
    diagnose: Annotated[Optional[bool], typer.Option("--diagnose/--no-diagnose",
        help="After every epoch, per-layer statistics of the batch-dependent norms against "
        "their population statistics (stats.csv), and final_val_acc_population; training is "
        f"unchanged. {default('diagnose')}")] = None,
    workers: Annotated[Optional[int], typer.Option(metavar="N",
        help="Parallel runs. [default: one per "
        "CPU core; with --device cuda one per GPU]")] = None,
    executor: Annotated[str, typer.Option(metavar="NAME",
        help="local (this machine) or ray (each run a Ray "
        "task; needs pip install '.[ray]' from a checkout).")] = "local",
    address: Annotated[Optional[str], typer.Option(metavar="HOST:PORT",
        help="Ray cluster to use, e.g. HEAD:6379. "
        "[default: $RAY_ADDRESS, else a local Ray]")] = None,
    cpus_per_run: Annotated[int, typer.Option(metavar="N",
        help="Ray: CPUs (and torch threads) per run.")] = 1,
    gpus_per_run: Annotated[float, typer.Option(metavar="X",
        help="Ray: GPUs per run; a fraction lets runs "
        "share a GPU.")] = 0.0,
    retries: Annotated[int, typer.Option(metavar="N",
        help="Ray: times a run is retried when its worker "
        "dies; then it is recorded as failed.")] = 0,
    out: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Output folder, one sweep "
        "per folder: rerunning on it skips finished runs, and may grow its grid (norms, batch "
        "sizes, seeds). [default: results/NAME, else results/<timestamp>]")] = None,
    name: Annotated[Optional[str], typer.Option(metavar="NAME", help="Name the output folder "
        "results/NAME.")] = None,
    resume: Annotated[Optional[Path], typer.Option(metavar="DIR",
        help="Continue the sweep in this folder.")] = None,
    retry_failed: Annotated[bool, typer.Option(help="On resume, rerun failed runs too.")] = False,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first failed run.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit with status 1 when any run failed.")] = False,
    plugin: Plugins = None,
    log: Annotated[Optional[list[str]], typer.Option(metavar="SINK", help="Also log every run "
        "to: mlflow (pip install '.[mlflow]'; tracking URI $MLFLOW_TRACKING_URI, else "
        "OUT/mlruns).")] = None,
    config: Config = None,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Train the sweep norms x micro-batch sizes x seeds; write runs.csv and metrics.csv
    (and stats.csv with --diagnose); print the comparison table."""
    with errors(debug):
        from .request import RunRequest, build_study, int_list

        run_flags = _flags(dataset=dataset, model=model, epochs=epochs, base_lr=lr,
                           momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                           warmup_epochs=warmup_epochs, augment=augment,
                           evals_per_epoch=evals_per_epoch, diagnose=diagnose,
                           val_fraction=val_fraction,
                           data_dir=str(data_dir) if data_dir else None,
                           milestones=int_list(joined(milestones), "--milestones")
                           if milestones else None,
                           device=device, amp=amp, compile=compile,
                           deterministic=deterministic, threads=threads,
                           cudnn_benchmark=cudnn_benchmark)
        req = RunRequest(norms=joined(norms), batch_sizes=joined(batch_sizes),
                         seeds=joined(seeds), preset=preset, accumulate_to=accumulate_to,
                         out=out, resume=resume, run=run_flags, verify=verify, name=name,
                         remote_gpus=executor == "ray" and gpus_per_run > 0,
                         plugins=tuple(plugin or ()), tune=tuple(tune or ()),
                         tune_seeds=tune_seeds, workloads=workloads)
        study = build_study(req)
        from .commands import run_study

        raise typer.Exit(run_study(
            study, workers, fail_fast, retry_failed, strict, quiet,
            dict(executor=executor, address=address, cpus_per_run=cpus_per_run,
                 gpus_per_run=gpus_per_run, retries=retries), log=joined(log)))


@app.command()
def compare(
    results: Annotated[list[Path], typer.Argument(metavar="FOLDER...",
        help="A results folder written by `bknbench run`; with --aggregate several, or "
        "study folders whose subfolders hold them.")],
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT",
        help="table, csv, json or markdown.")] = "table",
    aggregate: Annotated[bool, typer.Option("--aggregate", help="Rank the specs within each "
        "(workload, micro-batch) by mean test accuracy (1 = best, ties share the mean rank); "
        "print per spec and micro-batch the mean rank over workloads and their number.")] = False,
    reference: Annotated[Optional[str], typer.Option(metavar="SPEC@BATCH",
        help="SPEC@BATCH to compare against. "
        "[default: bn at its largest batch]")] = None,
    norms: Only = None,
    batch_sizes: OnlySizes = None,
    metric: Annotated[str, typer.Option(metavar="METRIC",
        help="final_test_acc (the test split), final_val_acc (the validation split), or "
        "final_val_acc_population (validation, eval with population statistics; runs made "
        "with --diagnose).")] = "final_test_acc",
    debug: Debug = False,
):
    """Final test accuracy (or --metric) per spec x micro-batch: mean, 95% CI over seeds, n,
    and the difference to a reference."""
    with errors(debug):
        from .commands import aggregate_command, compare_command

        if aggregate:
            aggregate_command(results, format, joined(norms), joined(batch_sizes))
        elif len(results) > 1:
            raise ConfigError("several results folders: give --aggregate to rank the specs "
                              "over them, or compare one folder at a time")
        else:
            compare_command(results[0], format, reference, joined(norms), joined(batch_sizes),
                            metric)


@app.command()
def plot(
    results: Annotated[Path, typer.Argument(metavar="FOLDER", help="A results folder written by "
                                            "`bknbench run`.")],
    out: Annotated[Optional[Path], typer.Option(metavar="DIR",
        help="Figure folder. [default: RESULTS/plots]")] = None,
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMATS",
        help="Comma-separated: png, svg, pdf.")] = "png",
    norms: Only = None,
    batch_sizes: OnlySizes = None,
    debug: Debug = False,
):
    """Error vs micro-batch size, convergence (validation error vs training samples seen),
    and, with stats.csv (--diagnose), the statistics errors per layer."""
    with errors(debug):
        from .commands import plot_command

        plot_command(results, out, format, joined(norms), joined(batch_sizes))


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(metavar="FOLDER", help="Results folders "
        "written by `bknbench run`, or study folders whose subfolders hold them; each is a section.")],
    out: Annotated[Optional[Path], typer.Option(metavar="FILE",
        help="The HTML file. [default: RESULTS/"
        "report.html; several folders: report.html in the folder holding them]")] = None,
    debug: Debug = False,
):
    """One self-contained HTML file (figures embedded, no network request): the question,
    setup, comparison table, figures, failed runs and the commands that reproduce it."""
    with errors(debug):
        from .commands import report_command

        report_command(results, out)


@app.command("workloads")
def list_workloads():
    """The workloads of the fair protocol (--workloads): dataset, model, budget, lr grid
    and where each comes from."""
    from .presets import WORKLOADS

    for w in WORKLOADS.values():
        grid = ",".join(f"{v:g}" for v in w.lr_grid)
        print(f"{w.name:18s} {w.help}\n    lr grid {grid}; {w.provenance}")


@app.command("norms")
def list_norms(plugin: Plugins = None, debug: Debug = False):
    """The normalizers of the registry, with their options (and what plugins add)."""
    with errors(debug):
        from .commands import norms_command

        norms_command(tuple(plugin or ()))


@app.command()
def check(
    spec: Annotated[str, typer.Argument(help="A normalizer spec, e.g. bn or gn:groups=4.")],
    plugin: Plugins = None,
    compile_backend: Annotated[str, typer.Option(help="torch.compile backend of the compile "
        "check (inductor, aot_eager, eager), or none to leave it out.")] = "inductor",
    debug: Debug = False,
):
    """The normalizer contract of SPEC's layer (shapes, state, pickling, micro-batch
    isolation, ...; docs/extending.md) as a table; exit 1 when a check fails."""
    with errors(debug):
        from .commands import check_command

        raise typer.Exit(check_command(spec, tuple(plugin or ()), compile_backend))


def main() -> None:
    app(prog_name="bknbench")
