"""bknbench: a benchmark of normalization layers across micro-batch sizes.

The public API, for plugins (docs/extending.md); everything else may change:

- ``register_norm(name, help, options, **flags)``: decorator on a factory
  ``(num_features, norm_batch, **options) -> nn.Module`` (flags: accumulates, neighbours,
  carries, compiles); ``Option``, ``Neighbours``, ``Carries`` describe its entry.
- ``register_model(name)``: decorator on ``(spec, norm_batch, in_shape, num_classes) ->
  nn.Module``; ``norm_after(spec, feed, channels, norm_batch)`` makes its normalization
  layers as the built-in models do.
- ``register_dataset(name)``: decorator on ``(data_dir) -> Dataset``; ``as_dataset(name,
  x_train, y_train, x_test, y_test, num_classes)`` makes one from NumPy arrays.

They are the functions the built-ins register with, imported on first use, so ``import
bknbench`` (and the CLI's --help) stays light.
"""
__version__ = "0.1.0"

# public name -> (module, attribute), imported when first asked for
_PUBLIC = {
    "register_norm": ("bknbench.norms.registry", "register"),
    "Option": ("bknbench.norms.registry", "Option"),
    "Neighbours": ("bknbench.norms.registry", "Neighbours"),
    "Carries": ("bknbench.norms.registry", "Carries"),
    "register_model": ("bknbench.models.registry", "register_model"),
    "norm_after": ("bknbench.models.chain", "norm_after"),
    "register_dataset": ("bknbench.data.registry", "register_dataset"),
    "as_dataset": ("bknbench.data.registry", "as_dataset"),
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bknbench' has no attribute {name!r}")
    import importlib

    module, attr = _PUBLIC[name]
    return getattr(importlib.import_module(module), attr)
