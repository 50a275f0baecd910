"""Terminal rendering for the CLI: progress on stderr (rich on a terminal, plain lines
otherwise, nothing with --quiet), the closing messages and the summary table."""
from __future__ import annotations

import sys

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import RunConfig
from .report.summary import delta_text, method_note
from .sweep.plan import SweepEvents

if TYPE_CHECKING:
    import pandas as pd

stderr = Console(stderr=True)
# piped or redirected, tables keep whole rows (rich would wrap them at 80 columns)
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def label(cfg: RunConfig) -> str:
    sgd = f" (sgd {cfg.sgd_batch})" if cfg.sgd_batch != cfg.norm_batch else ""
    return f"{cfg.spec} b={cfg.norm_batch}{sgd} lr={cfg.base_lr:g} seed={cfg.seed}"


def finish_text(row: dict) -> str:
    if row["status"] == "ok":
        val = "" if row["final_val_acc"] is None else f"val acc {row['final_val_acc']:.2f}%  "
        return f"{val}test acc {row['final_test_acc']:.2f}%  {row['samples_per_s']:.0f} samples/s"
    return f"{row['status']}: {row['reason']}"


def val_text(row: dict) -> str:
    return "no validation split" if row["val_acc"] is None else f"val acc {row['val_acc']:.2f}%"


class Progress:
    """A context manager giving SweepEvents that draw a sweep bar and the current run's
    epochs (rich), print one line per event (plain), or stay silent (quiet)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.rich = not quiet and sys.stderr.isatty()
        self.bar = None

    def __enter__(self) -> SweepEvents:
        if self.quiet:
            return SweepEvents()
        if self.rich:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar,
                                       TextColumn, TimeElapsedColumn)

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=stderr, transient=False)
            self.bar.start()
            self.sweep_task = None
            self.runs: dict[str, int] = {}
        return SweepEvents(on_plan=self.on_plan, on_start=self.on_start,
                           on_epoch=self.on_epoch, on_finish=self.on_finish)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def on_plan(self, total: int, todo: int) -> None:
        done = total - todo
        if self.rich:
            self.sweep_task = self.bar.add_task("sweep", total=total, completed=done)
        else:
            stderr.print(f"sweep: {total} runs, {done} already finished, {todo} to run",
                         highlight=False)

    def on_start(self, cfg: RunConfig) -> None:
        if self.rich:
            self.runs[cfg.run_id] = self.bar.add_task(f"  {label(cfg)}", total=cfg.epochs)
        else:
            stderr.print(f"start  {label(cfg)}", highlight=False)

    def on_epoch(self, cfg: RunConfig, row: dict) -> None:
        if self.rich:
            task = self.runs.get(cfg.run_id)
            if task is not None:
                self.bar.update(task, completed=row["epoch"],
                                description=f"  {label(cfg)}  {val_text(row)}")
        else:
            stderr.print(f"  epoch {row['epoch']}/{cfg.epochs} {label(cfg)}: "
                         f"train loss {row['train_loss']:.3f}, {val_text(row)}",
                         highlight=False)

    def on_finish(self, cfg: RunConfig, row: dict) -> None:
        if self.rich:
            task = self.runs.pop(cfg.run_id, None)
            if task is not None:
                self.bar.remove_task(task)
            self.bar.advance(self.sweep_task)
            stderr.print(f"  {label(cfg)}: {finish_text(row)}", highlight=False)
        else:
            stderr.print(f"done   {label(cfg)}: {finish_text(row)}", highlight=False)


def summary_table(summary: pd.DataFrame, title: str) -> Table:
    """A rich table for the terminal: mean [95% CI], Δ vs ref [95% CI] (P paired, W Welch;
    bold when its interval excludes 0), with the method in the caption."""
    multi = "dataset" in summary.columns
    table = Table(title=title, caption=method_note(summary) + "; n = successful seeds")
    for name in (["dataset", "model"] if multi else []) + ["spec"]:
        table.add_column(name)
    for name in ("batch", "n", "acc %", "95% CI", "Δ vs ref [95% CI]", "failed"):
        table.add_column(name, justify="right" if name in ("batch", "n") else "left")
    for r in summary.itertuples(index=False):
        acc = "[red]all failed[/]" if r.n == 0 else f"{r.mean:.2f}"
        ci = "" if r.n == 0 else "n/a" if r.n == 1 else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
        delta = escape(delta_text(r))
        if r.ref_diff_excludes_0:
            delta = f"[bold]{delta}[/]"
        failed = f"[red]✗ {r.failed_statuses}[/]" if r.failed else ""
        table.add_row(*([r.dataset, r.model] if multi else []), escape(r.spec),
                      str(r.norm_batch), str(r.n), acc, escape(ci), delta, failed,
                      style="bold" if r.is_ref else None)
    return table


def rank_table(ranks: pd.DataFrame, workloads: int) -> Table:
    """compare --aggregate for the terminal: mean rank per spec and micro-batch."""
    from .report.aggregate import RANK_NOTE

    table = Table(title=f"mean rank over {workloads} workload(s)", caption=RANK_NOTE)
    for name in ("spec", "batch", "mean rank", "workloads"):
        table.add_column(name, justify="left" if name == "spec" else "right")
    for r in ranks.itertuples(index=False):
        table.add_row(escape(r.spec), str(r.norm_batch), f"{r.mean_rank:.2f}", str(r.workloads))
    return table
