"""The wiring of normalizers into a network: what a normalizer asks of its neighbours
(`Neighbours` on its registry entry: no ReLU after it, a parametrization of the weight
feeding it, a reference to the layer feeding it), and BKN's chain, each layer's prior from
its predecessor."""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..norms.kalman import BatchKalmanNorm, Path, ops_of
from ..norms.transitions import analytic_rule


# ---------------------------------------------------------------- neighbours
def activation(spec) -> nn.Module:
    """The activation after a normalizer of ``spec``: ReLU, or Identity for one that
    includes its own nonlinearity (FRN, EvoNorm)."""
    return nn.ReLU() if spec.neighbours.activation else nn.Identity()


def connect(spec, feed: nn.Module, norm: nn.Module) -> None:
    """Apply what ``norm`` asks of ``feed``, the convolution or linear layer whose output
    it normalizes (directly, or through a residual sum): a parametrization of feed's weight
    (once per layer), and ``norm.attach(feed)``."""
    asks = spec.neighbours
    if asks.weight is not None and not parametrize.is_parametrized(feed, "weight"):
        parametrize.register_parametrization(feed, "weight", asks.weight())
    if asks.feed:
        norm.attach(feed)


def norm_after(spec, feed: nn.Module, channels: int, norm_batch) -> list[nn.Module]:
    """[norm, activation] for the output of ``feed``, connected."""
    norm = spec.build(channels, norm_batch)
    connect(spec, feed, norm)
    return [norm, activation(spec)] if spec.neighbours.activation else [norm]


# ---------------------------------------------------------------- BKN chain wiring
def wire_sequence(layers) -> None:
    """Give each chained norm in a forward-ordered module sequence a Path from the
    previous chained norm through the modules between them (the transition ops)."""
    source, ops = None, []
    for layer in layers:
        if isinstance(layer, BatchKalmanNorm):
            layer.prior = Path(source, tuple(ops)) if source is not None else None
            source, ops = layer, []
        elif source is not None:
            ops.append(layer)


def check_chain(model: nn.Module) -> None:
    """Fail at build time when an analytic transition meets an op it has no rule for, and
    clear every posterior at the start of each forward so a stale one can never be read."""
    layers = [m for m in model.modules() if isinstance(m, BatchKalmanNorm)]
    if not layers:
        return
    for layer in layers:
        if layer.transition == "analytic" or getattr(layer, "analytic_in_eval", False):
            bad = [op for op in ops_of(layer.prior) if analytic_rule(op) is None]
            if bad:
                raise ConfigError(f"analytic transition has no rule for {bad[0]}; "
                                  "use transition=sampled")

    def clear(module, args):
        for layer in layers:
            layer.posterior = None

    model.register_forward_pre_hook(clear)
