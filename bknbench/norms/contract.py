"""The normalizer contract, checked on the layer a spec builds (`bknbench check SPEC`).

Every check returns a `Check` (name, passed, the measured numbers); `check_spec` runs them
all. The checks:
    shapes    (N, C), (N, C, L), (N, C, H, W) in train and eval mode: output of the input's
              shape and dtype, finite; gradients (input and parameters) finite
    dtype     float64 in, float64 out
    state     state_dict round trip: a fresh layer loaded with it gives the same eval output
    pickle    pickled and unpickled (what spawned workers and Ray need): the same output
    eval      eval output of each sample alone equals its output in the batch
    isolation a training forward of K micro-batches; micro-batch J's samples changed: no
              output of a micro-batch before J may change (sequential training could not
              have seen them) unless the entry declares backwards carried state; no output
              after J either, unless the entry declares any carried state (`Carries`)
    batch 1   micro-batch 1 works (finite) or is refused with the layer's own message
    compile   torch.compile gives the eager output, or the entry says it does not compile
"""
from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass

import torch

from .registry import NormSpec

C = 6  # channels: gn's default of 8 groups becomes 6, so gn is not ln
NORM_BATCH = 2  # samples per micro-batch
K = 4  # micro-batches in one training forward
J = 1  # the micro-batch whose samples the isolation check changes
SHAPES = {"(N, C)": (), "(N, C, L)": (5,), "(N, C, H, W)": (3, 4)}
TOL = 1e-9  # float64: a change below this is rounding, not a dependence


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str  # the measured numbers, or why it failed


def _data(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(shape, generator=g, dtype=torch.float64) + 1.5).to(dtype)


def _warm(spec: NormSpec, dtype=torch.float64, norm_batch: int = NORM_BATCH,
          shape=(NORM_BATCH * K, C, 5)):
    """A layer after six training forwards and with perturbed parameters: running
    statistics and affine parameters away from their initial values."""
    layer = spec.build(C, norm_batch).to(dtype).train()
    with torch.no_grad():
        for i in range(6):  # 24 micro-batches: past mabn's default SMA warm-up (K + 1 = 17)
            layer(_data(shape, 100 + i, dtype))
        g = torch.Generator().manual_seed(7)
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return layer


def _eval(layer, x):
    layer.eval()
    with torch.no_grad():
        return layer(x)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def shapes(spec: NormSpec) -> list[Check]:
    checks = []
    for label, spatial in SHAPES.items():
        shape = (NORM_BATCH * K, C, *spatial)
        for mode in ("train", "eval"):
            try:
                layer = _warm(spec, torch.float32, shape=shape)
                layer.train(mode == "train")
                x = _data(shape, 1, torch.float32).requires_grad_()
                y = layer(x)
            except Exception as e:
                checks.append(Check(f"{mode} {label}", False, _error(e)))
                continue
            problems = []
            if y.shape != x.shape or y.dtype != x.dtype:
                problems.append(f"output {tuple(y.shape)} {y.dtype}")
            if not torch.isfinite(y).all():
                problems.append("output not finite")
            elif mode == "train":
                w = _data(y.shape, 2, y.dtype)
                (y * w).sum().backward()
                grads = [x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
                if not all(torch.isfinite(g).all() for g in grads):
                    problems.append("gradient not finite")
            detail = "; ".join(problems) or (f"max |y| {y.abs().max().item():.3g}" + (
                ", gradients finite" if mode == "train" else ""))
            checks.append(Check(f"{mode} {label}", not problems, detail))
    layer = _warm(spec)
    y = layer(_data((NORM_BATCH * K, C, 5), 1))
    checks.append(Check("dtype float64", y.dtype == torch.float64, str(y.dtype)))
    return checks


def state_dict(spec: NormSpec) -> Check:
    layer, fresh = _warm(spec), spec.build(C, NORM_BATCH).double()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    x = _data((NORM_BATCH * K, C, 5), 1)
    gap = _gap(_eval(layer, x), _eval(fresh, x))
    return Check("state_dict round trip", gap <= TOL, f"max |eval output change| {gap:.2g}")


def pickling(spec: NormSpec) -> Check:
    layer = _warm(spec)
    try:
        copied = pickle.loads(pickle.dumps(layer))
    except Exception as e:
        return Check("pickling", False, _error(e))
    x = _data((NORM_BATCH * K, C, 5), 1)
    gap = _gap(_eval(layer, x), _eval(copied, x))
    return Check("pickling", gap <= TOL, f"max |eval output change| {gap:.2g}")


def eval_per_sample(spec: NormSpec) -> Check:
    layer = _warm(spec)
    x = _data((NORM_BATCH * K, C, 5), 1)
    together = _eval(layer, x)
    gap = max(_gap(_eval(layer, x[i:i + 1]), together[i:i + 1]) for i in range(len(x)))
    return Check("eval batch-independent", gap <= TOL,
                 f"max |sample alone - in batch| {gap:.2g}")


def isolation(spec: NormSpec) -> Check:
    """Micro-batch J's samples changed in a training forward of K micro-batches."""
    layer = _warm(spec)
    shape = (NORM_BATCH * K, C, 5)
    x = _data(shape, 1)
    x2 = x.clone()
    x2[J * NORM_BATCH:(J + 1) * NORM_BATCH] = _data((NORM_BATCH, C, 5), 3)
    ya, yb = (copy.deepcopy(layer).train()(v).detach() for v in (x, x2))
    before = _gap(ya[:J * NORM_BATCH], yb[:J * NORM_BATCH])
    after = _gap(ya[(J + 1) * NORM_BATCH:], yb[(J + 1) * NORM_BATCH:])
    carries = spec.carries
    detail = (f"micro-batch {J} of {K} changed: max |change| before it {before:.2g}, "
              f"after it {after:.2g}; declared: " + (
                  f"{carries.what} ({'any micro-batch' if carries.backwards else 'later ones'})"
                  if carries else "nothing carried"))
    passed = (before <= TOL or (carries is not None and carries.backwards)) and (
        after <= TOL or carries is not None)
    return Check("micro-batch isolation", passed, detail)


def micro_batch_one(spec: NormSpec) -> Check:
    """At norm_batch 1, on (N, C) (one value per channel per statistic) and (N, C, L)."""
    passed, said = True, []
    for label, spatial in (("(N, C)", ()), ("(N, C, L)", (5,))):
        shape = (K, C, *spatial)
        try:
            y = _warm(spec, norm_batch=1, shape=shape)(_data(shape, 1))
        except ValueError as e:  # refused, with its own message
            said.append(f"{label} refused: {(str(e).splitlines() or [''])[0]}")
            continue
        except Exception as e:
            passed = False
            said.append(f"{label} {_error(e)}")
            continue
        finite = bool(torch.isfinite(y).all())
        passed &= finite
        said.append(f"{label} works" if finite else f"{label} output not finite")
    return Check("micro-batch 1", passed, "; ".join(said))


def compiled(spec: NormSpec, backend: str = "inductor") -> Check:
    if not spec.entry.compiles:
        return Check("torch.compile", True, "not supported (declared on its entry)")
    eager = _warm(spec)
    other = copy.deepcopy(eager)
    x = _data((NORM_BATCH * K, C, 5), 1)
    try:
        torch._dynamo.reset()
        y = torch.compile(other, backend=backend)(x)
    except Exception as e:
        return Check("torch.compile", False,
                     f"{backend}: {_error(e)}")
    gap = _gap(eager(x), y.detach())
    return Check("torch.compile", gap <= 1e-6, f"{backend}: max |compiled - eager| {gap:.2g}")


def check_spec(spec: NormSpec, backend: str | None = "inductor") -> list[Check]:
    """The contract table of `spec`'s layer; backend None leaves out torch.compile. A
    schedule's run length (``total``) is K micro-batches, so the warm-up forwards take
    every layer to its last phase (brn's renormalization, mabn's moving averages)."""
    spec = spec.for_run(K)
    checks = shapes(spec)
    named = [("state_dict round trip", state_dict), ("pickling", pickling),
             ("eval batch-independent", eval_per_sample), ("micro-batch isolation", isolation),
             ("micro-batch 1", micro_batch_one)]
    if backend:
        named.append(("torch.compile", lambda s: compiled(s, backend)))
    for name, fn in named:
        try:
            checks.append(fn(spec))
        except Exception as e:  # a layer that breaks a check fails it, with the cause
            checks.append(Check(name, False, _error(e)))
    return checks
