"""The small models: BKN chain wiring, p = 0 is BN through training, and gradient
accumulation equals one grouped forward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bknbench.errors import ConfigError
from bknbench.norms.kalman import BatchKalmanNorm, Path
from bknbench.models.registry import MODELS, make_model
from bknbench.models.chain import check_chain, wire_sequence
from bknbench.norms.batch import GroupedBatchNorm
from bknbench.norms.registry import parse_spec



D = torch.float64
SHAPES = {"mlp": (1, 16), "cnn": (1, 16)}


def _model(name, spec, norm_batch=2, in_shape=None, classes=4, seed=0):
    torch.manual_seed(seed)
    return make_model(name, parse_spec(spec), norm_batch, in_shape or SHAPES[name],
                      classes).double()



def _batch(n, in_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn((n,) + tuple(in_shape), generator=g, dtype=D) + 0.5
    return x, torch.randint(0, 4, (n,), generator=g)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model"):
        make_model("nope", parse_spec("bn"), 2, (1, 16), 4)
    assert {"mlp", "cnn"} <= set(MODELS)


def test_cnn_rejects_3d_inputs():
    with pytest.raises(ConfigError, match="1-D or 2-D"):
        make_model("cnn", parse_spec("bn"), 2, (1, 4, 4, 4), 4)


@pytest.mark.parametrize("spec", ["bn", "gn", "bkn"])
def test_no_linear_or_conv_bias_before_a_norm(spec):
    m = _model("cnn", spec)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv1d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)
    m = _model("cnn", "none")
    assert all(c.bias is not None for c in m.modules() if isinstance(c, nn.Conv1d))


# ---------------------------------------------------------------- chain wiring
@pytest.mark.parametrize("name, depth, op", [("mlp", 3, nn.Linear), ("cnn", 4, nn.Conv1d)])
def test_chain_wiring(name, depth, op):
    m = _model(name, "bkn")
    mods = list(m)
    norms = [x for x in mods if isinstance(x, BatchKalmanNorm)]
    assert len(norms) == depth
    assert norms[0].prior is None
    for prev, layer in zip(norms, norms[1:]):
        assert isinstance(layer.prior, Path)
        assert layer.prior.source is prev
        between = mods[mods.index(prev) + 1:mods.index(layer)]
        assert len(layer.prior.ops) == len(between) == 2
        assert all(a is b for a, b in zip(layer.prior.ops, between))  # the same modules
        assert isinstance(between[0], nn.ReLU) and isinstance(between[1], op)


def test_wire_sequence_skips_non_bkn_norms():
    a, b = BatchKalmanNorm(3, 2), BatchKalmanNorm(3, 2)
    relu, lin, other = nn.ReLU(), nn.Linear(3, 3), GroupedBatchNorm(3, 2)
    wire_sequence([nn.Flatten(), a, relu, lin, other, b])
    assert a.prior is None
    assert b.prior.source is a and b.prior.ops == (relu, lin, other)


def test_analytic_chain_through_an_unknown_op_fails_at_build_time():
    a, b = BatchKalmanNorm(3, 2), BatchKalmanNorm(3, 2)
    seq = nn.Sequential(a, nn.MaxPool1d(2), b)
    wire_sequence(list(seq))
    with pytest.raises(ConfigError, match="sampled"):
        check_chain(seq)
    b.transition = "sampled"
    check_chain(seq)  # fine with Monte Carlo


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_posteriors_are_cleared_at_each_forward(name):
    m = _model(name, "bkn")
    norms = [x for x in m.modules() if isinstance(x, BatchKalmanNorm)]
    x, _ = _batch(8, SHAPES[name])
    m(x)
    assert all(n.posterior is not None for n in norms)
    # plant stale posteriors; when the first norm runs, the others must already be cleared
    for n in norms:
        n.posterior = "stale"
    seen = []
    norms[0].register_forward_pre_hook(lambda mod, a: seen.append([n.posterior for n in norms]))
    m(x)
    assert seen == [[None] * len(norms)]
    assert all(n.posterior is not None and n.posterior != "stale" for n in norms)
    m.eval()
    m(x)
    assert all(n.posterior is None for n in norms)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_learnable_gain_parameters_receive_gradient(name):
    # norm_batch 4: in the MLP at norm_batch 2 the guard rejects most predictions
    # (groups of 2 values give tiny s), and a rejected prediction has no gradient for the gain
    m = _model(name, "bkn:gain=learnable", norm_batch=4)
    norms = [x for x in m.modules() if isinstance(x, BatchKalmanNorm)]
    x, y = _batch(8, SHAPES[name])
    F.cross_entropy(m(x), y).backward()
    for n in norms[1:]:  # the first has no prediction to weigh
        assert n.gain_logit.grad is not None and n.gain_logit.grad.abs().item() > 0
    # gain parameters are scalars: the optimizer puts them in the no-decay group
    assert all(n.gain_logit.ndim == 0 for n in norms)


# ---------------------------------------------------------------- bkn:p=0 is bn
def _sgd_steps(model, in_shape, steps=3, lr=0.1, n=8):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    outs = []
    for k in range(steps):
        x, y = _batch(n, in_shape, seed=k)
        model.train()
        out = model(x)
        outs.append(out.detach())
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        outs.append(model(_batch(n, in_shape, seed=99)[0]))
    return outs


@pytest.mark.parametrize("name, in_shape, spec", [
    ("mlp", (1, 16), "bkn:p=0"),
    ("mlp", (1, 16), "bkn:p=0,transition=sampled"),
    ("cnn", (1, 16), "bkn:p=0"),
    ("cnn", (1, 16), "bkn:p=0,transition=sampled"),
    ("cnn", (1, 16), "bkn:p=0,propagate=output"),
    ("cnn", (1, 6, 6), "bkn:p=0"),
    ("cnn", (1, 6, 6), "bkn:p=0,transition=sampled"),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_bkn_with_p0_is_bn_through_training_and_eval(name, in_shape, spec):
    bn = _model(name, "bn", in_shape=in_shape)
    bkn = _model(name, spec, in_shape=in_shape)
    # same init (same seed, same parameter order)
    for (k, a), (k2, b) in zip(bn.state_dict().items(), bkn.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    for a, b in zip(_sgd_steps(bn, in_shape), _sgd_steps(bkn, in_shape)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    for (k, a), (_, b) in zip(bn.state_dict().items(), bkn.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=k)


def test_bkn_default_differs_from_bn():
    """The control for the test above: with p = 0.9 the chain changes the outputs."""
    bn = _model("cnn", "bn")
    bkn = _model("cnn", "bkn")
    x, _ = _batch(8, SHAPES["cnn"])
    assert not torch.allclose(bn(x), bkn(x), atol=1e-3)


# ---------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("name, in_shape", [("mlp", (1, 16)), ("cnn", (1, 16))])
@pytest.mark.parametrize("b, k", [(2, 4), (4, 2)])
def test_accumulation_equals_grouped_forward(name, in_shape, b, k):
    """bn-accum: one forward of k*b samples with per-b statistics and the mean loss has the
    gradients of k micro-batch passes of bn with loss / k each, accumulated."""
    accum = _model(name, "bn-accum", norm_batch=b, in_shape=in_shape)
    loop = _model(name, "bn", norm_batch=b, in_shape=in_shape)
    loop.load_state_dict(accum.state_dict())
    x, y = _batch(k * b, in_shape, seed=3)
    F.cross_entropy(accum(x), y).backward()
    for i in range(k):
        sl = slice(i * b, (i + 1) * b)
        (F.cross_entropy(loop(x[sl]), y[sl]) / k).backward()
    for (n, pa), (_, pl) in zip(accum.named_parameters(), loop.named_parameters()):
        assert pa.grad is not None and pa.grad.abs().sum() > 0, n
        torch.testing.assert_close(pa.grad, pl.grad, rtol=1e-6, atol=1e-12, msg=n)
    for (n, ba), (_, bl) in zip(accum.named_buffers(), loop.named_buffers()):
        if n.endswith("num_batches_tracked"):
            continue  # one forward vs k forwards
        torch.testing.assert_close(ba, bl, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("spec", ["bkn", "bkn:transition=sampled,draws=2", "bn-accum"])
def test_compiled_model_equals_eager(spec):
    """Under torch.compile the fused nodes give way to the reference functions (which the
    compiler fuses): same outputs and gradients as eager. aot_eager traces the model as
    --compile does, without generating C++ code."""
    torch._dynamo.reset()
    eager = _model("cnn", spec, norm_batch=2)
    compiled = _model("cnn", spec, norm_batch=2)
    compiled.load_state_dict(eager.state_dict())
    x, y = _batch(8, SHAPES["cnn"], seed=4)
    torch.manual_seed(0)  # the sampled transition draws noise: the same draws in both
    F.cross_entropy(eager(x), y).backward()
    torch.manual_seed(0)
    F.cross_entropy(torch.compile(compiled, backend="aot_eager")(x), y).backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-7, atol=1e-9, msg=n)
    for (n, a), (_, b) in zip(eager.named_buffers(), compiled.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=n)
