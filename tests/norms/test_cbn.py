"""Cross-Iteration BN: the closed-form weight gradients against autograd; the compensated
window statistics against an explicit computation with autograd over the stored iterations;
dropping; window 0 and the burn-in are BN; a checkpointed run resumes its rings."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

from bknbench.config import RunConfig
from bknbench.data.registry import load_dataset
from bknbench.models.registry import make_model
from bknbench.norms.cbn import weight_moments
from bknbench.norms.probe import Probe
from bknbench.norms.registry import parse_spec
from bknbench.train import train_run

D = torch.float64
C = 3


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=g, dtype=D) + 0.5


FEEDS = {
    "linear": (lambda: nn.Linear(5, C, bias=False), (4, 5)),
    "conv1d": (lambda: nn.Conv1d(2, C, 3, stride=2, padding=1, bias=False), (4, 2, 9)),
    "conv2d": (lambda: nn.Conv2d(2, C, 3, padding=2, dilation=2, bias=False), (4, 2, 5, 4)),
}


def _moments(feed, x_in, w, offset=0.0):
    """Per-channel mean and mean square of feed's output at weight w (plus an offset)."""
    y = F.linear(x_in, w) if isinstance(feed, nn.Linear) else feed._conv_forward(x_in, w, None)
    y = y + offset
    dims = [0] + list(range(2, y.dim()))
    return y.mean(dims), y.square().mean(dims)


@pytest.mark.parametrize("kind", FEEDS)
@pytest.mark.parametrize("groups", [1, 2])
def test_closed_form_weight_gradients_equal_autograd(kind, groups):
    make, shape = FEEDS[kind]
    feed = make().double()
    x_in = _x(shape)
    y = feed(x_in) + 0.7  # a term without W (a residual branch) is allowed
    pmean, gnu = weight_moments(feed, x_in, y, groups)
    b = shape[0] // groups
    for g in range(groups):
        sl = slice(g * b, (g + 1) * b)
        j_mu, j_nu = jacobian(lambda w: _moments(feed, x_in[sl], w, 0.7), feed.weight.detach())
        j_mu, j_nu = j_mu.reshape(C, C, -1), j_nu.reshape(C, C, -1)
        for c in range(C):  # row c of each Jacobian: the only non-zero one for channel c
            torch.testing.assert_close(pmean[g], j_mu[c, c], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gnu[g, c], j_nu[c, c], rtol=1e-10, atol=1e-12)


class Explicit:
    """The paper's window, computed plainly: each stored iteration's (x_in, W), its mean
    and mean square as functions of W, differentiated by autograd at the stored W and
    expanded to the current W."""

    def __init__(self, feed, window):
        self.feed, self.window, self.stored = feed, window, []

    def statistics(self, x_in, w_now):
        mu_t, nu_t = _moments(self.feed, x_in, w_now)
        sum_mu, sum_nu, count = mu_t.clone(), nu_t.clone(), torch.ones(C, dtype=D)
        for x_tau, w_tau in self.stored[-self.window:]:
            f = lambda w: _moments(self.feed, x_tau, w)  # noqa: E731
            (mu, nu), (j_mu, j_nu) = f(w_tau), jacobian(f, w_tau)
            delta = (w_now - w_tau).reshape(1, -1)
            mu = mu + (j_mu.reshape(C, -1) * delta).sum(1)
            nu = nu + (j_nu.reshape(C, -1) * delta).sum(1)
            keep = (nu - mu * mu >= 0).to(D)
            sum_mu, sum_nu, count = sum_mu + keep * mu, sum_nu + keep * nu, count + keep
        mean = sum_mu / count
        return mean, sum_nu / count - mean * mean


@pytest.mark.parametrize("kind", FEEDS)
def test_window_statistics_equal_the_explicit_computation(kind):
    make, shape = FEEDS[kind]
    torch.manual_seed(0)
    feed = make().double()
    norm = parse_spec("cbn:window=3,burnin=0").build(C, shape[0]).double()
    norm.attach(feed)
    opt = torch.optim.SGD(list(feed.parameters()) + list(norm.parameters()), lr=0.05)
    ref = Explicit(feed, 3)
    for step in range(6):
        x_in = _x(shape, seed=step)
        w_now = feed.weight.detach().clone()
        norm.probe = Probe("train")
        norm(feed(x_in))
        used_mu, used_var = norm.probe.stats["used"]
        norm.probe = None
        mu, var = ref.statistics(x_in, w_now)
        torch.testing.assert_close(used_mu[0], mu, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(used_var[0], var, rtol=1e-9, atol=1e-11)
        y = norm(feed(x_in))
        view = (1, C) + (1,) * (y.dim() - 2)
        expected = (norm.weight.view(view) * (feed(x_in) - mu.view(view))
                    / torch.sqrt(var + norm.eps).view(view) + norm.bias.view(view))
        torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)
        ref.stored.append((x_in, w_now))
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()  # the weights move: the compensation has work to do
    assert (feed.weight.detach() - ref.stored[0][1]).abs().max() > 1e-3


def test_gradient_flows_through_the_current_micro_batch_only():
    feed = nn.Linear(5, C, bias=False).double()
    norm = parse_spec("cbn:window=2,burnin=0").build(C, 4).double()
    norm.attach(feed)
    for step in range(3):
        norm(feed(_x((4, 5), seed=step)))
    x = _x((4, 5), seed=9).requires_grad_()
    norm.probe = Probe("train")
    y = norm(feed(x))
    mu, var = norm.probe.stats["used"]
    norm.probe = None
    up = _x((4, C), seed=3)
    (y * up).sum().backward()
    g_ours = x.grad.clone()
    x.grad = None
    # the window as constants plus the current statistics with their gradient, weight 1/3
    h = feed(x)
    m, nu = h.mean(0), h.square().mean(0)
    past_mu, past_nu = 3 * mu[0] - m.detach(), 3 * (var[0] + mu[0] ** 2) - nu.detach()
    mean = (past_mu + m) / 3
    v = (past_nu + nu) / 3 - mean ** 2
    (((h - mean) / torch.sqrt(v + norm.eps) * norm.weight + norm.bias) * up).sum().backward()
    torch.testing.assert_close(g_ours, x.grad, rtol=1e-9, atol=1e-11)


def test_a_past_entry_with_negative_compensated_variance_is_dropped():
    norm = parse_spec("cbn:window=2,burnin=0").build(C, 4).double()
    with torch.no_grad():
        norm.ring_mu.copy_(torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        norm.ring_nu.copy_(torch.tensor([[1.0, 2.0, 2.0], [2.0, 2.0, 2.0]]))  # 1 < 5^2
        norm.ring_kept.fill_(True)
    _, _, kept = norm.past(D)
    assert kept.tolist() == [[False, True, True], [True, True, True]]
    x = _x((4, C))
    norm.probe = Probe("train")
    norm(x)
    mu, _ = norm.probe.stats["used"]
    torch.testing.assert_close(mu[0, 0], x[:, 0].mean() / 2)  # one past (mu 0) + the current
    torch.testing.assert_close(mu[0, 1], x[:, 1].mean() / 3)


def _sgd(model, steps=4, n=8):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for k in range(steps):
        x, y = _x((n, 1, 16), seed=k), torch.arange(n) % 4
        out = model(x)
        outs.append(out.detach())
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        opt.step()
    model.eval()
    outs.append(model(_x((n, 1, 16), seed=99)).detach())
    return outs


@pytest.mark.parametrize("spec", ["cbn:window=0", "cbn:burnin=1,total=100"])
def test_window_0_and_the_burn_in_are_batchnorm_through_training(spec):
    torch.manual_seed(0)
    bn = make_model("cnn", parse_spec("bn"), 2, (1, 16), 4).double()
    torch.manual_seed(0)
    cbn = make_model("cnn", parse_spec(spec), 2, (1, 16), 4).double()
    for a, b in zip(_sgd(bn), _sgd(cbn)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_the_window_changes_training():  # the control for the test above
    torch.manual_seed(0)
    bn = make_model("cnn", parse_spec("bn"), 2, (1, 16), 4).double()
    torch.manual_seed(0)
    cbn = make_model("cnn", parse_spec("cbn:burnin=0"), 2, (1, 16), 4).double()
    assert not torch.allclose(_sgd(bn)[2], _sgd(cbn)[2], atol=1e-3)


@pytest.mark.parametrize("model, in_shape", [("mlp", (1, 16)), ("cnn", (2, 8, 8)),
                                             ("resnet20", (3, 8, 8))])
def test_each_cbn_is_attached_to_the_layer_feeding_it(model, in_shape):
    net = make_model(model, parse_spec("cbn"), 2, in_shape, 4)
    norms = [m for m in net.modules() if type(m).__name__ == "CrossIterationBatchNorm"]
    feeds = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    if model == "resnet20":  # stem conv, then per block conv1 -> norm2, conv2 -> next norm1
        expected = [net.stem_conv] + [b.conv1 for b in net.blocks[:1]]
        assert [n.feed for n in [net.stem_norm, net.blocks[0].norm2]] == expected
        assert net.blocks[1].norm1.feed is net.blocks[0].conv2
        assert net.final_norm.feed is net.blocks[-1].conv2
    else:
        assert [n.feed for n in norms] == feeds
    assert all(n.feed is not None for n in norms)
    assert len({id(n.feed) for n in norms}) == len(norms)


def test_checkpointed_run_resumes_the_window(tmp_path):
    """Interrupted after epoch 2 of 3 and resumed from the checkpoint: every metric equals
    the uninterrupted run's (the rings, the counter and the running statistics resume)."""
    data = load_dataset("synthetic")
    cfg = RunConfig(spec="cbn:burnin=0.1", dataset="synthetic", model="cnn", norm_batch=8,
                    sgd_batch=8, epochs=3, base_lr=0.2)
    full = train_run(cfg, data)
    assert full.status == "ok"
    ckpt = tmp_path / "run.pt"

    def interrupt(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, data, on_epoch=interrupt, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)["model"]
    # one epoch of 461 training samples (synthetic less its validation split) in 8s: 57
    assert int(state["1.micro_batches"]) == 57 and bool(state["1.ring_kept"].all())
    resumed = train_run(cfg, data, checkpoint=ckpt)
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in resumed.epochs] == [[r[k] for k in keys]
                                                              for r in full.epochs]


def test_weight_init_one_as_bn_or_uniform_as_the_reference():
    """The reference's CBN layer draws its weight from U(0, 1) (nn.init.uniform_); the
    default starts at 1, as bn, so that cbn against bn is the method alone."""
    assert torch.equal(parse_spec("cbn").build(64, 2).weight.detach(), torch.ones(64))
    torch.manual_seed(3)
    layer = parse_spec("cbn:weight_init=uniform").build(64, 2)
    torch.manual_seed(3)
    assert torch.equal(layer.weight.detach(), torch.rand(64))  # U(0, 1), one draw each
    assert torch.equal(layer.bias.detach(), torch.zeros(64))
