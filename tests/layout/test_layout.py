"""The package's import graph: no cycles, and layers only point down.

Walks every module under ``src/phalanx`` with ``ast`` (imports inside functions and ``TYPE_CHECKING`` blocks count
too: a lazy import still couples two modules) and resolves each import to a module of the package.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "phalanx"
#: the layers above the library: nothing below may import them
UPPER = ("phalanx.cli", "phalanx.demo", "phalanx.workflows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports (``from a import b`` counts a.b when that is a module)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith("phalanx") and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _package(module: str) -> str:
    """The first-level unit: ``phalanx.attacks.gradient`` -> ``phalanx.attacks``; top-level modules stand alone."""
    return ".".join(module.split(".")[:2])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for n, deps in graph.items():
        p = _package(n)
        if p == "phalanx":  # the package's own __init__ re-exports the public API
            continue
        out.setdefault(p, set()).update(_package(d) for d in deps if _package(d) not in (p, "phalanx"))
    return out


def test_no_import_cycle_between_packages() -> None:
    cycle = _find_cycle(_package_graph(_graph()))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    # a package __init__ importing its own submodules is how re-exports work; a cycle needs a submodule that
    # imports back a sibling which imports it
    for n in list(graph):
        if (PKG.parent / n.replace(".", "/") / "__init__.py").exists():
            graph[n] = {d for d in graph[n] if not d.startswith(n + ".")}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle or [])


def test_library_packages_do_not_import_upper_layers() -> None:
    bad = []
    for n, deps in _graph().items():
        if n == "phalanx" or n.startswith(UPPER) or n == "phalanx._moved":
            continue
        bad += [f"{n} imports {d}" for d in deps if d.startswith(UPPER)]
    assert not bad, "\n".join(bad)


def test_workflows_do_not_import_cli_or_demo() -> None:
    bad = [f"{n} imports {d}" for n, deps in _graph().items() if n.startswith("phalanx.workflows")
           for d in deps if d.startswith(("phalanx.cli", "phalanx.demo"))]
    assert not bad, "\n".join(bad)


def test_cycle_detector_catches_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("old,new,name", [
    ("phalanx.verification.randomized", "phalanx.randomized.attack", "randomized_attack"),
    ("phalanx.verification.randomized_math", "phalanx.randomized.objectives", "maximal_patterns"),
    ("phalanx.verification.workflows", "phalanx.workflows.verify", "verify_pairs"),
    ("phalanx.experiment", "phalanx.workflows.experiment", "train_run"),
    ("phalanx.cli.config", "phalanx.config", "load_config"),
])
def test_old_import_paths_warn_and_give_the_same_objects(old: str, new: str, name: str) -> None:
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module(new)  # the new path is silent
