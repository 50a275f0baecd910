"""What a results folder was made with, from its files alone: the resolved configuration,
the environment, and the `bknbench run` command line that makes it again.

The command comes from sweep.json (written when `bknbench run` starts) when present, else
from runs.csv's `config` column; every run setting is spelled out, so a later change of a
default cannot change what the command runs.
"""
from __future__ import annotations

import datetime
import json
import shlex
from pathlib import Path

import pandas as pd

# RunConfig fields that the sweep's grid sets per run, and those without a flag.
PER_RUN = ("spec", "norm_batch", "sgd_batch", "seed", "plugins")
NO_FLAG = ("eval_batch",)
FLAG_NAMES = {"base_lr": "--lr"}  # fields whose flag is not --field-name


def _configs(runs: pd.DataFrame) -> list[dict]:
    out = []
    for text in runs["config"] if "config" in runs else []:
        try:
            out.append(json.loads(text))
        except (TypeError, ValueError):
            continue  # a run that could not report its configuration
    return out


def resolved_config(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(field, value) for every RunConfig field in runs.csv's `config` column; a field that
    differs between runs shows its distinct values, in order of first appearance."""
    configs = _configs(runs)
    names = list(dict.fromkeys(k for c in configs for k in c))
    rows = []
    def text(v) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    for name in names:
        values = list(dict.fromkeys(text(c.get(name)) for c in configs))
        rows.append((name, ", ".join(values) if len(values) > 1 else values[0]))
    return rows


def environment(runs: pd.DataFrame, folder: Path) -> list[tuple[str, str]]:
    """Device, versions, commit and date of the runs (distinct values joined)."""
    def distinct(values) -> str:
        return ", ".join(str(v) for v in dict.fromkeys(values) if str(v) not in ("", "nan"))

    rows = [("device", distinct(runs.get("device", []))),
            ("torch", distinct(runs.get("torch_version", [])))]
    versions = []
    for text in runs.get("versions", []):
        try:
            versions.append(json.loads(text))
        except (TypeError, ValueError):
            continue
    for key in dict.fromkeys(k for v in versions for k in v):
        rows.append((key, distinct(v.get(key, "") for v in versions)))
    rows.append(("git commit", distinct(runs.get("git_commit", [])) or "unknown"))
    try:
        stamp = (folder / "runs.csv").stat().st_mtime
        rows.append(("results written", datetime.datetime.fromtimestamp(
            stamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    except OSError:
        pass
    return rows


def flag_name(name: str) -> str:
    """The `bknbench run` flag of a RunConfig or SweepConfig field."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _flag(name: str, value) -> list[str]:
    if name in PER_RUN or name in NO_FLAG or value is None:
        return []
    flag = flag_name(name)
    if name == "augment":
        return ["--augment" if value else "--no-augment"]
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, (list, tuple)):
        return [flag, ",".join(map(str, value))] if value else []
    return [flag, str(value)]


def _sweep(folder: Path, runs: pd.DataFrame) -> dict:
    """sweep.json, or the same fields recovered from runs.csv."""
    try:
        return json.loads((folder / "sweep.json").read_text())
    except (OSError, ValueError):
        pass
    configs = _configs(runs)
    base = {k: v for k, v in (configs[0] if configs else {}).items() if k not in PER_RUN}
    steps = set(zip(runs["norm_batch"], runs["sgd_batch"]))
    accumulate = None
    if any(s != b for b, s in steps):
        target = max(s for _, s in steps)
        if all(s == max(b, target) for b, s in steps):
            accumulate = target
    return {"specs": list(dict.fromkeys(runs["spec"])),
            "batch_sizes": sorted(set(int(b) for b in runs["norm_batch"])),
            "seeds": sorted(set(int(s) for s in runs["seed"])), "base": base,
            "accumulate_to": accumulate}


def run_command(folder: Path, runs: pd.DataFrame) -> str:
    """The `bknbench run` command line that makes this folder's runs again, into `folder`:
    one per grid of the sweep's history (a sweep extended with more seeds or sizes), grids
    that differ in one axis only merged into one command."""
    sweep = _sweep(folder, runs)
    commands = []
    for grid in merged_grids(sweep.get("history") or [sweep]):
        args = ["bknbench", "run", "--norms", ",".join(grid["specs"]),
                "--batch-sizes", ",".join(map(str, grid["batch_sizes"])),
                "--seeds", ",".join(map(str, grid["seeds"]))]
        if sweep.get("accumulate_to") is not None:
            args += ["--accumulate-to", str(sweep["accumulate_to"])]
        for plugin in sweep.get("plugins", []):  # its source as it was: sha256 in sweep.json
            args += ["--plugin", plugin["source"]]
        tune = sweep.get("tune") or {}
        for key, values in tune.items():
            args += ["--tune", f"{key}={','.join(f'{v:g}' for v in values)}"]
        if sweep.get("tune_seeds"):
            args += ["--tune-seeds", ",".join(map(str, sweep["tune_seeds"]))]
        # set by the grid, not by a flag (config.TUNABLE: lr is base_lr, the others by name)
        tuned = {{"lr": "base_lr"}.get(k, k) for k in tune}
        for name, value in sweep.get("base", {}).items():
            if name not in tuned:
                args += _flag(name, value)
        commands.append(_wrap(args + ["--out", str(folder)]))
    return "\n".join(commands)


AXES = ("specs", "batch_sizes", "seeds")


def run_toml(sweep: dict, folder: Path) -> str:
    """The sweep (sweep.json's fields) as a `bknbench run --config` file: every run option
    resolved, so `bknbench run --config FILE` makes the same runs (the latest grid of a grown
    sweep; its sweep.json lists every grid)."""
    items = [("norms", list(sweep["specs"])), ("batch-sizes", list(sweep["batch_sizes"])),
             ("seeds", list(sweep["seeds"])), ("accumulate-to", sweep.get("accumulate_to"))]
    items += [(flag_name(k)[2:], v) for k, v in sweep.get("base", {}).items()
              if k not in PER_RUN and k not in NO_FLAG]
    items.append(("out", str(folder)))
    lines = ["# bknbench run --config this file: the resolved configuration of this folder's",
             "# sweep (flags given with it override a key)"]
    lines += [f"{key} = {_toml(value)}" for key, value in items if value not in (None, [])]
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def merged_grids(grids: list[dict]) -> list[dict]:
    """The grids of a sweep's history, fewest commands first: a grid inside another is
    dropped, two grids equal but on one axis become one with that axis joined."""
    out: list[dict] = []
    for grid in grids:
        grid = {k: list(grid.get(k, ())) for k in AXES}
        merged = True
        while merged:
            merged = False
            for i, other in enumerate(out):
                differ = [k for k in AXES if set(grid[k]) != set(other[k])]
                if all(set(grid[k]) <= set(other[k]) for k in AXES):
                    grid, merged = out.pop(i), True
                elif len(differ) <= 1 or all(set(other[k]) <= set(grid[k]) for k in AXES):
                    joined = {k: list(dict.fromkeys(other[k] + grid[k])) for k in AXES}
                    joined["batch_sizes"] = sorted(joined["batch_sizes"])
                    out.pop(i)
                    grid, merged = joined, True
                if merged:
                    break
        out.append(grid)
    return out


def report_command(folders: list[Path], out: Path) -> str:
    return _wrap(["bknbench", "report", *map(str, folders), "--out", str(out)])


def _wrap(args: list[str], width: int = 88) -> str:
    """A shell command line, broken with a backslash before an option once a line is full."""
    lines, line = [], ""
    for i, arg in enumerate(args):
        piece = shlex.quote(arg)
        if line and arg.startswith("--") and len(line) + 1 + len(piece) + len(
                shlex.quote(args[i + 1]) if i + 1 < len(args) else "") > width:
            lines.append(line + " \\")
            line = "    " + piece
        else:
            line = f"{line} {piece}" if line else piece
    return "\n".join(lines + [line])
