"""The figures behind the README's table of BKN departures: correctness, not speed.

    python benchmarks/bkn_departures.py [--quick]

Seeded, CPU, float64, about a minute (--quick: fewer Monte Carlo draws). Sections:
  running   running variance / true variance after 2048 EMA updates (momentum 0.01), (N, C)
            Gaussian input, a right prediction, guard off (to isolate the rule), per rule;
            and eval output scale / training output scale = sqrt(E[posterior] / running)
  borders   ReLU -> 3x3 conv (padding 1, 16 -> 16 channels, default init) against Monte
            Carlo over all positions: worst channel's mean error (output sd) and variance
            error, per map size and rule; then the cnn on digits at init
            (propagate=output, one statistics group of 512 samples): per chained layer the
            mean |m - mu_hat| / sd over channels and the typical factor between var_hat and
            s, exp(mean |log(var_hat / s)|)
  stream    resnet20 at init on Gaussian images (propagate=output, one group of 32): per
            norm1 the mean |m - mu_hat| / sd, by stream rule; and the variance a stride-2
            shortcut keeps, var(avgpool2(x)) / var(x), at the two stage starts
  sampled   the old sampled stream term through a stride-2 shortcut on a 4x4 map, 1 draw,
            64 groups: relative variance error over channels (now passed exactly: 0); and
            the sampled transition's own noise through ReLU -> conv3x3 (1 draw, the auto
            setting on maps) against the exact analytic moments
  guard     mlp on mnist1d at init, micro-batch 2 (64 groups of 2), 20 forwards: per
            chained layer, forwards whose prediction the layer-scope guard kept, and the
            share of groups kept with guard_scope=group
  raw       cnn on mnist1d at init, one group of 512: mean var_hat / s per chained layer,
            propagate=raw vs output
  alignment the authors' padding of the flattened (64 groups x 16 channels) statistics at a
            16 -> 32 shortcut: the share of real statistics that land in their own group
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bknbench.data.registry import load_dataset  # noqa: E402
from bknbench.kernels.fused import group_moments  # noqa: E402
from bknbench.models.registry import make_model  # noqa: E402
from bknbench.norms.kalman import BatchKalmanNorm  # noqa: E402
from bknbench.norms.registry import parse_spec  # noqa: E402
from bknbench.norms.transitions import chain_rules, sampled_moments  # noqa: E402

D = torch.float64


def running(quick: bool) -> None:
    class Truth:
        def predict(self, *args):
            return torch.zeros(64, 512, dtype=D), torch.ones(64, 512, dtype=D)

    for b in (2, 4):
        for p in (0.5, 0.9):
            row = []
            for rule in ("posterior", "authors", "observed"):
                torch.manual_seed(0)
                layer = BatchKalmanNorm(512, b, p=p, running=rule, guard=1e30,
                                        momentum=0.01).double()
                layer.prior = Truth()
                layer.running_var.fill_(3.0)
                used = 0.0
                for _ in range(32):
                    layer(torch.randn(64 * b, 512, dtype=D))
                    used += layer.posterior.var.mean().item() / 32
                r = layer.running_var.mean().item()
                row.append(f"{rule} {r:.3f} (eval/train {math.sqrt(used / r):.2f})")
            print(f"running  b={b} p={p}: " + "; ".join(row))


def _mc(ops, mean, var, shape, draws):
    view = (1, mean.shape[1]) + (1,) * len(shape)
    z = mean.view(view) + var.sqrt().view(view) * torch.randn((draws, mean.shape[1]) + shape,
                                                              dtype=D)
    with torch.no_grad():
        y = ops(z)
    return group_moments(y, 1)


def _layer_errors(model, x, propagate):
    """Per chained BKN layer after a forward: mean over channels of |m - mu_hat| / sd,
    the typical factor between var_hat and s (exp of the mean |log(var_hat / s)|), and the
    mean of var_hat / s."""
    model.train()
    with torch.no_grad():
        model(x)
        out = []
        for layer in [m for m in model.modules() if isinstance(m, BatchKalmanNorm)]:
            if layer.prior is None:
                continue
            mh, vh = layer.prior.predict(propagate, "analytic", 0, layer.borders)
            post = layer.posterior
            ratio = vh / post.s
            out.append((((post.m - mh).abs() / post.s.sqrt()).mean().item(),
                        ratio.log().abs().mean().exp().item(), ratio.mean().item()))
    return out


def borders(quick: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).double()
    mean, var = torch.randn(1, 16, dtype=D), torch.rand(1, 16, dtype=D) + 0.5
    for size in (1, 2, 4, 8, 32):
        draws = (20_000 if quick else 100_000) // (size * size) + 200
        mc_m, mc_v = _mc(nn.Sequential(nn.ReLU(), conv), mean, var, (size, size), draws)
        row = []
        for rule in ("ignore", "exact"):
            m, v, _ = chain_rules((nn.ReLU(), conv), rule)[0](mean, var, (size, size))
            row.append(f"{rule}: mean {((m - mc_m).abs() / mc_v.sqrt()).max():.2f} sd, "
                       f"var {((v / mc_v) - 1).abs().max():.0%}")
        print(f"borders  {size}x{size}: " + "; ".join(row) + f" (MC draws {draws})")
    data = load_dataset("digits")
    x = data.x_train[:512].double()
    for rule in ("ignore", "exact"):
        torch.manual_seed(0)
        model = make_model("cnn", parse_spec(f"bkn:propagate=output,borders={rule}"), 512,
                           data.sample_shape, 10).double()
        errs = _layer_errors(model, x, "output")
        print(f"borders  cnn/digits {rule}: " + ", ".join(
            f"mean {e:.2f} sd, var x{r:.2f}" for e, r, _ in errs))


def stream(quick: bool) -> None:
    x = torch.randn(32, 3, 32, 32, dtype=D)
    for rule in ("authors", "posterior"):
        torch.manual_seed(0)
        model = make_model("resnet20", parse_spec(f"bkn:propagate=output,stream={rule}"),
                           32, (3, 32, 32), 10).double()
        errs = _layer_errors(model, x, "output")
        norm1 = [errs[i] for i, layer in enumerate(model.norms()[1:])
                 if any(layer is b.norm1 for b in model.blocks)]
        print(f"stream   resnet20 {rule}: norm1 mean error (sd) "
              + ", ".join(f"{e:.2f}" for e, _, _ in norm1)
              + "; var_hat/s " + ", ".join(f"{m:.2f}" for _, _, m in norm1))
    kept = []
    n = len(model.blocks) // 3
    for blk in (model.blocks[n], model.blocks[2 * n]):
        grab = {}
        hook = blk.register_forward_pre_hook(lambda mod, a: grab.setdefault("x", a[0]))
        with torch.no_grad():
            model(x)
        hook.remove()
        v_in = group_moments(grab["x"], 1)[1]
        v_out = group_moments(nn.functional.avg_pool2d(grab["x"], 2), 1)[1]
        kept.append((v_out / v_in).mean().item())
    print("stream   stride-2 shortcut keeps var x " + ", ".join(f"{k:.2f}" for k in kept)
          + " (independent values: 0.25; authors' rule: 1)")


def sampled(quick: bool) -> None:
    from bknbench.models.resnet import Shortcut

    torch.manual_seed(0)
    sc = Shortcut(16, 32, 2)
    mean, var = torch.randn(64, 16, dtype=D), torch.rand(64, 16, dtype=D) + 0.5
    m, v = sampled_moments(mean, var, (sc,), (4, 4), 1)
    lo = sc.lo
    err = ((v[:, lo:lo + 16] / (var / 4)) - 1).abs()
    print(f"sampled  shortcut, 4x4, 1 draw: variance error worst {err.max():.0%}, "
          f"median {err.median():.0%} (exact now)")
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).double()
    for size in (4, 32):
        _, v_a, _ = chain_rules((nn.ReLU(), conv), "exact")[0](mean, var, (size, size))
        _, v_s = sampled_moments(mean, var, (nn.ReLU(), conv), (size, size), 1)
        err = ((v_s / v_a) - 1).abs()
        print(f"sampled  ReLU -> conv3x3, {size}x{size}, 1 draw vs exact analytic: variance "
              f"error median {err.median():.0%}, worst {err.max():.0%}")


def guard(quick: bool) -> None:
    data = load_dataset("mnist1d")
    for scope in ("layer", "group"):
        torch.manual_seed(0)
        model = make_model("mlp", parse_spec(f"bkn:guard_scope={scope}"), 2,
                           data.sample_shape, 10).double().train()
        layers = [m for m in model.modules() if isinstance(m, BatchKalmanNorm) and m.prior]
        kept = [0.0] * len(layers)
        for step in range(20):
            with torch.no_grad():
                model(data.x_train[128 * step:128 * (step + 1)].double())
                for i, layer in enumerate(layers):
                    post = layer.posterior
                    kept[i] += (post.mu != post.m).any(dim=1).double().mean().item() / 20
        what = "forwards kept" if scope == "layer" else "groups kept"
        print(f"guard    mlp/mnist1d b=2 {scope}: {what} "
              + ", ".join(f"{k:.0%}" for k in kept))


def raw(quick: bool) -> None:
    data = load_dataset("mnist1d")
    x = data.x_train[:512].double()
    for propagate in ("raw", "output"):
        torch.manual_seed(0)
        model = make_model("cnn", parse_spec(f"bkn:propagate={propagate}"), 512,
                           data.sample_shape, 10).double()
        errs = _layer_errors(model, x, propagate)
        print(f"raw      cnn/mnist1d propagate={propagate}: var_hat/s "
              + ", ".join(f"{m:.2f}" for _, _, m in errs))


def alignment(quick: bool) -> None:
    groups, c = 64, 16
    pad = c * groups // 2  # the authors pad m, v (G * C,) by in_channel * split // 2
    own = sum((pad + g * c + k) // (2 * c) == g for g in range(groups) for k in range(c))
    print(f"align    authors' padding: {own / (groups * c):.1%} of real statistics stay in "
          "their group (ours: 100%)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("sections", nargs="*", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.sections or ["running", "borders", "stream", "sampled", "guard", "raw",
                                  "alignment"]:
        globals()[name](args.quick)
