"""One self-contained HTML report over one or more sweeps: the question, each sweep's setup,
comparison table, figures, failed runs and the command that makes it again.

Self-contained: figures are base64 PNG in data: URIs, style and script are inline, fonts are
the system's; the page names no resource outside itself and opens from disk with no network
request. Figures are every PNG that `plots.plot_results` writes, so a figure added there
appears here without a change: error_vs_batch and convergence under "Figures", the
sensitivity_<key> figures of a tuned sweep under "Tuning", any other (e.g. stats_error from
the diagnostics) under "Statistics diagnostics". Over several workloads the report opens
with their aggregate: mean ranks and the performance profile (aggregate.py).
"""
from __future__ import annotations

import base64
import datetime
import math
import os
import tempfile
from html import escape
from pathlib import Path

import pandas as pd

from ..errors import ConfigError
from .page import CSS, QUESTION, SCRIPT
from .plots import plot_results
from .reproduce import environment, report_command, resolved_config, run_command
from .results import Results, load_results
from .summary import acc_text, failed_runs, method_note, summarize

MAIN_FIGURES = {
    "error_vs_batch": "Final test error (100 &minus; accuracy) against micro-batch size: "
                      "mean over seeds, band: 95% CI (Student-t on the logit scale).",
    "convergence": "Validation error at each evaluation against training samples seen, a "
                   "panel per micro-batch size: mean over seeds, band: best to worst seed.",
}
EXTRA_FIGURES = {
    "stats_error": "Per layer (columns), how far the statistics of the batch-dependent norms "
                   "are from the population's, against micro-batch size: mean error (top "
                   "row) and log-variance error (bottom); solid: the statistics training "
                   "normalizes with, dashed: the running statistics evaluation uses; last "
                   "epoch, mean over seeds (runs made with --diagnose).",
}


def find_sweeps(paths: list[Path]) -> list[Path]:
    """Each path is a results folder (holding runs.csv) or a study folder whose
    subfolders holding runs.csv are its sweeps, in name order."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"results folder {path} does not exist")
        if not path.is_dir():
            raise ConfigError(f"{path} is not a folder: pass a folder holding runs.csv")
        if (path / "runs.csv").is_file():
            found.append(path)
            continue
        try:
            inner = sorted(p for p in path.iterdir() if (p / "runs.csv").is_file())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
        if not inner:
            raise ConfigError(f"no results in {path}: expected runs.csv written by "
                              "`bknbench run`, or subfolders holding one")
        found += inner
    return list(dict.fromkeys(found))


def default_out(paths: list[Path]) -> Path:
    """report.html in the folder given, or in the folder holding all those given."""
    folders = [Path(p).resolve() for p in paths]
    if len(folders) == 1:
        return Path(paths[0]) / "report.html"
    return Path(os.path.commonpath(folders)) / "report.html"


def _cell(value, cls: str = "", sort=None) -> str:
    attrs = f' class="{cls}"' if cls else ""
    if sort is not None and not (isinstance(sort, float) and math.isnan(sort)):
        attrs += f' data-v="{sort}"'
    return f"<td{attrs}>{escape(str(value))}</td>"


def _table(head: list[str], rows: list[str], table_id: str = "", sortable=False) -> str:
    ident = f' id="{table_id}"' if table_id else ""
    cls = ' class="sortable"' if sortable else ""
    ths = "".join(f"<th>{h}</th>" for h in head)
    return (f"<table{ident}{cls}><thead><tr>{ths}</tr></thead><tbody>"
            + "\n".join(rows) + "</tbody></table>")


def _kv(pairs) -> str:
    rows = "".join(f"<tr>{_cell(k)}{_cell(v)}</tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _summary_table(summary: pd.DataFrame, table_id: str) -> str:
    multi = "dataset" in summary.columns
    head = (["dataset", "model"] if multi else []) + [
        "spec", "micro-batch", "SGD batch", "n", "acc %", "95% CI", "&Delta; vs ref",
        "&Delta; 95% CI", "&Delta; method", "failed"]
    rows = []
    for r in summary.itertuples(index=False):
        ci = "" if r.n < 2 else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
        d_ci = "" if r.is_ref or math.isnan(r.ref_diff_low) else (
            f"[{r.ref_diff_low:+.2f}, {r.ref_diff_high:+.2f}]" + (
                " *" if r.ref_diff_excludes_0 else ""))
        delta = "ref" if r.is_ref else "n/a" if math.isnan(r.ref_diff) else f"{r.ref_diff:+.2f}"
        sig = "num sig" if r.ref_diff_excludes_0 else "num"
        cells = ([_cell(r.dataset), _cell(r.model)] if multi else []) + [
            _cell(r.spec, "mono"), _cell(r.norm_batch, "num", r.norm_batch),
            _cell(r.sgd_batch, "num", r.sgd_batch), _cell(r.n, "num", r.n),
            _cell("all failed" if r.n == 0 else f"{r.mean:.2f}", "num" if r.n else "fail",
                  r.mean),
            _cell(ci, "num", r.ci_low), _cell(delta, sig, r.ref_diff),
            _cell(d_ci, sig, r.ref_diff_low), _cell(r.ref_diff_method),
            _cell(r.failed_statuses, "fail" if r.failed else "")]
        rows.append(f'<tr{" class=ref" if r.is_ref else ""}>{"".join(cells)}</tr>')
    filt = (f'<input class="filter" data-table="{table_id}" '
            'placeholder="filter rows, e.g. bkn or 128" aria-label="filter rows">')
    return filt + _table(head, rows, table_id, sortable=True)


def _figures(results: Results) -> tuple[dict[str, str], str]:
    """{name: base64 PNG} of every figure plot_results writes, and a note when none. The
    PNGs are kept in the sweep's plots/ folder (as `bknbench plot` writes them), so a
    report leaves the figures it shows beside their data; a temporary folder where that
    folder cannot be written."""
    keep = results.path / "plots"
    with tempfile.TemporaryDirectory(prefix="bknbench-report-") as tmp:
        try:
            paths = plot_results(results, keep if _writable(keep) else tmp, ("png",))
        except ConfigError as e:
            return {}, str(e)
        return {p.stem: base64.b64encode(p.read_bytes()).decode("ascii")
                for p in paths if p.suffix == ".png"}, ""


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _figure_html(name: str, data: str, caption: str) -> str:
    return (f'<figure id="fig-{escape(name)}"><img alt="{escape(name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>')


def _grid_text(runs: pd.DataFrame) -> str:
    ok = runs[runs["status"] == "ok"]
    sgd = sorted(set(zip(runs["norm_batch"], runs["sgd_batch"])))
    steps = ("one optimizer step per micro-batch" if all(b == s for b, s in sgd) else
             "SGD batch per run in the table (gradients accumulated over micro-batches)")
    return (f"{escape(', '.join(dict.fromkeys(runs['dataset'])))} / "
            f"{escape(', '.join(dict.fromkeys(runs['model'])))}: "
            f"{len(runs)} runs ({len(ok)} ok) = specs {escape(', '.join(dict.fromkeys(runs['spec'])))}"
            f" &times; micro-batch {', '.join(map(str, sorted(set(runs['norm_batch']))))}"
            f" &times; seeds {', '.join(map(str, sorted(set(runs['seed']))))}; "
            f"{int(runs['epochs'].max())} epoch(s); {steps}.")


def _sweep_section(i: int, folder: Path, results: Results) -> str:
    runs = results.runs
    summary = summarize(runs)
    figures, why = _figures(results)
    main = [_figure_html(n, figures[n], c) for n, c in MAIN_FIGURES.items() if n in figures]
    extra = [_figure_html(n, d, EXTRA_FIGURES.get(n, escape(n.replace("_", " "))))
             for n, d in figures.items()
             if n not in MAIN_FIGURES and not n.startswith("sensitivity_")]
    failed = failed_runs(runs)
    fail_rows = [f"<tr>{''.join(_cell(v) for v in row)}</tr>"
                 for row in failed.itertuples(index=False)]
    title = ", ".join(dict.fromkeys(f"{d} / {m}" for d, m in zip(runs["dataset"], runs["model"])))
    return f"""
<section id="sweep-{i}">
<h2>Sweep {i}: {escape(title)}</h2>
<p class="sub">results folder <code>{escape(str(folder))}</code></p>
<p>{_grid_text(runs)}</p>{_split_note(results)}{"".join(f'<p class="note">{escape(n)}.</p>' for n in results.notes)}
<h3>Comparison</h3>
{_summary_table(summary, f"table-{i}")}
<p class="note">{escape(method_note(summary))}. Click a column to sort.</p>
<h3>Figures</h3>
{"".join(main) or f'<p class="note">No figures: {escape(why)}</p>'}
{_tuning_html(results, figures)}
<h3>Statistics diagnostics</h3>
{"".join(extra) or '<p class="note">None in this sweep (figures from diagnostics appear here '
                    'when the sweep recorded them).</p>'}
<h3>Failed runs</h3>
{_table(list(failed.columns), fail_rows) if fail_rows else '<p class="note">None: every run finished ok.</p>'}
<h3>Setup</h3>
<div class="cols"><div><p class="note">Resolved configuration (runs.csv <code>config</code>;
several values: they differ between runs)</p>{_kv(resolved_config(runs))}</div>
<div><p class="note">Environment</p>{_kv(environment(runs, folder))}</div></div>
<h3>Reproduce</h3>
<pre>{escape(run_command(folder, runs))}</pre>
</section>"""


def _split_note(results: Results) -> str:
    if not results.split:
        return ""
    return (f'<p class="note">This folder holds runs of one spec and micro-batch that differ in '
            f'{escape(", ".join(results.split))}: they are never pooled; each spec names its '
            "values.</p>")
def _tuning_html(results: Results, figures: dict[str, str]) -> str:
    """A tuned sweep's chosen points (edges marked) and its sensitivity figures."""
    if results.tuning is None or results.tuning.empty:
        return ""
    from .sensitivity import chosen_points

    chosen = chosen_points(results.tuning)
    keys = [c for c in chosen.columns if c not in ("spec", "norm_batch", "score", "at_edge",
                                                   "seeds")]
    rows = [f"<tr>{_cell(r.spec, 'mono')}{_cell(r.norm_batch, 'num')}"
            + "".join(_cell(f"{getattr(r, k):g}", "num") for k in keys)
            + f"{_cell(f'{r.score:.2f}', 'num')}{_cell('at edge' if r.at_edge else '', 'fail')}"
            "</tr>" for r in chosen.itertuples(index=False)]
    figs = [_figure_html(n, d, "Validation accuracy against each value of the grid, a panel "
                         "per micro-batch; circled: the chosen point.")
            for n, d in figures.items() if n.startswith("sensitivity_")]
    return (f"<h3>Tuning</h3><p class=\"note\">The point each cell was trained at (best mean "
            "validation accuracy of the tuning seeds, tuning.csv); &ldquo;at edge&rdquo;: a "
            "chosen value is the smallest or largest of its grid (the grid may be too "
            "narrow).</p>" + _table(["spec", "micro-batch", *keys, "val acc %", "edge"], rows)
            + "".join(figs))


def _aggregate_html(runs: pd.DataFrame) -> str:
    """Over several workloads: the mean ranks and the performance profile."""
    from .aggregate import RANK_NOTE, TAU_MAX, mean_ranks, profile_area, profile_figure
    from .plots import spec_colors

    workloads = len(set(zip(runs["dataset"], runs["model"])))
    if workloads < 2:
        return ""
    ranks, area = mean_ranks(runs), profile_area(runs)
    rows = [f"<tr>{_cell(r.spec, 'mono')}{_cell(r.norm_batch, 'num', r.norm_batch)}"
            f"{_cell(f'{r.mean_rank:.2f}', 'num', r.mean_rank)}{_cell(r.workloads, 'num')}"
            "</tr>" for r in ranks.itertuples(index=False)]
    fig = profile_figure(runs, spec_colors(runs["spec"]))
    with tempfile.TemporaryDirectory(prefix="bknbench-report-") as tmp:
        fig.savefig(Path(tmp) / "p.png", format="png", dpi=150)
        data = base64.b64encode((Path(tmp) / "p.png").read_bytes()).decode("ascii")
    best = ", ".join(f"{escape(s)} {a:.2f}" for s, a in area.sort_values(ascending=False).items())
    return f"""<section id="aggregate"><h2>Aggregate over {workloads} workloads</h2>
<p class="note">{escape(RANK_NOTE)}. Click a column to sort.</p>
{_table(["spec", "micro-batch", "mean rank", "workloads"], rows, "ranks", sortable=True)}
{_figure_html("profile", data, f"Performance profile (Dolan and Mor&eacute;): per spec, the "
              f"fraction of (workload, micro-batch) problems whose test error is within a "
              f"factor &tau; of the best spec's. Area up to &tau; = {TAU_MAX:g} "
              f"(1 = best everywhere): {best}.")}</section>"""


def _headline(i: int, results: Results) -> str:
    """The reference and the worst cell of a sweep, in one line, for the contents."""
    s = summarize(results.runs)
    cells = list(s[s["n"] > 0].itertuples(index=False))
    name = lambda c: f"{escape(c.spec)}@{c.norm_batch} {escape(acc_text(c))}%"  # noqa: E731
    ref = [c for c in cells if c.is_ref]
    worst = min(cells, key=lambda c: c.mean)
    ref_txt = f"reference {name(ref[0])}; " if ref else ""
    return f'<li><a href="#sweep-{i}">Sweep {i}</a>: {ref_txt}lowest: {name(worst)}</li>'


def build_report(paths: list[Path], out: Path) -> str:
    """The report's HTML for the sweeps found in paths (find_sweeps)."""
    folders = find_sweeps(paths)
    loaded = []
    for folder in folders:
        res = load_results(folder)
        if not (res.runs["status"] == "ok").any():
            raise ConfigError(f"no successful runs in {folder}: nothing to report")
        loaded.append((folder, res))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = "".join(_sweep_section(i, f, r) for i, (f, r) in enumerate(loaded, 1))
    commands = "\n".join([run_command(f, r.runs) for f, r in loaded]
                         + [report_command(folders, out)])
    contents = "".join(_headline(i, r) for i, (_, r) in enumerate(loaded, 1))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bknbench report</title><style>{CSS}</style></head>
<body><main>
<h1>bknbench report</h1>
<p class="sub">Generated {now} from {len(loaded)} sweep(s). Accuracies in %, &Delta; in
percentage points.</p>
<nav><a href="#question">The question</a><a href="#sweeps">Sweeps</a>
<a href="#reproduce">Reproduce</a></nav>
<section id="question"><h2>The question</h2>{QUESTION}</section>
<section id="sweeps"><h2>Sweeps</h2><ul>{contents}</ul></section>
{_aggregate_html(pd.concat([r.runs for _, r in loaded], ignore_index=True))}
{sections}
<section id="reproduce"><h2>Reproduce</h2>
<p>Each sweep is one <code>bknbench&nbsp;run</code> (every setting spelled out; a run already
in its folder is skipped), then this report:</p>
<pre>{escape(commands)}</pre></section>
</main><script>{SCRIPT}</script></body></html>
"""


def write_report(paths: list[Path], out: Path | None = None) -> Path:
    """Write the report (default: default_out(paths)); returns its path."""
    out = Path(out) if out is not None else default_out(paths)
    find_sweeps(paths)  # a missing folder is named before an unwritable --out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            raise IsADirectoryError(21, "is a folder; give a file name")
        if not os.access(out.parent, os.W_OK):  # found before the work, not after it
            raise PermissionError(13, "permission denied")
        html = build_report(paths, out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)  # a reader never sees half a report
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    return out
