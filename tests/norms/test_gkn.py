"""Group Kalman Normalization: p=0 is GroupNorm; the fusion is per sample, in both modes."""
import torch

from bknbench.models.registry import make_model
from bknbench.norms.registry import parse_spec


def build(spec, model="cnn", seed=0):
    torch.manual_seed(seed)
    return make_model(model, parse_spec(spec), 2, (1, 40), 10).double()


def test_gkn_p0_is_gn_in_both_modes():
    x = torch.randn(6, 1, 40, dtype=torch.float64) * 3 + 1
    for model in ("cnn", "mlp"):
        gn, gkn = build("gn", model), build("gkn:p=0", model)
        for mode in (True, False):
            gn.train(mode), gkn.train(mode)
            torch.testing.assert_close(gkn(x), gn(x), rtol=1e-10, atol=1e-10)


def test_gkn_fuses_and_is_batch_independent():
    x = torch.randn(6, 1, 40, dtype=torch.float64) * 3 + 1
    gn, gkn = build("gn"), build("gkn:p=0.9")
    assert (gkn(x) - gn(x)).abs().max() > 1e-3  # the prediction changes the statistics
    whole = gkn(x)
    for i in range(len(x)):  # per sample: no other sample in the batch matters
        torch.testing.assert_close(gkn(x[i:i + 1]), whole[i:i + 1])
    gkn.eval()
    torch.testing.assert_close(gkn(x), whole)  # eval computes what training computes


def test_gkn_sampled_is_deterministic_in_eval():
    x = torch.randn(4, 1, 40)
    m = build("gkn:transition=sampled").float().eval()
    torch.testing.assert_close(m(x), m(x))
