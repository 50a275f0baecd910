"""One run's diagnostics: after every epoch, the probes over a fixed probe set, their metrics
as stats rows; after the last, a copy of the model that evaluates with population statistics.

Cost, per epoch: one population forward over the probe set, at most MAX_TRAIN_FORWARDS
training forwards without gradients, and one transfer of every metric to the host. Training
is untouched: the probes change no buffer (norms/probe.py), the RNG is forked, the model's
train/eval mode restored, and the counters are buffers outside the state_dict.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from .measure import logvar_bias, logvar_error, mean_bias, mean_error
from .probes import norm_layers, population_stats, probe_indices, train_plan, train_stats


def forked_rng(device: torch.device):
    """The global RNG streams of `device` (and the CPU) restored on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


class Diagnostics:
    """Statistics diagnostics of one run (docs/diagnostics.md).

    model: the model being trained (probed in place, never changed); x_train: (N, ...) the
    training inputs on the model's device; norm_batch, sgd_batch: the run's micro-batch and
    samples per training forward. A model without batch-dependent layers is not applicable:
    no probes, no rows, no population model."""

    def __init__(self, model: nn.Module, x_train: torch.Tensor, norm_batch: int, sgd_batch: int):
        self.model = model
        self.layers = norm_layers(model)
        self.population: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, (C,) each
        if not self.layers:
            return
        self.x = x_train[probe_indices(len(x_train)).to(x_train.device)]
        self.chunk, self.forwards = train_plan(len(self.x), norm_batch, sgd_batch)
        for _, layer in self.counting_layers():
            layer.counting = True
            layer.reset_counters()

    @property
    def applicable(self) -> bool:
        return bool(self.layers)

    def counting_layers(self):
        return [(n, m) for n, m in self.layers if hasattr(m, "training_counters")]

    def probe(self):
        """(population statistics, train-probe statistics) per layer, at the current weights."""
        was_training = self.model.training
        self.model.train()
        try:
            with forked_rng(self.x.device):
                pop = population_stats(self.model, self.layers, self.x)
                used = train_stats(self.model, self.layers, self.x, self.chunk, self.forwards)
        finally:
            self.model.train(was_training)
        return pop, used

    def epoch_rows(self, epoch: int) -> list[dict]:
        """The stats rows of this epoch: {epoch, layer, layer_name, metric, value}; resets the
        layers' training counters. Metric names: docs/diagnostics.md, stats.csv."""
        if not self.layers:
            return []
        pop, used = self.probe()
        self.population = pop
        keys: list[tuple[int, str]] = []
        values: list[torch.Tensor] = []
        counted: set[tuple[int, str]] = set()

        def add(i: int, metric: str, value: torch.Tensor) -> None:
            keys.append((i, metric))
            values.append(value.detach().reshape(()).float())

        for i, ((_, layer), (mu, var), pairs) in enumerate(zip(self.layers, pop, used)):
            eps = float(getattr(layer, "eps", 0.0))  # the variance a normalizer divides by
            add(i, "population_mean", mu.mean())
            add(i, "population_var", var.mean())
            ref_mean, ref_var = layer.reference(mu, var)
            names = ["used"] + sorted(set(pairs) - {"used"})
            estimates = {**{n: pairs[n] for n in names}, "running": layer.eval_statistics()}
            for name, (m, v) in estimates.items():
                add(i, f"mean_err_{name}", mean_error(m, ref_mean, ref_var + eps))
                add(i, f"logvar_err_{name}", logvar_error(v + eps, ref_var + eps))
                if name != "running":  # (G, C): the part common to all groups
                    add(i, f"mean_bias_{name}", mean_bias(m, ref_mean, ref_var + eps))
                    add(i, f"logvar_bias_{name}", logvar_bias(v + eps, ref_var + eps))
            if "predicted" in pairs and "observed" in pairs:
                add(i, "var_ratio_median", (pairs["predicted"][1] / pairs["observed"][1]).median())
            for name, value in getattr(layer, "training_counters", dict)().items():
                add(i, name, value)
                counted.add((i, name))
        read = torch.stack(values).tolist()  # the one transfer to the host
        for _, layer in self.counting_layers():
            layer.reset_counters()
        return [{"epoch": epoch, "layer": i, "layer_name": self.layers[i][0], "metric": metric,
                 "value": value} for (i, metric), value in zip(keys, read)
                if not ((i, metric) in counted and math.isnan(value))]  # counted nothing

    def population_model(self) -> nn.Module:
        """A copy of the model whose eval statistics are the population statistics of the
        last `epoch_rows` (its weights)."""
        if not self.population:
            raise RuntimeError("no population statistics yet: call epoch_rows first")
        twin = copy.deepcopy(self.model)
        for (_, layer), (mean, var) in zip(norm_layers(twin), self.population):
            layer.set_population(mean, var)
        return twin
