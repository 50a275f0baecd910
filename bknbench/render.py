"""Terminal rendering for the CLI: progress on stderr (rich on a terminal, plain lines
otherwise, nothing with --quiet), the closing messages and the summary table."""
from __future__ import annotations

import datetime
import sys
import time

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
def duration(seconds: float) -> str:
    """3h05m, 4m20s, 45s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Eta:
    """The sweep's time left. A run still to do is expected to take the mean wall time of
    the finished runs of its spec and micro-batch, else of its micro-batch, else of all;
    a running run what is left of that; the runs share the workers seen running at once:
        left = (sum over runs to do of t(run) + sum over running of max(t - elapsed, 0))
               / most runs seen in flight
    None until a run has finished (nothing to go on)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.todo: dict[str, RunConfig] = {}  # not finished, by run id
        self.started: dict[str, float] = {}  # running: run id -> start time
        self.took: dict[tuple[str, int], list[float]] = {}  # (spec, micro-batch) -> seconds
        self.width = 1

    def plan(self, todo: list[RunConfig]) -> None:
        self.todo = {cfg.run_id: cfg for cfg in todo}

    def start(self, cfg: RunConfig) -> None:
        self.started[cfg.run_id] = self.clock()
        self.width = max(self.width, len(self.started))

    def finish(self, cfg: RunConfig) -> None:
        began = self.started.pop(cfg.run_id, None)
        self.todo.pop(cfg.run_id, None)
        if began is not None:
            self.took.setdefault((cfg.spec, cfg.norm_batch), []).append(self.clock() - began)

    def _expected(self, cfg: RunConfig) -> float:
        for key in ((cfg.spec, cfg.norm_batch), cfg.norm_batch, None):
            times = [t for k, ts in self.took.items() for t in ts
                     if key is None or k == key or k[1] == key]
            if times:
                return sum(times) / len(times)
        return 0.0

    def left_s(self) -> float | None:
        if not self.took:
            return None
        now = self.clock()
        work = sum(max(self._expected(cfg) - (now - self.started[i]), 0.0)
                   if i in self.started else self._expected(cfg) for i, cfg in self.todo.items())
        return work / self.width

    def text(self) -> str:
        left = self.left_s()
        return "ETA --" if left is None else f"ETA {duration(left)}"


class Progress:
    """A context manager giving SweepEvents that draw a sweep bar with its ETA and the
    current runs' epochs (rich), print one line per event, each with [finished/total], the
    time and the ETA (plain), or stay silent (quiet)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.rich = not quiet and sys.stderr.isatty()
        self.bar = None
        self.eta = Eta()
        self.total = self.done = 0

    def __enter__(self) -> SweepEvents:
        if self.quiet:
            return SweepEvents()
        if self.rich:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar,
                                       TextColumn, TimeElapsedColumn)

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                           console=stderr, transient=False)
            self.bar.start()
            self.sweep_task = None
            self.runs: dict[str, int] = {}
        return SweepEvents(on_plan=self.on_plan, on_start=self.on_start,
                           on_epoch=self.on_epoch, on_finish=self.on_finish,
                           on_todo=self.eta.plan)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def say(self, text: str) -> None:
        """A plain line: the time, [finished/total], the text, the ETA."""
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        stderr.print(f"{stamp} [{self.done}/{self.total}] {text}  {self.eta.text()}",
                     highlight=False, soft_wrap=True, markup=False)

    def on_plan(self, total: int, todo: int) -> None:
        self.total, self.done = total, total - todo
        if self.rich:
            self.sweep_task = self.bar.add_task("sweep", total=total, completed=self.done,
                                                eta="")
        else:
            self.say(f"sweep: {total} runs, {self.done} already finished, {todo} to run")

    def on_start(self, cfg: RunConfig) -> None:
        self.eta.start(cfg)
        if self.rich:
            self.runs[cfg.run_id] = self.bar.add_task(f"  {label(cfg)}", total=cfg.epochs,
                                                      eta="")
        else:
            self.say(f"start  {label(cfg)}")

    def on_epoch(self, cfg: RunConfig, row: dict) -> None:
        if self.rich:
            task = self.runs.get(cfg.run_id)
            if task is not None:
                self.bar.update(task, completed=row["epoch"],
                                description=f"  {label(cfg)}  {val_text(row)}")
            self.bar.update(self.sweep_task, eta=self.eta.text())
        else:
            self.say(f"  epoch {row['epoch']}/{cfg.epochs} {label(cfg)}: train loss "
                     f"{row['train_loss']:.3f}, {val_text(row)}")

    def on_finish(self, cfg: RunConfig, row: dict) -> None:
        self.eta.finish(cfg)
        self.done += 1
        if self.rich:
            task = self.runs.pop(cfg.run_id, None)
            if task is not None:
                self.bar.remove_task(task)
            self.bar.update(self.sweep_task, advance=1, eta=self.eta.text())
            stderr.print(f"  {label(cfg)}: {finish_text(row)}", highlight=False)
        else:
            self.say(f"done   {label(cfg)}: {finish_text(row)}")


def summary_table(summary: pd.DataFrame, title: str) -> Table:
    """A rich table for the terminal: mean [95% CI], Δ vs ref [95% CI] (P paired, W Welch;
    bold when its interval excludes 0), with the method in the caption."""
    multi = "dataset" in summary.columns
    # the SGD batch and the learning rate where a row steps other than once per micro-batch
    # (bn@2, a step per 2 samples, and bn-accum@2, steps of 128, must not look alike under
    # "batch"), or its lr is not the base lr scaled by its SGD batch (a tuned lr)
    accumulates = bool((summary["sgd_batch"] != summary["norm_batch"]).any())
    scaled = "lr" in summary and (summary["lr"] / summary["sgd_batch"]).round(12).nunique() <= 1
    steps = ["sgd_batch", "lr"] if accumulates else [] if scaled else ["lr"]
    table = Table(title=title, caption=method_note(summary) + "; n = successful seeds" + (
        "; batch = micro-batch (samples per statistic), sgd = samples per step, lr = peak "
        "learning rate" if steps else ""))
    for name in (["dataset", "model"] if multi else []) + ["spec"]:
        table.add_column(name)
    for name in ("batch", *("sgd" if c == "sgd_batch" else c for c in steps), "n", "acc %",
                 "95% CI", "Δ vs ref [95% CI]", "failed"):
        table.add_column(name, justify="left" if name in ("acc %", "95% CI", "Δ vs ref [95% CI]",
                                                          "failed") else "right")
    for r in summary.itertuples(index=False):
        acc = "[red]all failed[/]" if r.n == 0 else f"{r.mean:.2f}"
        ci = "" if r.n == 0 else "n/a" if r.n == 1 else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
        delta = escape(delta_text(r))
        if r.ref_diff_excludes_0:
            delta = f"[bold]{delta}[/]"
        failed = f"[red]✗ {r.failed_statuses}[/]" if r.failed else ""
        table.add_row(*([r.dataset, r.model] if multi else []), escape(r.spec),
                      str(r.norm_batch), *(f"{getattr(r, c):g}" for c in steps), str(r.n),
                      acc, escape(ci), delta, failed,
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
