"""What the rivals share: run-length phases (brn, mabn, cbn change behaviour during
training), windows over past micro-batches, and two normalization nodes.

Unit: **micro-batches**, the statistics groups a layer has seen in training forwards. A
forward of G groups (gradient accumulation in one grouped forward) counts G, as G separate
micro-batch forwards would: the reference implementations count their own forward calls,
each one micro-batch (BRN's num_batches_tracked, MABN's iters, CBN's iter_count), not
optimizer steps. Without accumulation one micro-batch is one optimizer step.

A layer counts its own micro-batches in a buffer (``micro_batches``, so a checkpoint resumes
it) and learns the run length from its ``total`` option, which the training run fills in
(`NormSpec.for_run`, from epochs x steps x micro-batches per step); the spec's label stays
the same. Phases are given as fractions of the run; a layer outside a run (``total=0``)
takes them of a run length it names (``reference_run``).
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from ..kernels.fused import eval_form_backward, from_channels, to_channels
from ..kernels.reference import full_precision, normalize, to_device


class CountsMicroBatches:
    """Mixin for an nn.Module: a ``micro_batches`` buffer and its value on the host.

    The host copy is set at construction, reset and state_dict load, and then kept in step,
    so deciding a phase never waits for the device."""

    reference_run = 0  # micro-batches a fraction refers to when the run length is unknown

    def init_counter(self) -> None:
        self.register_buffer("micro_batches", torch.tensor(0, dtype=torch.long))
        self._seen: int | None = 0

    def seen(self) -> int:
        """Micro-batches seen in training forwards so far, kept on the host: set at
        construction, reset and state_dict load (from the loaded value), so a step never
        reads the buffer on the device (only a load that did not include it)."""
        if self._seen is None:
            self._seen = int(self.micro_batches)
        return self._seen

    def advance(self, groups: int) -> None:
        self._seen = self.seen() + groups
        self.micro_batches.add_(groups)

    def at(self, fraction: float) -> int:
        """The micro-batch at ``fraction`` of the run (of ``reference_run`` outside a run)."""
        return round(fraction * (self.total or self.reference_run))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "micro_batches")
        # read here, at a load (a checkpoint is on the host), never in a step
        self._seen = None if loaded is None else int(loaded)


def eager_when_compiled(fn):
    """``torch.compiler.disable(fn)`` (a host-side schedule, counters and rings cannot be
    traced), made at the first call in a process that has torch.compile loaded: the
    decorator itself imports torch._dynamo, about 1 s of every process's start-up, which
    a process that never compiles need not pay."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return call


# ---------------------------------------------------------------- shared math
LOW_PRECISION = (torch.float16, torch.bfloat16)


def statistics_precision(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when it is in half precision (autocast): statistics, as BN's and BKN's,
    are computed in float32; the output goes back to x's dtype."""
    return x.float() if x.dtype in LOW_PRECISION else x


def ema_before_each(running: torch.Tensor, stats: torch.Tensor, momentum: float):
    """The running value seen by each of G sequential EMA updates, before its own.

    running: (C,); stats: (G, C) -> (G, C), row g = running after updates 0..g-1 of
    ``r = (1 - momentum) r + momentum stats[k]``. Row 0 is ``running``."""
    g = stats.shape[0]
    if g == 1:
        return running[None]
    decay = 1.0 - momentum
    k = torch.arange(g, dtype=stats.dtype, device=stats.device)
    lag = k[:, None] - 1 - k[None, :]  # (G, G): g - 1 - j
    w = torch.where(lag >= 0, momentum * decay ** lag.clamp_min(0), 0.0)
    with full_precision(stats.device.type):  # a matmul autocast would run in bf16
        return decay ** k[:, None] * running[None] + w @ stats


def agreed(flags: list[bool], device):
    """Per-group flags as one Python bool when they agree (the usual case: no tensor, no
    branch on the device), else a (G, 1) bool tensor for torch.where."""
    if all(flags) or not any(flags):
        return flags[0]
    return to_device(flags, device)[:, None]


def choose(flag, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a where flag, else b; flag as returned by `agreed`."""
    if isinstance(flag, bool):
        return a if flag else b
    return torch.where(flag, a, b)


def window_sums(past: torch.Tensor, new: torch.Tensor, k: int):
    """Sums over sliding windows of the last ``k`` entries before each new one.

    past: (k, *T), oldest first; new: (G, *T) -> (G, *T), row g = sum of the k entries that
    precede new[g] in the sequence past, new[0], new[1], ... (the current one excluded)."""
    if new.shape[0] == 1:
        return past.sum(0, keepdim=True)
    g = new.shape[0]
    if k == 0:
        return torch.zeros_like(new)
    # each window summed on its own (unfold: (G, *T, k) views), not cumsum differences:
    # cumsum has no deterministic CUDA kernel, and the differences round
    seq = torch.cat([past, new])  # (k + G, *T)
    return seq.unfold(0, k, 1)[:g].sum(-1)


def push(ring: torch.Tensor, new: torch.Tensor) -> None:
    """Append ``new`` (G, *T) to the ring (k, *T), oldest first, keeping the last k."""
    k = ring.shape[0]
    if k:
        ring.copy_(torch.cat([ring, new.to(ring.dtype)])[-k:])


def second_moment(xt: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of x^2 of xt (B, K, P) -> (K,). (Three times faster on a CPU than
    linalg.vector_norm over dims (0, 2).)"""
    return (xt * xt).sum((0, 2)).div_(xt.shape[0] * xt.shape[2])


# ---------------------------------------------------------------- normalize with given statistics
class _NormalizeGiven(torch.autograd.Function):
    """y = weight (x - mean) / sqrt(var + eps) + bias per group, the statistics given and
    differentiable: the passes over x run on PyTorch's batch-norm kernels in inference form
    and their backward, as in kernels/fused.py. Low-precision inputs are normalized in
    float32 and returned in their dtype."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, groups: int, eps: float):
        xt = statistics_precision(to_channels(x, groups))  # (B, G * C, P)
        w_k, b_k = (weight, bias) if groups == 1 else (weight.repeat(groups),
                                                        bias.repeat(groups))
        mean_k, var_k = mean.reshape(-1).to(xt.dtype), var.reshape(-1).to(xt.dtype)
        yt = F.batch_norm(xt, mean_k, var_k, w_k, b_k, False, 0.0, eps)
        ctx.save_for_backward(xt, mean_k, var_k, w_k)
        ctx.groups, ctx.eps, ctx.shape = groups, eps, x.shape
        return from_channels(yt.to(x.dtype), groups, x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y):
        xt, mean_k, var_k, w_k = ctx.saved_tensors
        groups, shape = ctx.groups, ctx.shape
        g_yt = to_channels(g_y, groups).to(xt.dtype)
        # eval-form kernel: g_y w r, sum(g_y (x - mean) r) and sum(g_y), r = (var + eps)^-1/2
        g_xt, g_wk, g_bk = eval_form_backward(g_yt, xt, w_k, mean_k, var_k, ctx.eps)
        invstd = torch.rsqrt(var_k + ctx.eps)
        w_r = w_k * invstd
        g_mean = (-g_bk * w_r).view(groups, -1)
        g_var = (-0.5 * g_wk * w_r * invstd).view(groups, -1)
        g_w, g_b = g_wk.view(groups, -1).sum(0), g_bk.view(groups, -1).sum(0)
        return (from_channels(g_xt, groups, shape).to(g_y.dtype), g_mean, g_var, g_w, g_b,
                None, None)


def normalize_given(x, mean, var, weight, bias, groups: int, eps: float):
    """y = weight (x - mean) / sqrt(var + eps) + bias with per-group statistics mean, var
    (G, C) that carry gradients (computed from x, or a window); x (N, C, *S) -> (N, C, *S).
    Equals kernels.reference.normalize; under torch.compile that is what is traced."""
    if torch.compiler.is_compiling():
        return normalize(x, mean, var, weight, bias, eps)
    return _NormalizeGiven.apply(x, mean, var, weight, bias, groups, eps)


class _RmsNormalize(torch.autograd.Function):
    """y = weight r x / sqrt(chi + eps) + bias per group, chi a second moment (no centring),
    with the gradient of chi = mean(x^2) over the group, its psi term optionally averaged:

        g = dL/dy weight r;  psi = mean(g z) (z = x / sqrt(chi + eps));  the SMA of psi over
        ``ring`` and the current one where ``average``;  dL/dx = (g - z psi) / sqrt(chi + eps)

    x (N, C, *S); chi, r (G, C); average: bool, or (G, 1) bool (see `agreed`); ring (k, C)
    past psi, appended to in the backward, or None (the exact gradient; a probe). MABN's
    node (MABN.py); FRN's with groups = N and no ring. Rings are reached through ctx, never
    saved: they change in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, chi, r, average, ring, groups: int, eps: float):
        xt = statistics_precision(to_channels(x, groups))  # (B, G * C, P)
        w_k = (weight * r).reshape(-1)
        zeros = torch.zeros_like(w_k)
        b_k = bias if groups == 1 else bias.repeat(groups)
        yt = F.batch_norm(xt, zeros, chi.reshape(-1), w_k, b_k, False, 0.0, eps)
        ctx.save_for_backward(xt, weight, chi, r)
        ctx.average, ctx.ring, ctx.groups, ctx.eps, ctx.shape = average, ring, groups, eps, x.shape
        return from_channels(yt.to(x.dtype), groups, x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y):
        xt, weight, chi, r = ctx.saved_tensors
        groups, c = chi.shape
        w_k = (weight * r).reshape(-1)
        zeros = torch.zeros_like(w_k)
        # eval-form kernel with mean 0, var chi: g_xt = g s, g_wk = sum(dy z), g_bk = sum(dy)
        g_xt, g_wk, g_bk = eval_form_backward(to_channels(g_y, groups).to(xt.dtype), xt, w_k,
                                              zeros, chi.reshape(-1), ctx.eps)
        psi = (w_k * g_wk).view(groups, c) / (xt.shape[0] * xt.shape[2])  # mean(g z)
        psi_used, ring = psi, ctx.ring
        if ring is not None and ring.shape[0]:
            k = ring.shape[0] + 1
            psi_used = choose(ctx.average, (window_sums(ring, psi, k - 1) + psi) / k, psi)
            push(ring, psi)
        g_xt.addcmul_(xt, (psi_used / (chi + ctx.eps)).reshape(1, -1, 1), value=-1.0)  # - z psi s
        g_w = (r * g_wk.view(groups, c)).sum(0)
        return (from_channels(g_xt, groups, ctx.shape).to(g_y.dtype), g_w,
                g_bk.view(groups, c).sum(0), None, None, None, None, None, None)


def rms_normalize(x, weight, bias, chi, r, groups: int, eps: float, average=False, ring=None):
    """`_RmsNormalize`: y = weight r x / sqrt(chi + eps) + bias, chi (G, C) computed from x
    (detached) by the caller, the gradient as if through chi = mean(x^2)."""
    return _RmsNormalize.apply(x, weight, bias, chi, r, average, ring, groups, eps)
