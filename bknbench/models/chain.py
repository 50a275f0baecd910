"""The wiring of chained normalizers (BKN, GKN): each layer's prior from its predecessor."""
from __future__ import annotations

from ..errors import ConfigError
from ..norms.kalman import BatchKalmanNorm, Path, ops_of
from ..norms.transitions import analytic_rule


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
