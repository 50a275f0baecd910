"""The checks of gpu_check.py, one function per section, each returning rows:
{"section", "check", "ok" (True, False, or None: information or not run), "detail", ...}.

Every section runs on the CPU too (--device cpu, a dry run with small sizes): the same code,
so the script is tested where no GPU is. Each section gets a deadline; items not reached
by it are rows with ok None and detail "not run: time budget".
"""
from __future__ import annotations

import contextlib
import subprocess
import time
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bknbench.models.registry import make_model
from bknbench.norms.registry import names, parse_spec
from bknbench.train import train_step

SAMPLED = "bkn:transition=sampled"  # its draws differ between devices: not in correctness
SPECS = names() + [SAMPLED]
N, NORM_BATCH = 8, 2  # 4 statistics groups per step: the grouped paths run
SHAPES = {"mlp": (16,), "cnn": (1, 8, 8), "resnet20": (3, 8, 8)}  # every model family


DRY_SPECS = ("bn", "bkn", "cbn")  # the dry run tests the script, not every normalizer


class Ctx:
    """What a section needs: device, dry run (not cuda: small sizes, few specs and models;
    tests/test_cuda_path.py checks every normalizer on the CPU), its deadline."""

    def __init__(self, device: str, deadline: float):
        self.device, self.deadline = torch.device(device), deadline
        self.dry = self.device.type != "cuda"
        self.specs = DRY_SPECS if self.dry else tuple(SPECS)
        self.models = ("mlp", "cnn") if self.dry else tuple(SHAPES)

    def late(self) -> bool:
        return time.monotonic() > self.deadline


def row(section, check, ok, detail="", **values) -> dict:
    return {"section": section, "check": check, "ok": ok, "detail": detail, **values}


def each(ctx: Ctx, section: str, items, fn) -> list[dict]:
    """fn(item) -> rows, for every item the deadline reaches; an exception is a failed row
    (first line of its message)."""
    rows = []
    for item in items:
        name = item if isinstance(item, str) else " ".join(map(str, item))
        if ctx.late():
            rows.append(row(section, name, None, "not run: time budget"))
            continue
        try:
            rows += fn(item)
        except Exception as e:  # noqa: BLE001 (a check that crashes is a failed check)
            rows.append(row(section, name, False, f"{type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:160]}"))
    return rows


def build(spec: str, model: str, device, dtype=torch.float32, shape=None, norm_batch=NORM_BATCH):
    torch.manual_seed(0)
    net = make_model(model, parse_spec(spec).for_run(100), norm_batch, shape or SHAPES[model], 4)
    return net.to(device=device, dtype=dtype)


def batch(model: str, device, dtype=torch.float32, n=N, shape=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n,) + (shape or SHAPES[model]), generator=g, dtype=torch.float64)
    return x.to(device, dtype), torch.randint(0, 4, (n,), generator=g).to(device)


def step(net, opt, x, y, amp: bool = False):
    return train_step(net, opt, x, y, amp)[0]


def sgd(net, lr=0.05):
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)


def state(net) -> list[torch.Tensor]:
    return [t.detach() for t in list(net.parameters()) + list(net.buffers())]


# ---------------------------------------------------------------- environment
AUTOCAST_OPS = {
    "addmv": lambda a: torch.addmv(a[0], a, a[0]), "mm": lambda a: a @ a,
    "einsum": lambda a: torch.einsum("ij,jk->ik", a, a),
    "bmm": lambda a: torch.bmm(a[None], a[None]),
    "linear": lambda a: F.linear(a, a), "conv1d": lambda a: F.conv1d(a[None], a[:, :, None]),
    "batch_norm": lambda a: F.batch_norm(a, a[0], a[0].abs(), training=False),
    "sum": lambda a: a.sum(), "cumsum": lambda a: a.cumsum(0)}


def driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "? (no nvidia-smi)"


def environment(ctx: Ctx) -> list[dict]:
    d = ctx.device
    rows = [row("environment", "torch", None, torch.__version__),
            row("environment", "device", None, torch.cuda.get_device_name(d)
                if d.type == "cuda" else "cpu (dry run)")]
    if d.type == "cuda":
        rows += [row("environment", "cuda, cudnn", None,
                     f"{torch.version.cuda}, {torch.backends.cudnn.version()}"),
                 row("environment", "driver", None, driver()),
                 row("environment", "tf32 (matmul, cudnn)", None,
                     f"{torch.backends.cuda.matmul.allow_tf32}, {torch.backends.cudnn.allow_tf32}")]
    a = torch.rand(4, 4, device=d)
    with torch.autocast(d.type, dtype=torch.bfloat16):
        low = [name for name, fn in AUTOCAST_OPS.items() if fn(a).dtype == torch.bfloat16]
    rows.append(row("environment", "autocast runs in bf16", None, ", ".join(low) or "none"))
    return rows


# ---------------------------------------------------------------- correctness
def error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest relative deviation over tensors: max |got - ref| / max |ref|."""
    worst = 0.0
    for a, b in zip(got, ref):
        if b.is_floating_point():
            scale = b.abs().max().item() or 1.0
            worst = max(worst, (a.cpu().double() - b).abs().max().item() / scale)
    return worst


def one_step(spec, model, device, dtype) -> list[torch.Tensor]:
    """Outputs, gradients, then parameters and buffers (running statistics) after a step."""
    net = build(spec, model, device, dtype)
    x, y = batch(model, device, dtype)
    opt = sgd(net)
    out = step(net, opt, x, y)  # zero_grad before backward: the grads are this step's
    grads = [p.grad.detach() for p in net.parameters() if p.grad is not None]
    return [out.detach()] + grads + state(net)


def correctness(ctx: Ctx) -> list[dict]:
    """One training step on the device in float32 against float64 on the CPU. The
    tolerance: 10x the CPU's own float32 error on the same step, + 1e-5 (TF32 off)."""
    def check(item):
        model, spec = item
        ref = one_step(spec, model, "cpu", torch.float64)
        e_cpu = error(one_step(spec, model, "cpu", torch.float32), ref)
        e_dev = error(one_step(spec, model, ctx.device, torch.float32), ref)
        tol = 10 * e_cpu + 1e-5
        return [row("correctness", f"{model} {spec}", e_dev <= tol,
                    f"error {e_dev:.1e} (cpu float32 {e_cpu:.1e}, tolerance {tol:.1e})",
                    error=e_dev, cpu_error=e_cpu)]
    items = [(m, s) for m in ctx.models for s in ctx.specs if s != SAMPLED]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return each(ctx, "correctness", items, check)
    finally:  # the other sections run with the defaults, as bknbench's runs
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# ---------------------------------------------------------------- amp
def amp(ctx: Ctx) -> list[dict]:
    """Running statistics after ``steps`` training forwards of a layer under bf16 autocast
    against the same without: inputs exact in bf16, so only a rounded update differs."""
    steps = 10 if ctx.dry else 100
    g = torch.Generator().manual_seed(2)
    x = (torch.randint(-16, 16, (N, 16, 4), generator=g) / 8 + 0.25).to(ctx.device)

    def check(spec):
        runs = []
        for autocast in (False, True):
            torch.manual_seed(0)
            layer = parse_spec(spec).for_run(steps * 4).build(16, NORM_BATCH).to(ctx.device)
            with (torch.autocast(ctx.device.type, dtype=torch.bfloat16) if autocast
                  else contextlib.nullcontext()), torch.no_grad():
                for _ in range(steps):
                    layer(x.bfloat16() if autocast else x)
            runs.append([b for b in layer.buffers() if b.is_floating_point()])
        if not runs[0]:
            return [row("amp", spec, None, "no running statistics")]
        drift = error(runs[1], [b.cpu().double() for b in runs[0]])
        return [row("amp", spec, drift < 1e-4, f"drift {drift:.1e} after {steps} steps",
                    drift=drift)]
    return each(ctx, "amp", ctx.specs, check)


# ---------------------------------------------------------------- determinism
def determinism(ctx: Ctx) -> list[dict]:
    """Two identical 3-step runs under torch.use_deterministic_algorithms: bitwise equal."""
    def run(spec, model):
        net = build(spec, model, ctx.device)
        opt, (x, y) = sgd(net), batch(model, ctx.device)
        for _ in range(3):
            step(net, opt, x, y)
        return state(net)

    def check(item):
        model, spec = item
        torch.use_deterministic_algorithms(True)
        try:
            a, b = run(spec, model), run(spec, model)
        finally:
            torch.use_deterministic_algorithms(False)
        same = all(torch.equal(s, t) for s, t in zip(a, b))
        return [row("determinism", f"{model} {spec}", same, "bitwise equal" if same
                    else "runs differ")]
    return each(ctx, "determinism", [(m, s) for m in ("mlp", "cnn") for s in ctx.specs], check)


# ---------------------------------------------------------------- syncs
class HostReads(TorchFunctionMode):
    """Records what waits for the device: a value read to the host (.item(), .cpu(), a
    Python decision on a tensor) or a blocking copy of host data to a device. On the CPU,
    where nothing waits, it finds the calls that would."""

    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.found.append(f"Tensor.{name}")
        elif name == "tensor" and kwargs.get("device") is not None:
            self.found.append("torch.tensor(..., device=...)")
        elif name in ("to", "cuda") and not kwargs.get("non_blocking") and any(
                isinstance(a, (str, torch.device)) for a in args[1:] + tuple(kwargs.values())):
            self.found.append(f"a blocking Tensor.{name}(device)")
        return func(*args, **kwargs)


def syncs(ctx: Ctx, steps: int = 3) -> list[dict]:
    """Synchronizing calls per training step after the first: CUDA's sync debug mode (its
    warnings counted), and `HostReads` on any device."""
    def check(item):
        model, spec = item
        net = build(spec, model, ctx.device)
        opt, (x, y) = sgd(net), batch(model, ctx.device)
        step(net, opt, x, y)
        reads = HostReads()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if ctx.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with reads:
                    for _ in range(steps):
                        step(net, opt, x, y)
            finally:
                if ctx.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        waits = [str(w.message).splitlines()[0][:80] for w in caught
                 if "synchroniz" in str(w.message)] + reads.found
        return [row("syncs", f"{model} {spec}", not waits,
                    f"{len(waits) / steps:g} per step" + (f": {waits[0]}" if waits else ""),
                    per_step=len(waits) / steps)]
    return each(ctx, "syncs", [(m, s) for m in ("mlp", "cnn") for s in ctx.specs], check)
