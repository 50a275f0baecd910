"""Per-layer statistics diagnostics: what each batch-dependent normalization layer estimates
in training, and how far that is from the population statistics of its input.

Public names: ``Diagnostics`` (diagnostics.py: one run's probes after every epoch, its
stats rows and the model with population statistics), ``probe_indices``,
``PROBE_SAMPLES`` (probes.py: the fixed probe set), ``mean_error``, ``logvar_error``
(measure.py: the two error metrics).

Modules: ``measure`` (pure formulas), ``probes`` (the probe forwards of norms/probe.py over a
model: population statistics, what training uses), ``diagnostics`` (an epoch's metrics, read
from the device once). Everything goes through the protocol of ``bknbench/norms/probe.py``,
never a layer's class, so a new batch-dependent normalizer is diagnosed the day it is added.

To add a metric: compute it in ``Diagnostics.epoch_rows`` as a 0-d tensor beside the others
(they are read in one transfer), and document its name in docs/diagnostics.md's stats.csv table.
"""
from .diagnostics import Diagnostics
from .measure import logvar_error, mean_error
from .probes import PROBE_SAMPLES, probe_indices

__all__ = ["Diagnostics", "PROBE_SAMPLES", "logvar_error", "mean_error", "probe_indices"]
