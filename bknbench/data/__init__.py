"""Datasets as tensors on the training device, and their augmentation; nothing downloaded.

Public names: ``DATASETS`` (name -> loader), ``load_dataset(name, data_dir, val_fraction)``
(train / validation / test), ``Dataset``.

Modules: ``registry`` (Dataset, register_dataset, load_dataset, standardize, cache folder),
``embedded`` (mnist1d, digits, digits32, synthetic), ``npz`` (a user's file,
``--dataset npz:PATH``), ``cifar`` (CIFAR-10/100 from a local copy, with a
restricted unpickler), ``augment`` (random crop and flip on the device).

To add a dataset: one file here with a loader ``@register_dataset(name)`` returning
``as_dataset(...)``, plus its import below.
"""
from . import cifar, embedded, npz  # noqa: F401 (fill the registry)
from .registry import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
