"""The architecture, checked: no import cycles, imports flow down the layers, every module
imports on its own, the library prints nothing, files stay small.

The import graph counts every import of a bknbench module, at module level or inside a
function: a lazy import is still a dependency that runs both ways.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bknbench"

# What each part may import (besides itself and ``bknbench.errors``), from the bottom up:
# cli -> commands -> request/config -> sweep -> train -> models -> norms -> kernels;
# results -> report. ``bknbench`` alone is the package (its version).
ALLOWED = {
    "kernels": set(),
    "norms": {"kernels"},
    "models": {"norms", "kernels"},
    "diagnose": {"norms", "kernels"},
    "data": set(),
    "report": set(),
    "config": {"norms"},
    "presets": {"config"},
    "device": set(),
    "train": {"config", "data", "models", "norms", "kernels", "diagnose", "device"},
    "sweep": {"bknbench", "config", "train", "device", "data", "norms", "kernels", "report",
              "plugins"},
    "grids": {"config"},
    "request": {"config", "presets", "data", "models", "norms", "train", "sweep", "plugins",
                "device", "grids"},
    "render": {"config", "report", "sweep"},
    "commands": {"config", "request", "norms", "kernels", "sweep", "report", "render",
                 "plugins"},
    "plugins": {"norms", "models", "data"},
    "options": {"bknbench", "config", "presets", "request"},
    "cli": {"config", "presets", "request", "commands", "norms", "data", "options"},
    "__main__": {"cli"},
    "errors": set(),
    "bknbench": set(),
}
PRINTS_ALLOWED = {"bknbench.cli", "bknbench.options", "bknbench.commands", "bknbench.kernels.native"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The bknbench modules that ``name`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:  # a name inside a module: the module itself
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def part(module: str) -> str:
    """The layer a module belongs to: its subpackage or top-level module name."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "bknbench"


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle(tmp_path):
    """The graph above finds lazy imports and relative ones (so the cycle test can fail)."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from .b import g\n")
    b = tmp_path / "b.py"
    b.write_text("from . import a\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    assert imports_of("pkg.a", a, known) == {"pkg.b"}
    assert imports_of("pkg.b", b, known) == {"pkg", "pkg.a"}


def test_imports_flow_down_the_layers():
    wrong = []
    for name, deps in graph().items():
        mine = part(name)
        for dep in deps:
            theirs = part(dep)
            if theirs not in (mine, "errors") and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} -> {dep}")
    assert not wrong, "imports against the layering: " + ", ".join(sorted(wrong))


def test_nothing_below_the_cli_imports_it():
    importers = [n for n, deps in graph().items() if "bknbench.cli" in deps]
    assert importers == ["bknbench.__main__"]


def test_every_module_imports_on_its_own():
    """Each module first, in a fresh interpreter: no module depends on another having been
    imported before it (registries are filled by their package, whoever imports first)."""
    names = [n for n in modules() if not n.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'bknbench']:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "from bknbench.norms import REGISTRY\n"
        "from bknbench.models import MODELS\n"
        "from bknbench.data import DATASETS\n"
        "print(len(REGISTRY), len(MODELS), len(DATASETS))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from bknbench.data import DATASETS
    from bknbench.models import MODELS
    from bknbench.norms import REGISTRY

    assert proc.stdout.split() == [str(len(REGISTRY)), str(len(MODELS)), str(len(DATASETS))]


@pytest.mark.parametrize("registry", ["norms", "models", "data"])
def test_a_registry_is_full_from_any_member(registry):
    """Importing one member module fills the whole registry (the package imports them all)."""
    member, table, expected = {"norms": ("bknbench.norms.registry", "REGISTRY", "gkn"),
                               "models": ("bknbench.models.registry", "MODELS", "resnet20"),
                               "data": ("bknbench.data.registry", "DATASETS", "cifar10")}[registry]
    code = f"import {member} as m; print({expected!r} in m.{table})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]


def test_the_library_prints_nothing():
    printing = []
    for name, path in modules().items():
        if name in PRINTS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printing.append(f"{name}:{node.lineno}")
    assert not printing, f"print() in the library: {printing}"


def test_files_stay_small():
    """About 300 lines a file; past that a file usually holds two ideas."""
    big = {name: n for name, path in modules().items()
           if (n := len(path.read_text().splitlines())) > 320}
    assert not big, f"files over 320 lines: {big}"


def test_every_package_says_what_it_holds_and_how_to_add_one():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Public names" in doc and "To add" in doc, f"{init}: docstring"


def test_every_package_is_installed():
    """A package missing from pyproject's list works in an editable install and is absent
    from a wheel (`pip install .`, a Ray node): every import of it fails there."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(PACKAGE.parent).parts)
             for init in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
