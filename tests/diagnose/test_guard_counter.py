"""BKN's training counters (norms/probe.py, "counters"): the guard's rejections and the mean
weight on the prediction, counted on the device while diagnosing and only then."""
import pytest
import torch

from bknbench.norms import parse_spec
from bknbench.norms.probe import Probe

C = 4


class FixedPrior:
    """A prediction set by the test, instead of a predecessor's posterior."""

    def __init__(self):
        self.var = 1.0

    def predict(self, propagate, transition, draws, borders="exact"):
        return torch.zeros(1, C).expand(2, C), torch.full((2, C), self.var)


def _layer(spec="bkn"):
    layer = parse_spec(spec).build(C, 4)
    layer.prior = FixedPrior()
    return layer.train()


def _forwards(layer, var_hats):
    x = torch.randn(8, C, generator=torch.Generator().manual_seed(0))  # 2 groups, s ~ 1
    for v in var_hats:
        layer.prior.var = v
        layer(x)


def test_rejections_and_effective_weight_are_counted():
    layer = _layer()
    layer.counting = True
    _forwards(layer, [1.0, 1e6, 1.0, 1e6, 1.0])  # var_hat / s ~ 1e6 >= guard 100: rejected
    c = {k: v.item() for k, v in layer.training_counters().items()}
    assert c["guard_rejected"] == pytest.approx(2 / 5)
    assert c["p_effective"] == pytest.approx(0.9 * 3 / 5)
    layer.reset_counters()
    assert all(torch.isnan(v) for v in layer.training_counters().values())  # none counted


def test_the_adaptive_gain_is_counted_as_used():
    layer = _layer("bkn:gain=adaptive,n0=4")
    layer.counting = True
    _forwards(layer, [1.0, 1.0])
    assert layer.training_counters()["p_effective"].item() == pytest.approx(4 / (4 + 4))


def _counts(layer):
    return [layer.guard_trusted.item(), layer.guard_p_sum.item()]


def test_nothing_is_counted_unless_diagnosing_nor_in_a_probe():
    layer = _layer()
    _forwards(layer, [1.0, 1e6])
    assert _counts(layer) == [0.0, 0.0]
    layer.counting = True
    layer.reset_counters()
    layer.probe = Probe("train")
    _forwards(layer, [1.0, 1e6])
    layer.probe = None
    assert _counts(layer) == [0.0, 0.0]
    assert all(torch.isnan(v) for v in layer.training_counters().values())  # no forwards
    state = layer.state_dict()  # not in checkpoints
    assert not {"guard_trusted", "guard_p_sum", "counted_from"} & set(state)


def test_counting_starts_at_the_reset():
    """Forwards before the reset (an earlier epoch, a checkpoint's) are not counted."""
    layer = _layer()
    _forwards(layer, [1.0, 1.0, 1.0])
    layer.counting = True
    layer.reset_counters()
    _forwards(layer, [1e6, 1.0])
    assert layer.training_counters()["guard_rejected"].item() == pytest.approx(0.5)


def test_the_learnable_gain_is_counted():
    layer = _layer("bkn:gain=learnable,p=0.8")
    layer.counting = True
    _forwards(layer, [1.0, 1e6])
    assert layer.training_counters()["p_effective"].item() == pytest.approx(0.8 / 2, rel=1e-4)


def test_a_layer_without_prediction_reports_no_counters():
    layer = _layer()
    layer.prior = None
    layer.counting = True
    layer(torch.randn(8, C))
    assert _counts(layer) == [0.0, 0.0] and layer.training_counters() == {}
