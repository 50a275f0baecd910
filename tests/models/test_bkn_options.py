"""Every option of bkn reaches every BKN layer of the MLP and the CNNs (1-D and 2-D), and the
options of the prediction reach the transition each forward calls."""
import pytest
import torch

from bknbench.models.registry import make_model
from bknbench.norms.kalman import BatchKalmanNorm, Path
from bknbench.norms.registry import parse_spec

# one value other than the default for each option
OTHER = {"p": 0.5, "gain": "adaptive", "n0": 10.0, "transition": "sampled", "draws": 3,
         "propagate": "output", "guard": 50.0, "guard_scope": "group", "running": "posterior",
         "borders": "ignore", "stream": "posterior", "eps": 1e-3, "momentum": 0.2,
         # the authors' behaviours (bkn-authors)
         "running_groups": "first", "stem_var": "unbiased", "stem_grad": "stopped",
         "shortcut_pad": "flat", "one_value": "allow"}
PREDICT = ("propagate", "transition", "draws", "borders")  # Path.predict's arguments, in order
STORED = {"one_value": ("min_values", 1)}  # attribute and value where not the option's own
WITH = {"draws": {"transition": "sampled"}}  # draws count only for the sampled transition
FAMILIES = [("mlp", (1, 16)), ("cnn", (1, 16)), ("cnn", (2, 6, 6))]


def test_every_option_is_listed():
    options = parse_spec("bkn").entry.options
    assert set(OTHER) == set(options)
    assert all(options[k].default != v for k, v in OTHER.items())


@pytest.mark.parametrize("model, in_shape", FAMILIES, ids=lambda v: str(v))
@pytest.mark.parametrize("option", list(OTHER))
def test_the_option_reaches_every_layer_and_the_transition(model, in_shape, option,
                                                           monkeypatch):
    given = {**WITH.get(option, {}), option: OTHER[option]}
    spec = "bkn:" + ",".join(f"{k}={v}" for k, v in given.items())
    torch.manual_seed(0)
    net = make_model(model, parse_spec(spec), 2, in_shape, 4).double()
    layers = [m for m in net.modules() if isinstance(m, BatchKalmanNorm)]
    assert len(layers) >= 2
    stored = {k: STORED.get(k, (k, v)) for k, v in given.items()}
    assert all(getattr(layer, name) == value for layer in layers
               for name, value in stored.values())
    calls = []
    real = Path.predict
    monkeypatch.setattr(Path, "predict", lambda self, *a: calls.append(a) or real(self, *a))
    net(torch.randn((8,) + in_shape, dtype=torch.float64))
    assert len(calls) == len(layers) - 1  # every layer but the first predicts
    want = {"propagate": "raw", "transition": "analytic", "draws": 0, "borders": "exact"}
    want.update((k, v) for k, v in given.items() if k in want)
    if want["transition"] == "sampled" and not want["draws"]:  # auto: 1 with positions, else 16
        want["draws"] = 16 if model == "mlp" else 1
    assert all(call == tuple(want[k] for k in PREDICT) for call in calls), calls
