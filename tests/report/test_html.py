"""The HTML report: built from a real tiny sweep, self-contained, its command reproduces the
sweep, new figures appear without a change; then opened in headless Chromium (skipped where
none is installed: apt-get install chromium), with the network blocked and logged."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bknbench.cli import app
from bknbench.report import html as report_html
from bknbench.report.html import write_report
from bknbench.report.results import load_results
from bknbench.report.summary import summarize

runner = CliRunner()
RUN = ["run", "--dataset", "synthetic", "--model", "mlp", "--epochs", "1",
       "--evals-per-epoch", "2", "--workers", "1", "--quiet"]


def sweep(out: Path, norms: str, batches: str, seeds: str = "0,1") -> Path:
    result = runner.invoke(app, RUN + ["--norms", norms, "--batch-sizes", batches,
                                       "--seeds", seeds, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two sweeps in one study folder; bn fails at micro-batch 1 in the MLP (one value per
    channel), so the report has failed runs with a reason."""
    root = tmp_path_factory.mktemp("study")
    sweep(root / "a", "bn,gn", "1,16")
    sweep(root / "b", "gn:groups=8", "4", seeds="0,1,2")
    return root


class Page(HTMLParser):
    """What a test needs from a page: table rows by table id, images, links, scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: dict[str, int] = {}
        self.images: list[dict] = []
        self.refs: list[str] = []  # every src= and href= value
        self.scripts_with_src = 0
        self.table = None
        self.in_body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])
        if tag == "table":
            self.table = a.get("id")
        elif tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body and self.table:
            self.rows[self.table] = self.rows.get(self.table, 0) + 1
        elif tag == "img":
            self.images.append(a)
        elif tag == "script" and "src" in a:
            self.scripts_with_src += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_body = False
        elif tag == "table":
            self.table = None


def external_references(text: str) -> list[str]:
    """Anything in the page that a browser could fetch from elsewhere: a URL with a scheme
    or protocol-relative, a src/href that is not data: or #, CSS url() or @import."""
    page = Page(text)
    found = re.findall(r"(?i)\b(?:https?|ftp|wss?):", text)
    found += [r for r in page.refs if not r.startswith(("data:", "#"))]
    found += re.findall(r"(?i)url\s*\(|@import", text)
    found += ["<script src>"] * page.scripts_with_src
    return found


def test_report_holds_every_part(study, tmp_path):
    out = write_report([study], tmp_path / "r.html")
    text = out.read_text()
    page = Page(text)
    for i, name in ((1, "a"), (2, "b")):
        summary = summarize(load_results(study / name).runs)
        assert page.rows[f"table-{i}"] == len(summary)
    assert text.count('id="sweep-') == 2 and "The question" in text
    # bn at micro-batch 1 failed in both seeds, with its reason
    assert "BN is undefined" in text or "undefined" in text
    assert text.count("<td>failed</td>") == 2
    figures = [i for i in page.images if i["src"].startswith("data:image/png;base64,")]
    assert [i["alt"] for i in figures] == ["error_vs_batch", "convergence"] * 2
    for name in ("a", "b"):  # the figures it shows are kept beside their data
        kept = sorted(p.name for p in (study / name / "plots").glob("*.png"))
        assert kept == ["convergence.png", "error_vs_batch.png"]
    assert "logit scale" in text and "paired by seed" in text
    assert "torch" in text and "git commit" in text and "results written" in text
    assert external_references(text) == []


def test_reproduce_command_makes_the_same_runs(study, tmp_path):
    text = write_report([study / "a"], tmp_path / "r.html").read_text()
    block = re.findall(r"<pre>(bknbench run .*?)</pre>", text, re.S)[0]
    import html

    args = shlex.split(html.unescape(block).replace("\\\n", " "))
    assert args[:2] == ["bknbench", "run"] and args[-2:] == ["--out", str(study / "a")]
    again = tmp_path / "again"
    result = runner.invoke(app, args[1:-2] + ["--out", str(again), "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    ids = lambda p: sorted(load_results(p).runs["run_id"])  # noqa: E731
    assert ids(again) == ids(study / "a")
    sweep_json = json.loads((again / "sweep.json").read_text())
    assert sweep_json["base"]["evals_per_epoch"] == 2


def test_a_new_figure_appears_without_touching_the_report(study, tmp_path, monkeypatch):
    """Whatever plot_results writes is in the report: a diagnostics figure goes under
    "Statistics diagnostics"."""
    real = report_html.plot_results

    def with_stats(results, out_dir, formats):
        paths = real(results, out_dir, formats)
        extra = Path(out_dir) / "stats_error.png"
        shutil.copy(paths[0], extra)
        return paths + [extra]

    monkeypatch.setattr(report_html, "plot_results", with_stats)
    text = write_report([study / "b"], tmp_path / "r.html").read_text()
    section = text.split("<h3>Statistics diagnostics</h3>")[1].split("<h3>")[0]
    assert 'id="fig-stats_error"' in section and "data:image/png;base64," in section


def test_default_out_and_several_folders(study, tmp_path):
    assert report_html.default_out([study]) == study / "report.html"
    assert report_html.default_out([study / "a", study / "b"]) == study.resolve() / "report.html"
    assert report_html.find_sweeps([study]) == [study / "a", study / "b"]
    assert report_html.find_sweeps([study / "b", study / "a"]) == [study / "b", study / "a"]
    result = runner.invoke(app, ["report", str(study / "a"), "--out", str(tmp_path / "x.html")])
    assert result.exit_code == 0 and f"wrote {tmp_path / 'x.html'}" in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------- in a real browser
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on PATH (apt-get install chromium; .ci/run installs it)")


def open_in_browser(page: Path, tmp: Path, *action: str) -> tuple[str, list[dict]]:
    """Run headless Chromium on page with every host name unresolvable and the network
    logged; returns stdout and the URL requests the page made (those with an initiator:
    the browser's own background requests have none, "not an origin")."""
    log = tmp / "net.json"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", "--no-first-run",
           "--disable-background-networking", "--disable-extensions",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={log}",
           *action, page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    net = json.loads(log.read_text())
    kinds = {v: k for k, v in net["constants"]["logEventTypes"].items()}
    requests = [e["params"] for e in net["events"]
                if kinds.get(e["type"]) == "URL_REQUEST_START_JOB"
                and e.get("params", {}).get("initiator") not in (None, "not an origin")]
    return proc.stdout, requests


def test_in_chromium_dom_screenshot_and_no_network(study, tmp_path):
    report = write_report([study], tmp_path / "report.html")
    dom, requests = open_in_browser(report, tmp_path / "dom", "--dump-dom")
    assert requests == [], requests
    page = Page(dom)
    assert page.rows["table-1"] == 4 and page.rows["table-2"] == 1
    assert len([i for i in page.images if i["src"].startswith("data:image/png")]) == 4
    assert "Statistics diagnostics" in dom and "Reproduce" in dom

    shot = tmp_path / "shot.png"
    _, requests = open_in_browser(report, tmp_path / "shot", f"--screenshot={shot}",
                                  "--window-size=1280,2400")
    assert requests == []
    import numpy as np
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = len(np.unique(rgb, axis=0))
    assert colours > 200  # text, tables and figures, not a blank or single-colour page
    assert (rgb.sum(1) < 600).mean() > 0.02  # and some ink on it

    # the detector itself: a page that fetches an image is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>')
    assert external_references(bad.read_text()) != []
    _, requests = open_in_browser(bad, tmp_path / "bad", "--dump-dom")
    assert [r["url"] for r in requests] == ["http://example.invalid/x.png"]
