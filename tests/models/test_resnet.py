"""Pre-activation CIFAR ResNets: build, train/eval passes for every kind of normalizer, the
BKN chain through residual blocks, and the shortcut's moments (alignment, Monte Carlo)."""
import pytest
import torch

import bknbench.models.resnet as resnet
from bknbench.norms.kalman import BatchKalmanNorm, Path, SumPrior
from bknbench.models.registry import MODELS, make_model
from bknbench.kernels.fused import group_moments
from bknbench.norms.registry import parse_spec

SHAPE = (3, 32, 32)


def _model(spec, depth=20, norm_batch=2, classes=10, seed=0):
    torch.manual_seed(seed)
    return make_model(f"resnet{depth}", parse_spec(spec), norm_batch, SHAPE, classes)


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _expected_params(n, classes=10):
    """Conv kernels + 2 affine params per norm channel + the classifier, by hand."""
    convs = 3 * 16 * 9  # stem
    norms = [16]  # stem
    c_in = 16
    for stage, c in enumerate((16, 32, 64)):
        for k in range(n):
            convs += (c_in * c + c * c) * 9
            if not (stage == 0 and k == 0):
                norms.append(c_in)  # norm1
            norms.append(c)  # norm2
            c_in = c
    norms.append(64)  # final
    return convs + 2 * sum(norms) + 64 * classes + classes


@pytest.mark.parametrize("depth, n", [(20, 3), (32, 5), (56, 9), (110, 18)])
def test_registered_depths_have_the_expected_parameters(depth, n):
    assert f"resnet{depth}" in MODELS
    m = _model("bn", depth)
    assert _params(m) == _expected_params(n)
    assert len(m.blocks) == 3 * n
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) + 1 == depth  # depth counts the convs and the classifier
    assert all(c.bias is None for c in convs)


def test_resnet20_bn_is_about_027m_parameters():
    assert abs(_params(_model("bn")) - 0.27e6) < 0.005e6


def test_conv_bias_only_without_norm():
    m = _model("none")
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert all(c.bias is not None for c in convs)


@pytest.mark.parametrize("spec", ["bn", "gn", "bkn", "bkn:transition=sampled", "none", "brn",
                                  "mabn", "cbn", "frn", "evonorm-b0", "evonorm-s0", "ws-gn"])
def test_train_and_eval_passes(spec):
    m = _model(spec)
    x = torch.randn(8, *SHAPE)
    y = torch.randint(0, 10, (8,))
    m.train()
    out = m(x)
    assert out.shape == (8, 10)
    torch.nn.functional.cross_entropy(out, y).backward()
    # FRN's learned eps serves maps of one position only: unused (no gradient) here
    grads = [p.grad for n, p in m.named_parameters() if not n.endswith("eps_l")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    stem = m.stem_conv  # a parametrized weight (ws-gn, mabn) is computed from `original`
    w = stem.parametrizations.weight.original if hasattr(stem, "parametrizations") else stem.weight
    assert w.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("stream", ["authors", "posterior"])
def test_bkn_chain_is_wired_through_the_blocks(stream):
    m = _model(f"bkn:stream={stream}")
    assert m.stem_norm.prior is None
    b0, b1 = m.blocks[0], m.blocks[1]
    assert b0.norm1 is None
    assert b0.norm2.prior.source is m.stem_norm
    assert b0.norm2.prior.ops == (m.stem_relu, b0.conv1)
    assert b1.norm2.prior.source is b1.norm1
    assert b1.norm2.prior.ops == (b1.relu1, b1.conv1)
    for prev, blk in zip(m.blocks[:-1], m.blocks[1:]):
        term, branch = blk.norm1.prior.terms
        assert branch.source is prev.norm2 and branch.ops == (prev.relu2, prev.conv2)
        if prev.first and stream == "authors":  # the stem's raw posterior, no ReLU
            assert (term.source, term.ops, term.tap) == (m.stem_norm, (prev.shortcut,), "input")
        elif prev.first:  # x = ReLU(stem output)
            assert term.source is m.stem_norm and term.ops == (m.stem_relu, prev.shortcut)
        elif stream == "authors":  # the prediction that fed prev.norm1, padded, not pooled
            assert (term.source, term.tap) == (prev.norm1, "prediction")
            assert isinstance(term.ops[0], resnet.PaddedStream)
            assert term.ops[0].shortcut is prev.shortcut
        else:
            assert (term.source, term.ops, term.tap) == (prev.norm1, (prev.shortcut,), "input")
    # the final norm sees the last block's sum, as the authors' knlast does
    last = m.blocks[-1]
    term, branch = m.final_norm.prior.terms
    assert isinstance(m.final_norm.prior, SumPrior)
    assert term.source is last.norm1 and branch.source is last.norm2
    priors = [x.prior for x in m.modules() if isinstance(x, BatchKalmanNorm)]
    assert sum(p is None for p in priors) == 1  # only the stem


def test_bkn_with_p0_is_grouped_bn():
    x = torch.randn(8, *SHAPE)
    a, b = _model("bn"), _model("bkn:p=0")
    assert torch.allclose(a(x), b(x), atol=1e-5)


def test_shortcut_moments_keep_groups_aligned():
    sc = resnet.Shortcut(4, 8, stride=2)
    g = 3
    mean = torch.arange(g * 4, dtype=torch.float32).view(g, 4) + 1.0  # all nonzero
    var = 10.0 * mean
    m, v, shape = sc.moments(mean, var, (5, 4))
    assert m.shape == v.shape == (g, 8) and shape == (2, 2)
    lo, hi = sc.lo, sc.lo + 4
    assert (lo, hi) == (2, 6)  # zeros on both sides, as the authors pad
    for k in range(g):  # padded channels are exactly 0 in every group
        assert torch.all(m[k, :lo] == 0) and torch.all(m[k, hi:] == 0)
        assert torch.all(v[k, :lo] == 0) and torch.all(v[k, hi:] == 0)
        assert torch.equal(m[k, lo:hi], mean[k])  # group k's own channels
        assert torch.equal(v[k, lo:hi], var[k] / 4)


def test_shortcut_moments_match_the_module_on_real_groups():
    # the same alignment against the tensor op itself: group means of shortcut(x) for
    # G = 4 groups with very different statistics equal the predicted means exactly
    sc = resnet.Shortcut(16, 32, stride=2)
    scale = torch.tensor([1.0, 3.0, 0.5, 7.0]).repeat_interleave(2)
    shift = torch.tensor([-2.0, 0.0, 5.0, 1.0]).repeat_interleave(2)
    x = torch.randn(8, 16, 8, 8) * scale[:, None, None, None] + shift[:, None, None, None]
    mean, var = group_moments(x, 4)
    out_mean, out_var = group_moments(sc(x), 4)
    pred_mean, pred_var, _ = sc.moments(mean, var, (8, 8))
    assert torch.allclose(out_mean, pred_mean, atol=1e-5)
    pad = torch.ones(32, dtype=torch.bool)
    pad[sc.lo:sc.lo + 16] = False
    assert torch.all(out_var[:, pad] == 0) and torch.all(pred_var[:, pad] == 0)


def test_shortcut_moments_match_monte_carlo():
    torch.manual_seed(0)
    sc = resnet.Shortcut(6, 12, stride=2)
    g, draws = 2, 4000
    mean = torch.randn(g, 6)
    var = torch.rand(g, 6) + 0.2
    z = mean[:, None, :, None, None] + var.sqrt()[:, None, :, None, None] * torch.randn(
        g, draws, 6, 4, 4)
    out = sc(z.reshape(g * draws, 6, 4, 4))  # called as a module, as sampled mode does
    mc_mean, mc_var = group_moments(out, g)
    pm, pv, _ = sc.moments(mean, var, (4, 4))
    assert torch.allclose(mc_mean, pm, atol=0.02)
    assert torch.allclose(mc_var, pv, rtol=0.05, atol=1e-6)


@pytest.mark.parametrize("transition", ["analytic", "sampled"])
def test_shortcut_path_prediction_per_group(transition):
    # after a forward pass, the stream term of a stage's first block predicts, per group,
    # the posterior of the previous norm1 pooled and padded: zeros in padded channels
    m = _model(f"bkn:transition={transition}")
    x = torch.randn(8, *SHAPE) * torch.linspace(0.5, 4, 8)[:, None, None, None]
    m(x)
    n = len(m.blocks) // 3
    blk = m.blocks[n]  # the first block of stage 2: 16 -> 32 channels, stride 2
    stream = Path(blk.norm1, (blk.shortcut,), tap="input")
    pm, pv = stream.predict("raw", transition, 64)
    post = blk.norm1.posterior
    assert pm.shape == (4, 32)
    lo = blk.shortcut.lo
    assert torch.all(pm[:, :lo] == 0) and torch.all(pm[:, lo + 16:] == 0)
    assert torch.all(pv[:, :lo] == 0) and torch.all(pv[:, lo + 16:] == 0)
    # sampled: 64 draws x 16 x 16 positions per group, so a few percent of error
    tol = 1e-6 if transition == "analytic" else 0.05
    sd = float(post.var.detach().sqrt().max())
    assert torch.allclose(pm[:, lo:lo + 16], post.mu, atol=tol * sd)
    assert torch.allclose(pv[:, lo:lo + 16], post.var / 4, rtol=2 * tol, atol=1e-6)


def test_rejects_non_image_inputs():
    from bknbench.errors import ConfigError
    with pytest.raises(ConfigError, match="resnet20 needs images"):
        make_model("resnet20", parse_spec("bn"), 2, (1, 40), 10)


@pytest.mark.parametrize("transition", ["analytic", "sampled"])
def test_chain_predicts_the_observed_statistics(transition):
    # the wiring checked by its numbers: with propagate=output (the moments of what each
    # norm actually hands on) and the posterior stream, every prediction at init, including
    # the sums through the shortcuts and the padded channels, matches the statistics the
    # layer then observes
    torch.manual_seed(0)
    m = _model(f"bkn:propagate=output,transition={transition},stream=posterior")
    m(torch.randn(16, *SHAPE))
    for layer in m.norms()[1:]:
        with torch.no_grad():
            mh, vh = layer.prior.predict("output", transition, layer.draws_for(),
                                         layer.borders)
        post = layer.posterior
        sd = post.s.sqrt().mean()
        assert (mh - post.m).abs().mean() < 0.25 * sd
        assert 0.75 < float((vh / post.s.detach()).mean()) < 1.3


# ---------------------------------------------------------------- the residual stream
def test_authors_stream_adds_the_prediction_passed_into_the_block():
    """stream=authors (cifar-kn-microbatch.py returns m + m3, v + v3, m and v what entered
    the block): a block's stream term is the prediction that fed its norm1, padded, its
    variance not divided at a stride-2 shortcut; the first block's is the stem's raw
    posterior (no ReLU)."""
    m = _model("bkn:stream=authors")
    m(torch.randn(8, *SHAPE))
    n = len(m.blocks) // 3
    stage_start, inner = m.blocks[n], m.blocks[1]
    # after the first block: the stem's raw posterior (no ReLU)
    pm, pv = m.blocks[1].norm1.prior.terms[0].predict("raw", "analytic", 0)
    post = m.stem_norm.posterior
    assert torch.equal(pm, post.mu) and torch.equal(pv, post.var)
    # the stage's first block: the prediction of its norm1, padded, variance kept
    term = m.blocks[n + 1].norm1.prior.terms[0]
    pm, pv = term.predict("raw", "analytic", 0)
    pred = stage_start.norm1.posterior
    lo = stage_start.shortcut.lo
    assert torch.equal(pm[:, lo:lo + 16], pred.mu_hat) and torch.equal(pv[:, lo:lo + 16],
                                                                        pred.var_hat)
    assert torch.all(pm[:, :lo] == 0) and torch.all(pv[:, lo + 16:] == 0)
    # an inner block: the prediction that fed its norm1, as it is
    pm, pv = m.blocks[2].norm1.prior.terms[0].predict("raw", "analytic", 0)
    assert torch.equal(pm, inner.norm1.posterior.mu_hat)
    assert not torch.equal(pm, inner.norm1.posterior.mu)  # not the posterior


@pytest.mark.parametrize("stream, divided", [("authors", False), ("posterior", True)])
def test_stride2_variance_rule_follows_the_stream(stream, divided):
    m = _model(f"bkn:stream={stream}")
    m(torch.randn(8, *SHAPE))
    n = len(m.blocks) // 3
    start = m.blocks[n]
    term = m.blocks[n + 1].norm1.prior.terms[0]
    _, pv = term.predict("raw", "analytic", 0)
    post = start.norm1.posterior
    source = post.var if stream == "posterior" else post.var_hat
    lo = start.shortcut.lo
    torch.testing.assert_close(pv[:, lo:lo + 16], source / 4 if divided else source)


@pytest.mark.parametrize("stream", ["authors", "posterior"])
def test_sampled_transition_passes_the_shortcut_exactly(stream):
    """transition=sampled: the shortcut's term (parameter-free, exact moments) is not drawn;
    two predictions agree exactly and equal the analytic one, the branch term is drawn."""
    m = _model(f"bkn:transition=sampled,stream={stream}")
    m(torch.randn(8, *SHAPE))
    layer = m.blocks[len(m.blocks) // 3 + 1].norm1
    stream_term, branch = layer.prior.terms
    a = stream_term.predict("raw", "sampled", 1)
    b = stream_term.predict("raw", "sampled", 1)
    c = stream_term.predict("raw", "analytic", 0)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    first_a = branch.predict("raw", "sampled", 1)[1]
    assert not torch.equal(first_a, branch.predict("raw", "sampled", 1)[1])


@pytest.mark.parametrize("size", [2, 4, 5, 8, 32])
def test_shortcut_pooling_rule_equals_the_exact_border_rule(size):
    """The shortcut's variance / 4 is the exact rule for its 2x2 average pooling (full
    windows in floor mode, no padding), which tests/norms/test_borders.py holds to Monte
    Carlo; the spatial shape it hands on is the pooled map's."""
    from bknbench.norms.transitions import op_moments

    sc = resnet.Shortcut(3, 3, stride=2)
    mean, var = torch.randn(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    m, v, shape = sc.moments(mean, var, (size, size))
    m_x, v_x, shape_x = op_moments(torch.nn.AvgPool2d(2), mean, var, (size, size))
    torch.testing.assert_close(m, m_x, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v, v_x, rtol=1e-14, atol=1e-14)
    assert shape == shape_x == sc(torch.zeros(1, 3, size, size)).shape[2:]


# ---------------------------------------------------------------- the authors' padding, flat stream
def test_tf_same_pads():
    assert resnet.tf_same_pads((8, 8), (3, 3), (2, 2)) == ((0, 1), (0, 1))
    assert resnet.tf_same_pads((5,), (3,), (2,)) == ((1, 1),)
    assert resnet.tf_same_pads((8,), (3,), (1,)) == ((1, 1),)


def test_padding_tf_pads_stride_2_after_the_map():
    torch.manual_seed(0)
    conv = resnet.conv3x3(4, 8, 2, padding="tf")
    x = torch.randn(2, 4, 8, 8)
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), conv.weight,
                                      stride=2)
    torch.testing.assert_close(conv(x), want)
    assert isinstance(resnet.conv3x3(4, 8, 1, padding="tf"), torch.nn.Conv2d)  # same as torch
    model = make_model("resnet20:padding=tf", parse_spec("bn"), 2, (3, 8, 8), 10)
    assert sum(isinstance(m, resnet.SamePadConv2d) for m in model.modules()) == 2


def test_analytic_transition_sees_the_tf_padding():
    from bknbench.kernels.reference import conv_moments_by_maps
    from bknbench.norms.transitions import op_moments
    torch.manual_seed(0)
    conv = resnet.conv3x3(3, 5, 2, padding="tf")
    mean, var = torch.randn(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    conv = conv.double()
    got = op_moments(conv, mean, var, (8, 8))
    want = conv_moments_by_maps(mean, var, (8, 8), conv.weight, None, (2, 2),
                                ((0, 1), (0, 1)), (1, 1))
    torch.testing.assert_close(got[:2], want)
    assert got[2] == (4, 4)


def test_flat_stream_padding_moves_channels_across_groups():
    sc = resnet.Shortcut(2, 4, stride=2)
    mean = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (G=2, C=2)
    flat = sc.moments(mean, mean, (4, 4), pool_variance=False, flat=True)[0]
    # the authors: pad the flat [1, 2, 3, 4] by C G / 2 = 2 each side, cut into 2 groups of 4
    torch.testing.assert_close(flat, torch.tensor([[0.0, 0.0, 1.0, 2.0], [3.0, 4.0, 0.0, 0.0]]))
    aligned = sc.moments(mean, mean, (4, 4), pool_variance=False)[0]
    torch.testing.assert_close(aligned, torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 3.0, 4.0, 0.0]]))
