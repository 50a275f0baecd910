"""The networks, built from a normalizer spec, and the wiring of chained normalizers.

Public names: ``MODELS`` (name -> builder), ``make_model(name, spec, norm_batch, in_shape,
num_classes)``.

Modules: ``registry`` (MODELS, register_model, make_model), ``chain`` (norm_after,
activation, connect: what a normalizer asks of its neighbours; wire_sequence, check_chain:
BKN's prediction chain), ``small`` (mlp, cnn), ``resnet`` (the authors' pre-activation
CIFAR ResNets).

To add a model: one file here with ``@register_model(name)`` on a builder
``(spec, norm_batch, in_shape, num_classes) -> nn.Module`` that makes each normalization
layer with ``chain.norm_after(spec, feed, channels, norm_batch)`` (or ``spec.build`` with
``chain.activation`` and ``chain.connect``), wires BKN chains with ``chain``, plus its
import below.
"""
from . import resnet, small  # noqa: F401 (fill the registry)
from .registry import MODELS, make_model

__all__ = ["MODELS", "make_model"]
