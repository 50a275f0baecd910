"""Plugins: a user's normalizers, models and datasets, registered from outside the package.

A plugin is a Python file (``--plugin mine.py``) or an importable module (``--plugin
pkg.mod``, or an installed package's entry point in the group ``bknbench.plugins``) that
calls the public ``register_norm``, ``register_model`` or ``register_dataset`` of
``bknbench`` on import: the same registries and constructor shapes as the built-ins.

Each plugin is known by its source (an absolute file path, or a module name) and the sha256
of its source text (a file; a package: every .py file under its folder). A run that uses a
plugin's name carries ``source@sha256:HEX`` in its configuration (`RunConfig.plugins`), so
its run id changes with the plugin's code, and whichever process runs it (a spawned worker,
a Ray task, a resumed sweep) loads the plugin again and refuses one whose source changed.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .data.registry import DATASETS
from .errors import ConfigError
from .models.registry import MODELS
from .norms.registry import REGISTRY

ENTRY_POINTS = "bknbench.plugins"  # the entry-point group of installed plugins
ENV = "BKNBENCH_PLUGINS"  # plugins separated by ":"
SHA = "@sha256:"  # between source and digest in a run's configuration
# what each registry is called in a plugin's `provides`
TABLES = {"norm": REGISTRY, "model": MODELS, "dataset": DATASETS}


@dataclass(frozen=True)
class Plugin:
    source: str  # absolute .py path, or a module name
    sha256: str  # of the source text
    provides: tuple[str, ...]  # "norm:NAME", "model:NAME", "dataset:NAME"

    @property
    def label(self) -> str:
        """How a run's configuration names it: ``source@sha256:HEX``."""
        return f"{self.source}{SHA}{self.sha256}"

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "provides": list(self.provides)}


LOADED: dict[str, Plugin] = {}  # source -> plugin, in this process


def is_file(source: str) -> bool:
    return source.endswith(".py") or os.sep in source or "/" in source


def _digest(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def locate(source: str) -> tuple[str, str]:
    """(canonical source, sha256 of its text); ConfigError when there is none."""
    if is_file(source):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"plugin {source}: no such file")
        return str(path), _digest([path], path.parent)
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"plugin {source}: {type(e).__name__}: {e}") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ConfigError(f"plugin {source}: no module named {source!r} (a file needs a "
                          "path ending in .py)")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: all of its Python files
        return source, _digest(sorted(origin.parent.rglob("*.py")), origin.parent)
    return source, _digest([origin], origin.parent)


def _import(source: str, sha: str) -> None:
    if not is_file(source):
        importlib.import_module(source)
        return
    # one module name per file and content, so a pickled object of a plugin class finds
    # its module again in a process that loaded the same plugin
    name = f"_bknbench_plugin_{Path(source).stem}_{sha[:12]}"
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load(source: str, expect_sha: str | None = None) -> Plugin:
    """Import one plugin (once per process) and return what it registered. A plugin that
    fails to import, registers a name that exists, or whose source is not `expect_sha`:
    ConfigError naming the plugin and the cause; the registries are left as they were."""
    source, sha = locate(source)
    if expect_sha is not None and sha != expect_sha:
        raise ConfigError(f"plugin {source} changed since the sweep was planned (sha256 "
                          f"{expect_sha[:12]}... is now {sha[:12]}...)")
    if source in LOADED:
        if LOADED[source].sha256 != sha:
            raise ConfigError(f"plugin {source} changed since it was loaded in this process")
        return LOADED[source]
    before = {kind: set(table) for kind, table in TABLES.items()}
    try:
        _import(source, sha)
    except Exception as e:
        for kind, table in TABLES.items():  # undo what it registered before failing
            for name in set(table) - before[kind]:
                del table[name]
        if isinstance(e, ConfigError):
            raise ConfigError(f"plugin {source}: {e}") from None
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"plugin {source} failed to import: {type(e).__name__}: "
                          f"{first}") from None
    provides = tuple(f"{kind}:{name}" for kind, table in TABLES.items()
                     for name in sorted(set(table) - before[kind]))
    LOADED[source] = Plugin(source, sha, provides)
    return LOADED[source]


def installed() -> list[str]:
    """The modules installed packages register under the entry-point group."""
    return [ep.value.partition(":")[0].strip()
            for ep in metadata.entry_points(group=ENTRY_POINTS)]


def sources(given: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Every plugin to load, in order: installed entry points, $BKNBENCH_PLUGINS, then
    `given` (--plugin); each once."""
    env = [s for s in os.environ.get(ENV, "").split(":") if s.strip()]
    return list(dict.fromkeys([*installed(), *env, *given]))


def load_all(given: tuple[str, ...] | list[str] = ()) -> list[Plugin]:
    return [load(s) for s in sources(given)]


def load_labels(labels: tuple[str, ...]) -> None:
    """Load the plugins a run's configuration names (``source@sha256:HEX``); ConfigError
    when one is missing or its source changed."""
    for label in labels:
        source, _, sha = label.rpartition(SHA)
        load(source, sha)


def used_by(plugins: list[Plugin], norms: list[str], model: str, dataset: str) -> list[Plugin]:
    """The plugins that provide one of these normalizer names, the model or the dataset."""
    wanted = {f"norm:{n}" for n in norms} | {f"model:{model.partition(':')[0].strip()}",
                                              f"dataset:{dataset}"}
    return [p for p in plugins if wanted & set(p.provides)]


# ---------------------------------------------------------------- a sweep's plugins
def check_same_plugins(sweep, out: Path) -> None:
    """A folder whose sweep ran a plugin's other code is not extended with this one's runs:
    old and new rows of one spec would mix in its tables."""
    if not (out / "sweep.json").is_file():
        return
    import json

    try:
        before = {p["source"]: p["sha256"]
                  for p in json.loads((out / "sweep.json").read_text()).get("plugins", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return  # not ours to judge here: the store reports an unreadable folder
    for label, _ in sweep.plugins:
        source, _, sha = label.rpartition(SHA)
        if before.get(source, sha) != sha:
            raise ConfigError(f"{out} holds runs of plugin {source} as it was before "
                              f"(sha256 {before[source][:12]}..., now {sha[:12]}...); "
                              "give another --out")


def load_plugins(given: tuple[str, ...], sweep=None) -> list:
    """Load the plugins asked for (installed entry points, $BKNBENCH_PLUGINS, --plugin);
    resuming `sweep`, also the plugins it recorded, refusing one whose source changed."""
    for label, _ in sweep.plugins if sweep else ():
        source, _, sha = label.rpartition(SHA)
        try:
            load(source, sha)
        except ConfigError as e:
            raise ConfigError(f"cannot resume: {e}; restore it, or start a new sweep with "
                              "--out") from None
    return load_all(given)
