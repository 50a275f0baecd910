"""From results folders to evidence: the CSV schema, loading, summaries with intervals,
figures, and the HTML report.

Public names (import them from their modules): ``schema.RUN_COLUMNS``,
``schema.METRIC_COLUMNS``, ``schema.STATUSES``; ``results.load_results``, ``results.select``,
``results.Results``; ``summary.summarize``, ``summary.acc_interval``,
``summary.diff_interval``, ``summary.format_summary``; ``plots.plot_results``,
``plots.spec_colors``; ``html.write_report``.

Modules: ``schema`` (every column, once), ``results`` (read and check the CSVs, select runs),
``summary`` (per cell: mean, logit-t interval, paired or Welch difference to a reference),
``plots`` (figures), ``stats_figure`` (the diagnostics figure), ``reproduce`` (configuration, environment and the command of a results
folder), ``html`` and ``page`` (the self-contained report). Nothing here imports the sweep or
the CLI: a report is made from files alone.

To add a figure: a ``_name_figure(results, colors) -> Figure`` in ``plots.py`` and its entry
in ``plot_results`` (the HTML report picks it up); to add a column: ``schema.py``, where it is
written, and the loader's type lists in ``results.py``.
"""
