"""The fixed parts of the HTML report: style and the few lines of script that sort and
filter its tables. Nothing here names a resource outside the file: system fonts only, no
url(), no links, so the report opens from disk without a single network request."""

CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #d9dee7; --band: #f4f6fa;
        --accent: #1f5fa8; --bad: #b42318; --good: #0b6e4f; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.5;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
       "Liberation Sans", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 40px 0 10px; padding-bottom: 6px;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 26px 0 8px; }
p { margin: 8px 0; max-width: 900px; }
.sub, .note, figcaption { color: var(--muted); font-size: 13px; }
nav { margin: 14px 0 0; font-size: 14px; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
code, pre, td.num, td.mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; }
pre { background: var(--band); border: 1px solid var(--line); border-radius: 6px;
      padding: 10px 12px; font-size: 12.5px; white-space: pre-wrap; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 13.5px; margin: 6px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { background: var(--band); font-weight: 600; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-dir="asc"]::after { content: " \\25B2"; font-size: 10px; }
table.sortable th[data-dir="desc"]::after { content: " \\25BC"; font-size: 10px; }
td.num { text-align: right; white-space: nowrap; font-size: 12.5px; }
tr.ref td { background: #eaf2fb; font-weight: 600; }
td.sig { color: var(--accent); font-weight: 600; }
td.fail, .fail { color: var(--bad); }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.kv td { font-size: 13px; }
.cols { display: flex; flex-wrap: wrap; gap: 28px; }
.cols > div { flex: 1 1 420px; min-width: 0; }
.cols table { width: 100%; table-layout: fixed; }
.cols td { overflow-wrap: anywhere; }
.cols td:first-child { width: 34%; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
input.filter { font: inherit; font-size: 13px; padding: 4px 8px; width: 260px;
               border: 1px solid var(--line); border-radius: 4px; margin: 4px 0; }
"""

# Click a header to sort by it (numbers by their data-v value), type to filter rows.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "asc" ? -1 : 1;
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir > 0 ? "asc" : "desc";
      var body = table.tBodies[0], rows = Array.from(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (x !== undefined && y !== undefined) { return dir * (parseFloat(x) - parseFloat(y)); }
        return dir * a.cells[col].textContent.localeCompare(b.cells[col].textContent);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.querySelectorAll("input.filter").forEach(function (input) {
  input.addEventListener("input", function () {
    var q = input.value.toLowerCase();
    var table = document.getElementById(input.dataset.table);
    Array.from(table.tBodies[0].rows).forEach(function (r) {
      r.hidden = q !== "" && r.textContent.toLowerCase().indexOf(q) < 0;
    });
  });
});
"""

QUESTION = """
<p>How does each normalization layer's accuracy change as the <b>micro-batch</b> &mdash; the
number of samples behind each normalization statistic &mdash; shrinks? BatchNorm estimates a
mean and a variance per channel from the micro-batch; with a few samples these estimates are
noisy, and they differ from the running statistics the network uses at test time. GroupNorm
and LayerNorm use each sample alone; Batch Kalman Normalization (BKN) fuses the
micro-batch's statistics with a prediction from the layers before it.</p>
<p>Each run trains one network with one normalizer, at one micro-batch size and seed, and is
scored by its accuracy on the <b>test</b> split after the last epoch, in eval mode (curves
and tuning use a validation split carved out of the training data; in a tuned sweep each
cell trained at the learning rate that was best on validation). A cell of
the table is one normalizer at one micro-batch size, over its seeds; &Delta; compares it with
a reference cell (BatchNorm at its largest micro-batch unless stated). The SGD batch is the
number of samples per optimizer step: equal to the micro-batch, or larger when gradients are
accumulated over several micro-batches (the Group Normalization paper's protocol).</p>
"""
