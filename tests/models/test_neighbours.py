"""What a normalizer asks of its neighbours (registry `Neighbours`), honoured by every model
builder: a normalizer declaring it is one registered factory, nothing else."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from bknbench.models.registry import make_model
from bknbench.norms.batch import GroupNorm
from bknbench.norms.registry import REGISTRY, Neighbours, NormEntry, parse_spec

MODELS = [("mlp", (1, 16)), ("cnn", (1, 16)), ("cnn", (2, 8, 8)), ("resnet20", (3, 8, 8))]


class Doubled(nn.Module):
    def forward(self, w):
        return 2.0 * w


class Attachable(GroupNorm):
    def attach(self, feed):
        self.feed_seen = feed


@pytest.fixture
def toy(monkeypatch):
    """A normalizer registered for the test only, asking for all three."""
    entry = NormEntry("toy", lambda c, b: Attachable(1, c), "toy",
                      neighbours=Neighbours(activation=False, weight=Doubled, feed=True))
    monkeypatch.setitem(REGISTRY, "toy", entry)
    return parse_spec("toy")


@pytest.mark.parametrize("model, in_shape", MODELS, ids=["mlp", "cnn1d", "cnn2d", "resnet20"])
def test_builders_honour_every_request(toy, model, in_shape):
    net = make_model(model, toy, 2, in_shape, 4)
    norms = [m for m in net.modules() if isinstance(m, Attachable)]
    ops = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    assert not [m for m in net.modules() if isinstance(m, nn.ReLU)]
    feeds = [n.feed_seen for n in norms]
    assert len(set(map(id, feeds))) == len(norms)  # each norm its own feeding layer
    assert {id(f) for f in feeds} == {id(op) for op in ops[:-1]}  # all but the classifier
    for op in ops[:-1]:
        assert parametrize.is_parametrized(op, "weight")
        torch.testing.assert_close(op.weight, 2.0 * op.parametrizations.weight.original)
    assert not parametrize.is_parametrized(ops[-1])
    out = net(torch.randn((4,) + in_shape))
    assert out.shape == (4, 4)


@pytest.mark.parametrize("model, in_shape", MODELS, ids=["mlp", "cnn1d", "cnn2d", "resnet20"])
def test_plain_normalizers_keep_relu_and_plain_weights(model, in_shape):
    net = make_model(model, parse_spec("bn"), 2, in_shape, 4)
    norms = [m for m in net.modules() if type(m).__name__ == "GroupedBatchNorm"]
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len(norms)  # every norm followed by a ReLU (pre-activation too)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())


def test_options_can_decide_the_request():
    assert parse_spec("mabn").neighbours.weight is not None
    assert parse_spec("mabn:center=0").neighbours.weight is None
    assert parse_spec("ws-gn:ws_eps=1e-3").neighbours.weight().eps == 1e-3
    assert parse_spec("cbn").neighbours.feed and parse_spec("bn").neighbours == Neighbours()
