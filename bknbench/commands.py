"""The work behind each CLI command, once its options are parsed: one library call and
the rendering of its result. Returns exit codes; raises ConfigError for bad input."""
from __future__ import annotations

from pathlib import Path

from .config import SweepConfig
from .errors import ConfigError


def make_executor(workers: int | None, device: str, executor: str = "local",
                  address: str | None = None, cpus_per_run: int = 1,
                  gpus_per_run: float = 0.0, retries: int = 0, threads: int | None = None):
    from .sweep.local import ProcessExecutor, default_workers
    from .sweep.plan import SerialExecutor

    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor must be local or ray, got {executor!r}")
    if executor == "ray":
        if workers is not None:
            raise ConfigError("--workers is for --executor local; on Ray, runs in parallel "
                              "follow the cluster's size and --cpus-per-run/--gpus-per-run")
        if device.startswith("cuda") != (gpus_per_run > 0):
            raise ConfigError(f"--device {device} with --gpus-per-run {gpus_per_run:g}: "
                              "runs on cuda need --gpus-per-run > 0, and only they")
        if threads is not None and threads > cpus_per_run:
            raise ConfigError(f"--threads {threads} is more than the --cpus-per-run "
                              f"{cpus_per_run} a Ray task reserves")
        from .sweep.ray import RayExecutor

        return RayExecutor(address, cpus_per_run, gpus_per_run, retries)
    if address is not None:
        raise ConfigError("--address is for --executor ray")
    n = default_workers(device) if workers is None else workers
    if n < 1:
        raise ConfigError(f"--workers must be at least 1, got {n}")
    return SerialExecutor() if n == 1 else ProcessExecutor(n, device=device)


def run_study(study: list[tuple[SweepConfig, Path]], workers, fail_fast, retry_failed,
              strict, quiet, executor_opts: dict | None = None, log: str | None = None) -> int:
    """Each sweep of a study (--workloads: one per workload) in turn; stops at the first
    that does not end with exit status 0."""
    for sweep, out in study:
        code = run_command(sweep, out, workers, fail_fast, retry_failed, strict, quiet,
                           executor_opts, log)
        if code:
            return code
    return 0


def run_command(sweep: SweepConfig, out: Path, workers, fail_fast, retry_failed, strict,
                quiet, executor_opts: dict | None = None, log: str | None = None) -> int:
    from .kernels import native
    from .render import Progress, stderr
    from .sweep.plan import run_sweep
    from .sweep.run import wants_kernels

    logs = tuple(n.strip() for n in (log or "").split(",") if n.strip())
    if logs:
        from .sweep.logs import check_logs

        check_logs(list(logs))
    executor = make_executor(workers, sweep.base.device, **(executor_opts or {}),
                             threads=sweep.base.threads)
    local = (executor_opts or {}).get("executor", "local") == "local"
    if not quiet and local and wants_kernels(sweep.base) and native.module() is None:
        stderr.print("note: bknbench's C++ CPU kernels are not built (python -m "
                     "bknbench.kernels.native); BKN and bn-accum run on PyTorch ops: same results, "
                     "slower", highlight=False, soft_wrap=True)
    with Progress(quiet) as events:
        report = run_sweep(sweep, out, executor, events, fail_fast=fail_fast,
                           retry_failed=retry_failed, log=logs)

    def say(text: str) -> None:  # one line each, unwrapped: a resume command must paste whole
        stderr.print(text, highlight=False, soft_wrap=True)

    if report.failed and not quiet:
        say(f"{len(report.failed)} run(s) did not finish ok:")
        for row in report.failed:
            say(f"  {row['spec']} b={row['norm_batch']} seed={row['seed']}: "
                f"{row['status']}: {row['reason']}")
    if report.interrupted:
        say(f"interrupted: {len(report.finished) + report.skipped} finished run(s) kept in "
            f"{out}; resume with: bknbench run --resume {out}")
        return 130
    if report.stopped_early:
        say(f"stopped at the first failure (--fail-fast); resume with: "
            f"bknbench run --resume {out}")
    if not quiet:
        say(f"results in {out}/runs.csv and {out}/metrics.csv")
    _print_table(out, None, None, None)
    if report.stopped_early or (strict and report.failed):
        return 1
    return 0


def _load(results: Path, norms, batch_sizes):
    from .norms import split_specs
    from .request import int_list
    from .report.results import load_results, select

    res = load_results(results)
    if res.split:
        from .render import stderr

        stderr.print(f"note: {results} holds runs of one spec and micro-batch that differ in "
                     f"{', '.join(res.split)}; they are kept apart, each spec naming its "
                     "values", highlight=False, soft_wrap=True)
    _say_notes(res.notes)
    if norms or batch_sizes:
        res = select(res, specs=split_specs(norms) if norms else None,
                     batch_sizes=int_list(batch_sizes, "--batch-sizes") if batch_sizes else None)
    return res


def _say_notes(notes) -> None:
    from .render import stderr

    for note in notes:
        stderr.print(f"note: {note}", highlight=False, soft_wrap=True)


def _summary(runs, results: Path, reference, metric: str):
    """The summary of `metric`; says on stderr which specs or runs it leaves out (a metric
    that does not apply to them), and fails only when it applies to no run."""
    from .render import stderr
    from .report.summary import runs_with, summarize

    kept, specs, missing = runs_with(runs, metric)
    if (runs["status"] == "ok").any() and not (kept["status"] == "ok").any():
        raise ConfigError(f"{metric} is empty in every successful run of {results}: it needs "
                          "runs made with --diagnose of a batch-dependent normalizer (bn, bkn, ...)")
    if specs:
        stderr.print(f"note: {metric} is not applicable to {', '.join(specs)} (no batch-dependent "
                     "layer, or run without --diagnose): left out", highlight=False, soft_wrap=True)
    if missing:
        stderr.print(f"note: {missing} successful run(s) without {metric} (run without "
                     "--diagnose) left out", highlight=False, soft_wrap=True)
    return summarize(kept, reference, metric)


def _print_table(results: Path, reference, norms, batch_sizes,
                 metric: str = "final_test_acc") -> None:
    from .render import stdout, summary_table

    runs = _load(results, norms, batch_sizes).runs
    if (runs["status"] == "ok").any():
        title = f"{results}" if metric == "final_test_acc" else f"{results}: {metric}"
        stdout.print(summary_table(_summary(runs, results, reference, metric), title))


def compare_command(results: Path, fmt: str, reference, norms, batch_sizes,
                    metric: str = "final_test_acc") -> None:
    from .report.summary import SUMMARY_FORMATS, check_metric, format_summary

    check_metric(metric)
    if fmt == "table":
        _print_table(results, reference, norms, batch_sizes, metric)
        return
    if fmt not in SUMMARY_FORMATS:
        raise ConfigError(f"--format must be table, {', '.join(SUMMARY_FORMATS)}; got {fmt!r}")
    runs = _load(results, norms, batch_sizes).runs
    print(format_summary(_summary(runs, results, reference, metric), fmt), end="")


def aggregate_command(paths: list[Path], fmt: str, norms, batch_sizes) -> None:
    """compare --aggregate: the mean ranks over the sweeps found in paths."""
    import pandas as pd

    from .render import rank_table, stdout
    from .report.aggregate import format_ranks, mean_ranks
    from .report.html import find_sweeps
    from .report.summary import SUMMARY_FORMATS

    if fmt not in ("table",) + SUMMARY_FORMATS:
        raise ConfigError(f"--format must be table, {', '.join(SUMMARY_FORMATS)}; got {fmt!r}")
    runs = pd.concat([_load(p, norms, batch_sizes).runs for p in find_sweeps(paths)],
                     ignore_index=True)
    ranks = mean_ranks(runs)
    if fmt == "table":
        stdout.print(rank_table(ranks, len(set(zip(runs["dataset"], runs["model"])))))
    else:
        print(format_ranks(ranks, fmt), end="")


def plot_command(results: Path, out, fmt: str, norms, batch_sizes) -> None:
    from .report.plots import plot_results
    from .render import stderr

    res = _load(results, norms, batch_sizes)
    formats = tuple(f.strip() for f in fmt.split(",") if f.strip())
    paths = plot_results(res, out if out is not None else Path(results) / "plots", formats)
    for p in paths:
        stderr.print(f"wrote {p}", highlight=False, soft_wrap=True)


def norms_command(plugins: tuple[str, ...]) -> None:
    from .norms import REGISTRY
    from .plugins import load_all

    loaded = load_all(plugins)
    for name in sorted(REGISTRY):
        entry = REGISTRY[name]
        print(f"{name:10s} {entry.help}")
        for key, opt in entry.options.items():
            kind = "|".join(opt.kind) if isinstance(opt.kind, tuple) else opt.kind.__name__
            print(f"    {key}={opt.default!s:<{20 - len(key)}} {kind:26s} {opt.help}")
    for p in loaded:
        print(f"plugin {p.source} (sha256 {p.sha256[:12]}): {', '.join(p.provides) or 'nothing'}")


def check_command(spec_text: str, plugins: tuple[str, ...], backend: str) -> int:
    """The contract table of one spec; 1 when a check fails."""
    from .norms import parse_spec
    from .norms.contract import check_spec
    from .plugins import load_all

    if backend not in ("inductor", "aot_eager", "eager", "none"):
        raise ConfigError(f"--compile-backend must be inductor, aot_eager, eager or none; "
                          f"got {backend!r}")
    load_all(plugins)
    spec = parse_spec(spec_text)
    checks = check_spec(spec, None if backend == "none" else backend)
    width = max(len(c.name) for c in checks)
    print(f"bknbench check {spec.text}")
    for c in checks:
        print(f"  {'pass' if c.passed else 'FAIL'}  {c.name:{width}s}  {c.detail}")
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def report_command(results: list[Path], out) -> None:
    from .render import stderr
    from .report.html import write_report

    path = write_report(results, out)
    stderr.print(f"wrote {path}", highlight=False, soft_wrap=True)
