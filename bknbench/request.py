"""From what the user asked for to a validated SweepConfig.

Precedence for every run setting: an explicit flag, then the preset, then RunConfig's
default. Everything that can be wrong with the input is found here, before any run
starts, and raised as ConfigError (one line, exit status 2).
"""
from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEFAULT_BATCH_SIZES, RunConfig, SweepConfig
from .errors import ConfigError, did_you_mean

DEFAULT_NORMS = "bn,bn-accum,gn,bkn"
DEFAULT_SEEDS = (0,)  # one seed: a quick look; `make run` uses 0,1,2 for intervals


@dataclass(frozen=True)
class RunRequest:
    norms: str | None = None  # comma-separated specs
    batch_sizes: str | None = None  # comma-separated micro-batch sizes
    seeds: str | None = None  # comma-separated seeds, or a count "n:3"
    preset: str | None = None
    accumulate_to: int | None = None
    out: Path | None = None
    resume: Path | None = None
    run: dict = field(default_factory=dict)  # RunConfig fields given as flags (not None)
    verify: bool = False  # check the CIFAR files' MD5 sums before anything reads them
    # the runs go to Ray workers with GPUs (--gpus-per-run > 0): their device, not this
    # machine's (`device.resolve_device`)
    remote_gpus: bool = False
    plugins: tuple[str, ...] = ()  # --plugin: files or modules (plus $BKNBENCH_PLUGINS, entry points)
    tune: tuple[str, ...] = ()  # --tune KEY=GRID, one per key
    tune_seeds: str | None = None  # comma-separated seeds of the tuning trials
    workloads: str | None = None  # comma-separated workload names (presets.WORKLOADS)
    name: str | None = None  # the output folder results/<name> (instead of a timestamp)


DEFAULT_DEVICE = "auto"  # cuda when present, else mps, else cpu


def flag(field_name: str) -> str:
    """The CLI flag of a RunRequest or RunConfig field."""
    return {"base_lr": "--lr"}.get(field_name, "--" + field_name.replace("_", "-"))


def int_list(text: str, what: str) -> tuple[int, ...]:
    values = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        try:
            values.append(int(piece))
        except ValueError:
            raise ConfigError(f"{what}: {piece!r} is not an integer") from None
    if not values:
        raise ConfigError(f"{what}: no value given")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what}: {text!r} repeats a value")
    return tuple(values)


def default_out(name: str | None = None) -> Path:
    """results/<name>, or results/<timestamp> without one."""
    if name is None:
        return Path("results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"--name {name!r}: a folder name (no slash), e.g. --name bn-vs-gn")
    return Path("results") / name


def read_study(path: Path) -> dict:
    """A --config file: TOML, `key = value` per `run` option (a [run] table also works)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            study = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not TOML: {e}") from None
    if set(study) == {"run"} and isinstance(study["run"], dict):
        study = study["run"]
    nested = [k for k, v in study.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"--config {path}: [{nested[0]}] is not a table of `run`; give "
                          "options as key = value, or under [run]")
    return study


def study_options(path: Path, options: dict[str, bool]) -> dict:
    """A --config file's values by option name (`options`: name -> whether it is a list
    option, which takes several values): lists joined by commas, as the flags give them."""
    defaults = {}
    shown = sorted(o.replace("_", "-") for o in options)
    for key, value in read_study(path).items():
        name = key.replace("-", "_")
        if name not in options:
            raise ConfigError(f"{path}: unknown option {key!r}{did_you_mean(key, shown)}; "
                              f"options: {', '.join(shown)}")
        if value == []:  # an empty list: the option's default
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else value
        defaults[name] = [str(text)] if options[name] else text
    return defaults


def build_study(req: RunRequest) -> list[tuple[SweepConfig, Path]]:
    """The sweeps a request asks for, each with its folder: one, or with --workloads one
    per workload in a subfolder named after it (out/<workload>). A workload sets dataset,
    model and epochs (--epochs overrides) and tunes lr over its grid unless --tune or --lr
    is given. --resume of a folder holding such subfolders resumes each."""
    from .presets import get_workloads
    from .sweep.store import Store

    if req.resume is not None and not (Path(req.resume) / "sweep.json").exists():
        subs = sorted(p for p in Path(req.resume).glob("*/sweep.json"))
        if subs:
            if req.workloads is not None:
                raise ConfigError(f"--resume continues the sweeps saved in {req.resume} as "
                                  "they were; --workloads would change them")
            return [build_sweep(dataclasses.replace(req, resume=p.parent)) for p in subs]
        Store(req.resume).load_sweep()  # says why there is nothing to resume
    if req.workloads is None:
        return [build_sweep(req)]
    if req.resume is not None:
        raise ConfigError(f"--resume continues the sweep saved in {req.resume} as it was; "
                          "--workloads would change it")
    workloads = get_workloads(req.workloads)
    fixed = [flag(k) for k in ("dataset", "model") if k in req.run] + (
        ["--preset"] if req.preset else [])
    if fixed:
        raise ConfigError(f"--workloads sets the dataset and model; {', '.join(fixed)} "
                          "would change them")
    out = Path(req.out) if req.out is not None else default_out(req.name)
    study = []
    for w in workloads:
        grid = () if req.tune or "base_lr" in req.run else (
            "lr=" + ",".join(f"{v:g}" for v in w.lr_grid),)
        study.append(build_sweep(dataclasses.replace(
            req, workloads=None, out=out / w.name, name=None, run={**w.run, **req.run},
            tune=req.tune or grid)))
    return study


def build_sweep(req: RunRequest) -> tuple[SweepConfig, Path]:
    """Resolve and validate; returns the sweep and its output folder."""
    from .grids import parse_tune
    from .norms import parse_spec, split_specs
    from .plugins import check_same_plugins, load_plugins, used_by
    from .presets import get_preset
    from .sweep.plan import sweep_from_dict
    from .sweep.store import Store

    if req.name is not None and (req.out is not None or req.resume is not None):
        raise ConfigError("--name names a new folder under results/; give it, or --out / "
                          "--resume, not both")
        default_out(req.name)  # a bad name fails before any work
    if req.resume is not None:
        if req.out is not None and Path(req.out) != Path(req.resume):
            raise ConfigError("give either --resume DIR or --out DIR, not two different folders")
        given = [flag(k) for k in ("norms", "batch_sizes", "seeds", "preset", "accumulate_to",
                                   "tune_seeds")
                 if getattr(req, k) is not None] + [flag(k) for k in req.run] + (
                     ["--tune"] if req.tune else [])
        if given:
            raise ConfigError(f"--resume continues the sweep saved in {req.resume}/sweep.json "
                              f"as it was; {', '.join(given)} would change it (start a new "
                              "sweep with --out instead)")
        saved = Store(req.resume).load_sweep()
        if "val_fraction" not in saved.get("base", {"val_fraction": None}):
            raise ConfigError(f"{req.resume} was written before bknbench had a validation "
                              "split (its accuracies are on the test split); it cannot be "
                              "resumed: start a new sweep with --out")
        try:
            sweep = sweep_from_dict(saved)
        except ConfigError as e:
            raise ConfigError(f"{Path(req.resume) / 'sweep.json'}: {e}") from None
        load_plugins(req.plugins, sweep)
        check_files(sweep.base, req.verify)
        validate(sweep, req.remote_gpus)
        return sweep, Path(req.resume)
    loaded = load_plugins(req.plugins)
    preset = get_preset(req.preset) if req.preset else None
    run = dict(preset.run) if preset else {}
    run.update(req.run)
    if str(run.get("dataset", "")).startswith("npz:"):  # absolute: workers and resumes find it
        run["dataset"] = "npz:" + str(Path(run["dataset"][4:]).expanduser().resolve())
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = set(run) - names
    if unknown:
        raise ConfigError(f"unknown run setting(s): {', '.join(sorted(unknown))}")
    from .device import resolve_device

    run["device"] = resolve_device(run.get("device", DEFAULT_DEVICE), req.remote_gpus)
    if run.get("deterministic") and run.get("threads") == 1:
        del run["threads"]  # what --deterministic means anyway: one id for both spellings
    base = RunConfig(spec="", **run)
    if base.evals_per_epoch >= 0:  # store the resolved K (negative: refused by validate)
        base = dataclasses.replace(base, evals_per_epoch=base.evals)
    check_files(base, req.verify)
    specs = split_specs(req.norms) if req.norms else list(
        preset.specs if preset else split_specs(DEFAULT_NORMS))
    batches = (int_list(req.batch_sizes, "--batch-sizes") if req.batch_sizes
               else (preset.batch_sizes if preset else DEFAULT_BATCH_SIZES))
    seeds = int_list(req.seeds, "--seeds") if req.seeds else DEFAULT_SEEDS
    accumulate_to = req.accumulate_to if req.accumulate_to is not None else (
        preset.accumulate_to if preset else None)
    if len(set(specs)) != len(specs):
        raise ConfigError("--norms names the same spec twice")
    used = used_by(loaded, [parse_spec(s).name for s in specs], base.model, base.dataset)
    tune = parse_tune(req.tune)
    if any(k == "lr" for k, _ in tune) and "base_lr" in req.run:
        raise ConfigError("give either --lr or --tune lr=..., not both")
    if req.tune_seeds is not None and not tune:
        raise ConfigError("--tune-seeds needs --tune")
    tune_seeds = int_list(req.tune_seeds, "--tune-seeds") if req.tune_seeds else ()
    sweep = SweepConfig(specs=tuple(specs), batch_sizes=batches, seeds=seeds, base=base,
                        accumulate_to=accumulate_to,
                        plugins=tuple((p.label, p.provides) for p in used),
                        tune=tune, tune_seeds=tune_seeds)
    validate(sweep, req.remote_gpus)
    out = Path(req.out) if req.out is not None else default_out(req.name)
    check_same_plugins(sweep, out)
    return sweep, out


def check_files(base: RunConfig, verify: bool) -> None:
    """--verify: the dataset's files against their MD5 sums, before anything reads them."""
    if not verify:
        return
    from .data.cifar import MD5, verify_cifar

    if base.dataset not in MD5:
        raise ConfigError(f"--verify checks the files of {', '.join(MD5)}; --dataset "
                          f"{base.dataset} has none to check")
    if base.data_dir is None:
        raise ConfigError(f"--verify needs --data-dir: the folder that holds the "
                          f"{base.dataset} files to check")
    verify_cifar(base.dataset, base.data_dir)


def validate(sweep: SweepConfig, remote_gpus: bool = False) -> None:
    """Check every value a run would trip over later, and that each spec builds on the
    model (an analytic transition the model has no rule for fails here); the device where
    the runs go (remote_gpus: Ray workers', `device.resolve_device`)."""
    from .data import load_dataset
    from .models import make_model
    from .norms import parse_spec
    from .device import resolve_device

    base = sweep.base
    if base.threads is not None and base.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {base.threads}")
    if base.epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {base.epochs}")
    if base.base_lr <= 0:
        raise ConfigError(f"--lr must be positive, got {base.base_lr}")
    if base.schedule not in ("cosine", "step"):
        raise ConfigError(f"--schedule must be cosine or step, got {base.schedule!r}")
    if not 0 <= base.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {base.momentum}")
    if base.evals_per_epoch < 0:
        raise ConfigError(f"--evals-per-epoch must be >= 0, got {base.evals_per_epoch}")
    if base.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {base.weight_decay}")
    if base.warmup_epochs < 0:
        raise ConfigError(f"--warmup-epochs must be >= 0, got {base.warmup_epochs}")
    if sweep.accumulate_to is not None and sweep.accumulate_to <= 0:
        raise ConfigError(f"--accumulate-to must be positive, got {sweep.accumulate_to}")
    if any(s < 0 for s in sweep.seeds):
        raise ConfigError("--seeds must be non-negative")
    for b in sweep.batch_sizes:
        if b <= 0:
            raise ConfigError(f"--batch-sizes: {b} is not a positive batch size")
    if sweep.tune and base.val_fraction == 0:
        raise ConfigError("--tune selects on the validation split: --val-fraction 0 leaves none")
    if any(s < 0 for s in sweep.tune_seeds):
        raise ConfigError("--tune-seeds must be non-negative")
    resolve_device(base.device, remote_gpus)
    if base.cudnn_benchmark and (base.deterministic or not base.device.startswith("cuda")):
        raise ConfigError("--cudnn-benchmark is for --device cuda without --deterministic "
                          f"(here: --device {base.device}"
                          f"{', --deterministic' if base.deterministic else ''})")
    data = load_dataset(base.dataset, base.data_dir, base.val_fraction)
    n_train = len(data.x_train)
    runs = sweep.expand()  # also checks --accumulate-to against each batch
    for cfg in runs:
        if cfg.sgd_batch > n_train:
            raise ConfigError(f"batch {cfg.sgd_batch} is larger than the {n_train} training "
                              f"samples of {base.dataset}")
    for spec in sweep.specs:
        make_model(base.model, parse_spec(spec), min(sweep.batch_sizes), data.sample_shape,
                   data.num_classes)
