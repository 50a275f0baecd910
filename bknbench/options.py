"""The CLI's option bundles and help text: defaults shown as a user types them, the
options several commands share, --version, and --config (a TOML file whose keys become
the defaults of `run`'s options). cli.py declares the commands with them."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import RunConfig
from .errors import ConfigError
from .presets import PRESETS

_RUN_DEFAULTS = RunConfig(spec="")
# Typer prints an argument's Python type beside its name ("FOLDER <list[Path]>"); the name
# says it here, and an option's metavar already replaces its type.
typer.core.TyperArgument.display_type_rich = lambda self, ctx: ""


def shown(value) -> str:
    """A default as a user types it: 81,122 not (81, 122); none not (); on/off not True."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _preset_note(field: str) -> str:
    values = {p.name: shown(p.run[field]) for p in PRESETS.values() if field in p.run}
    if not values:
        return ""
    if len(set(values.values())) == 1:
        return f"; with --preset: {next(iter(values.values()))}"
    return f"; with --preset {', '.join(f'{k}: {v}' for k, v in values.items())}"


def default(field: str) -> str:
    return f"[default: {shown(getattr(_RUN_DEFAULTS, field))}{_preset_note(field)}]"


def print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"bknbench {__version__}")
        raise typer.Exit()


def load_config(ctx: typer.Context, param, path: Optional[Path]) -> Optional[Path]:
    """--config FILE: its keys become the defaults of `run`'s options (ctx.default_map), so
    a flag on the command line overrides them; a key that is no option, or a value its
    option cannot take, is one line and exit 2."""
    if path is None:
        return path
    from .request import study_options

    options = {p.name: p for p in ctx.command.params
               if p.name not in ("config", "debug") and p.param_type_name == "option"}
    try:
        defaults = study_options(path, {n: o.multiple for n, o in options.items()})
        for name, value in defaults.items():
            try:
                options[name].process_value(ctx, value)  # its type's check, now, in one line
            except typer.BadParameter as e:
                raise ConfigError(f"{path}: {name.replace('_', '-')} = {value!r}: "
                                  f"{e.message}") from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


Config = Annotated[Optional[Path], typer.Option(
    callback=load_config, is_eager=True, metavar="FILE",
    help="A TOML file of `run` options (key = value, keys as the flags without --: norms = "
         "[\"bn\", \"gn\"], batch-sizes = [2, 32], epochs = 5); flags given too override it. "
         "Each run writes the resolved configuration to OUT/config.toml.")]


def joined(values: Optional[list[str]]) -> Optional[str]:
    """A list option given several times: every value, comma-joined (never only the last)."""
    return ",".join(values) if values else None


Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]
Only = Annotated[Optional[list[str]], typer.Option(metavar="SPECS", help="Only these specs.")]
Plugins = Annotated[Optional[list[str]], typer.Option("--plugin", metavar="PLUGIN",
    help="A plugin: a .py file or a module that registers normalizers, models or datasets "
    "(repeatable; also $BKNBENCH_PLUGINS, separated by ':', and installed entry points "
    "bknbench.plugins). See docs/extending.md.")]
OnlySizes = Annotated[Optional[list[str]], typer.Option(metavar="SIZES",
                                                        help="Only these micro-batch sizes.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
