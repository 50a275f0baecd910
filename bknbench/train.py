"""One run: build, train, evaluate in eval mode K times per epoch. Prints nothing.

Metrics are accumulated on the device and read only at an evaluation, so a step never waits
for the host. Evaluations (eval_steps) touch neither the weights nor any RNG, so K changes
the number of metric rows and nothing else. A run checkpoints after every epoch when given a
path, and continues from it.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .config import RunConfig
from .data import Dataset, load_dataset
from .device import TrainingMemory, compiled, sync
from .diagnose import Diagnostics
from .errors import ConfigError
from .models import make_model
from .norms import parse_spec


@dataclass
class RunOutcome:
    """What a run produced: status, metrics, timing. `reason` explains a non-ok status.
    `epochs` holds a metric dict per evaluation (keys of schema.METRIC_COLUMNS without
    run_id), in order; the last of each epoch is at its end."""

    status: str = "ok"
    reason: str = ""
    epochs: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    samples: int = 0
    peak_mem_mb: float | None = None
    val_samples: int | None = None  # validation samples behind each val_acc (None: no split)
    test_acc: float | None = None  # %, on the test split, once after the last epoch
    test_samples: int | None = None  # test samples behind test_acc
    stats: list[dict] = field(default_factory=list)  # --diagnose: schema.STATS_COLUMNS rows
    val_acc_population: float | None = None  # --diagnose: eval with population statistics


def lr_factor(cfg: RunConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step t: linear warm-up, then cosine to zero
    over the remaining steps, or x0.1 at each milestone epoch ("step")."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    bounds = [m * steps_per_epoch for m in cfg.milestones]

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        if cfg.schedule == "step":
            return 0.1 ** sum(t >= b for b in bounds)
        return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(1, total - warm)))

    return factor


def eval_steps(steps_per_epoch: int, evals_per_epoch: int) -> list[int]:
    """The optimizer steps within an epoch (1-based counts) after which the model is
    evaluated: K evenly spaced, the last at the epoch's end; at most one per step.
    E.g. (10, 4) -> [2, 5, 8, 10] (round(10 j / 4), half to even)."""
    k = max(1, min(evals_per_epoch, steps_per_epoch))
    return sorted({max(1, round(steps_per_epoch * j / k)) for j in range(1, k + 1)})


def make_optimizer(model, cfg: RunConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on weight matrices and kernels only (not on norm
    affine parameters, biases or BKN's gain), the usual practice for normalizer studies."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": rest, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum)


def train_step(model, opt, x, y, amp: bool = False):
    """One optimizer step on (x, y), under bf16 autocast when amp; returns (logits, loss),
    still on the device. What a run repeats, and what benchmarks/gpu_check.py times."""
    # a disabled autocast still costs its enter and exit on every micro-step
    with (torch.autocast(x.device.type, dtype=torch.bfloat16) if amp
          else contextlib.nullcontext()):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return logits, loss


@torch.no_grad()
def evaluate(model, x, y, batch: int) -> tuple[float, float]:
    """Mean loss and accuracy (%) in eval mode. x: (N, C, *S), y: (N,)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch]).float()
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum")
        correct += (out.argmax(1) == y[i:i + batch]).sum()
    model.train(was_training)
    return loss.item() / len(x), 100.0 * correct.item() / len(x)


def configure_determinism(cfg: RunConfig) -> None:
    """Set per run, both ways, so a deterministic (or cudnn-benchmark) run never leaks into
    the next one in the same process."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark


def fresh_state(cfg: RunConfig, data: Dataset, device: torch.device, steps: int):
    """Model, optimizer, schedule and data-order generator at step 0, from the seed."""
    torch.manual_seed(cfg.seed)
    # normalizers with schedules learn the run length: micro-batches over the whole run
    spec = parse_spec(cfg.spec).for_run(cfg.epochs * steps * (cfg.sgd_batch // cfg.norm_batch))
    model = make_model(cfg.model, spec, cfg.norm_batch, data.sample_shape,
                       data.num_classes).to(device)
    if device.type == "cuda" and len(data.sample_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps))
    order = torch.Generator().manual_seed(cfg.seed)  # data order, independent of init
    return model, opt, sched, order


def train_run(cfg: RunConfig, data: Dataset | None = None,
              on_epoch: Callable[[dict], None] | None = None,
              checkpoint: Path | None = None) -> RunOutcome:
    """Train one configuration; returns its outcome. Configuration errors (ConfigError)
    propagate; errors of the run itself (an undefined normalization, divergence, out of
    memory) become a non-ok status, so a sweep goes on."""
    t0 = time.perf_counter()
    if data is None:
        # before seeding: mnist1d reseeds
        data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_fraction)
    n_train = len(data.x_train)
    if cfg.sgd_batch > n_train:
        raise ConfigError(f"batch {cfg.sgd_batch} is larger than the {n_train} training "
                          f"samples of {cfg.dataset}")
    configure_determinism(cfg)
    device = torch.device(cfg.device)
    steps = n_train // cfg.sgd_batch  # drop the last partial batch: every statistic sees
    # exactly norm_batch samples
    model, opt, sched, order = fresh_state(cfg, data, device, steps)
    memory = TrainingMemory(device)
    before = memory.allocated()
    data = data.to(device)
    memory.base = memory.allocated() - before  # the dataset: not training memory
    fresh_outcome = lambda: RunOutcome(  # noqa: E731
        val_samples=len(data.x_val) if data.has_val else None, test_samples=len(data.x_test))
    out = fresh_outcome()
    start_epoch = 0
    if checkpoint is not None and checkpoint.exists():
        try:
            start_epoch = load_checkpoint(checkpoint, model, opt, sched, order, out)
        except (OSError, RuntimeError, KeyError, ValueError, EOFError):
            # unreadable (e.g. written by another version): start over, never fail the run
            model, opt, sched, order = fresh_state(cfg, data, device, steps)
            out = fresh_outcome()
    step_fn = compiled(model) if cfg.compile else model
    augment = None
    if cfg.augment and data.image:
        from .data.augment import crop_flip
        augment = crop_flip
    diag = (Diagnostics(model, data.x_train, cfg.norm_batch, cfg.sgd_batch)
            if cfg.diagnose else None)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            memory.start()
            model.train()
            perm = torch.randperm(n_train, generator=order)[: steps * cfg.sgd_batch]
            perm = perm.to(device).view(steps, cfg.sgd_batch)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            evals = set(eval_steps(steps, cfg.evals))
            for i, idx in enumerate(perm, 1):
                x, y = data.x_train[idx], data.y_train[idx]
                if augment is not None:
                    x = augment(x)
                logits, loss = train_step(step_fn, opt, x, y, cfg.amp)
                sched.step()
                loss_sum += loss.detach()
                correct += (logits.detach().argmax(1) == y).sum()
                if i not in evals:
                    continue
                sync(device)  # the training time stops here; the evaluation is not in it
                out.train_time_s += time.perf_counter() - t_epoch
                memory.stop()
                # train_loss and train_acc: over this epoch's steps so far
                train_loss = loss_sum.item() / i
                if not math.isfinite(train_loss):
                    break
                # curves on the validation split; the test split is evaluated only once,
                # after the last epoch (empty without a validation split)
                val_loss, val_acc = (evaluate(model, data.x_val, data.y_val, cfg.eval_batch)
                                     if data.has_val else (None, None))
                out.epochs.append({
                    "epoch": epoch + 1, "step": epoch * steps + i,
                    "samples_seen": out.samples + i * cfg.sgd_batch, "train_loss": train_loss,
                    "train_acc": 100.0 * correct.item() / (i * cfg.sgd_batch),
                    "val_loss": val_loss, "val_acc": val_acc,
                    "lr": opt.param_groups[0]["lr"], "wall_s": time.perf_counter() - t0})
                t_epoch = time.perf_counter()
                memory.start()
            if not math.isfinite(train_loss):
                out.status, out.reason = "diverged", f"training loss became {train_loss} in epoch {epoch + 1}"
                break
            out.samples += steps * cfg.sgd_batch
            row = out.epochs[-1]
            if diag is not None:  # the current weights, nothing changed (diagnose/)
                out.stats += diag.epoch_rows(epoch + 1)
            if on_epoch is not None:
                on_epoch(row)
            if checkpoint is not None and epoch + 1 < cfg.epochs:
                save_checkpoint(checkpoint, epoch + 1, model, opt, sched, order, out)
        if out.status == "ok":
            out.test_acc = evaluate(model, data.x_test, data.y_test, cfg.eval_batch)[1]
        if diag is not None and diag.population and out.status == "ok" and data.has_val:
            out.val_acc_population = evaluate(diag.population_model(), data.x_val,
                                              data.y_val, cfg.eval_batch)[1]
    except ValueError as e:  # an undefined normalization (one value per channel)
        if "undefined" not in str(e):
            raise
        out.status, out.reason = "failed", str(e).splitlines()[0]
    except torch.OutOfMemoryError as e:
        out.status, out.reason = "oom", str(e).splitlines()[0]
        memory.stop()
    out.peak_mem_mb = memory.mb()
    return out


def save_checkpoint(path: Path, epoch, model, opt, sched, order, out: RunOutcome) -> None:
    """Everything needed to continue bitwise: weights, optimizer, schedule, both RNGs."""
    state = {"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "order": order.get_state(),
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "epochs": out.epochs, "stats": out.stats, "train_time_s": out.train_time_s,
             "samples": out.samples}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill leaves the old checkpoint or the new one, never half


def load_checkpoint(path: Path, model, opt, sched, order, out: RunOutcome) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    order.set_state(state["order"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    out.epochs, out.train_time_s, out.samples = (state["epochs"], state["train_time_s"],
                                                 state["samples"])
    out.stats = state.get("stats", [])
    return state["epoch"]
