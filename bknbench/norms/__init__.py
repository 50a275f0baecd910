"""The normalizers: a registry of drop-in layers, one constructor shape.

Public names: ``REGISTRY`` (name -> NormEntry), ``parse_spec`` (spec string -> NormSpec,
whose ``build(num_features, norm_batch)`` makes the layer), ``split_specs``, ``names``,
``NormSpec``, ``Option``, ``register``; the layer classes ``GroupedBatchNorm``,
``BatchKalmanNorm``, ``GroupKalmanNorm``.

Modules: ``registry`` (Option, NormEntry, register, parse_spec), ``batch`` (StatsNorm, BN per
group, bn, bn-accum, gn, ln, none), ``kalman`` (the BKN layer, bkn, bkn-authors), ``priors`` (what feeds
a BKN layer and what it hands on),
``gkn`` (Group Kalman Normalization), ``transitions`` (how statistics travel between layers);
the rivals ``renorm`` (brn), ``mabn``, ``cbn``, ``frn``, ``evonorm`` (evonorm-b0, -s0), ``ws``
(ws-gn), with ``common`` (run-length phases, windows and normalization nodes they share).

Importing this package imports every family module once, so the registry is full. To add a
normalizer: one file here with a factory decorated by ``@register(name, help, options)``
returning a drop-in ``nn.Module``, plus its import below. The contract tests iterate over
the registry and pick it up.
"""
# fill the registry
from . import batch, cbn, evonorm, frn, gkn, kalman, mabn, renorm, ws  # noqa: F401
from .batch import GroupedBatchNorm
from .gkn import GroupKalmanNorm
from .kalman import BatchKalmanNorm
from .registry import REGISTRY, NormSpec, Option, names, parse_spec, register, split_specs

__all__ = ["REGISTRY", "NormSpec", "Option", "names", "parse_spec", "register", "split_specs",
           "GroupedBatchNorm", "BatchKalmanNorm", "GroupKalmanNorm"]
