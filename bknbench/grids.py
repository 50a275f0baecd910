"""`--tune KEY=GRID`: the grids of a tuned sweep, parsed and checked (one line per defect)."""
from __future__ import annotations

import math

import numpy as np

from .config import TUNABLE
from .errors import ConfigError

# What each tuned key's values must be (the checks of their flags in validate).
TUNE_CHECKS = {"lr": (lambda v: v > 0, "positive"),
               "weight_decay": (lambda v: v >= 0, ">= 0"),
               "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
               "warmup_epochs": (lambda v: v >= 0, ">= 0")}


def parse_tune(texts) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """--tune KEY=GRID (repeatable) -> ((key, values), ...). GRID: comma-separated numbers,
    or LOW:HIGH:logN (N values spaced evenly on a log scale, ends included) or LOW:HIGH:linN."""
    tune = {}
    for text in texts:
        key, sep, grid = (p.strip() for p in text.partition("="))
        if not sep:
            raise ConfigError(f"--tune {text!r}: expected KEY=VALUES, e.g. lr=0.05,0.2,0.8")
        if key not in TUNABLE:
            raise ConfigError(f"--tune: unknown key {key!r}; tunable: {', '.join(TUNABLE)}")
        if key in tune:
            raise ConfigError(f"--tune names {key} twice")
        values = _grid(grid, f"--tune {key}")
        ok, what = TUNE_CHECKS[key]
        bad = [v for v in values if not ok(v)]
        if bad:
            raise ConfigError(f"--tune {key}: every value must be {what}, got {bad[0]:g}")
        tune[key] = values
    return tuple(tune.items())


def _grid(text: str, what: str) -> tuple[float, ...]:
    pieces = text.split(":")
    if len(pieces) == 3 and pieces[2][:3] in ("log", "lin") and pieces[2][3:].isdigit():
        low, high = (_number(p, what) for p in pieces[:2])
        n = int(pieces[2][3:])
        if n < 1 or low > high or (pieces[2][:3] == "log" and low <= 0):
            raise ConfigError(f"{what}: {text!r} is not a range LOW:HIGH:logN with "
                              "0 < LOW <= HIGH and N >= 1")
        space = np.geomspace if pieces[2][:3] == "log" else np.linspace
        values = [float(f"{v:.6g}") for v in space(low, high, n)]
    else:
        values = [_number(p, what) for p in text.split(",") if p.strip()]
    if not values:
        raise ConfigError(f"{what}: no value given")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what}: {text!r} repeats a value")
    return tuple(values)


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{what}: {text.strip()!r} is not a finite number")
    return value
