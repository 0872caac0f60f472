"""The gam_rl package's own modules import each other without a cycle.

Every module is parsed with `ast` (nothing is imported); every import statement counts, at the top
of a module or inside a function (an import moved into a function still closes a circle, it only
hides it until the call). An edge goes to the most specific gam_rl module an import names:
`from gam_rl.report import model` -> gam_rl.report.model, `from gam_rl.report import main` ->
gam_rl.report (its __init__), `from . import x` resolved against the importing module's package.
GAM_RL_LAYOUT_ROOT=<folder holding a gam_rl/> checks another checkout (e.g. an older layout).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = "gam_rl"
ROOT = Path(os.environ.get("GAM_RL_LAYOUT_ROOT") or Path(__file__).resolve().parents[1])


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py under root/gam_rl (a package by its __init__)."""
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a gam_rl module (gam_rl.report.model.fmt ->
    gam_rl.report.model), or None outside gam_rl."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The gam_rl modules that one module imports, anywhere in its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # from . import x, from ..kernel import lstm
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # from X import a: the module X.a where there is one, else X
                found.add(resolve(f"{source}.{alias.name}", modules))
    return found - {None, module}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    return {module: imports(path, module, modules) for module, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """{module reachable from start: the module it was first reached from} (breadth first)."""
    parent, queue = {}, [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return parent


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle through each module that reaches itself, but for modules on a cycle already found."""
    found: list[list[str]] = []
    for start in sorted(graph):
        parent = reachable(graph, start)
        if start not in parent or any(start in cycle for cycle in found):
            continue
        cycle, node = [start], parent[start]
        while node != start:
            cycle.insert(0, node)
            node = parent[node]
        found.append([start, *cycle])
    return found


def test_a_cycle_through_function_level_and_relative_imports_is_found(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("import os\n\n\ndef f():\n    from .sub import b\n    return b\n")
    (package / "sub" / "b.py").write_text("from ..a import f\n")
    (package / "sub" / "c.py").write_text(f"from {PACKAGE}.sub import b\n")
    graph = import_graph(tmp_path)
    assert graph == {PACKAGE: set(), f"{PACKAGE}.sub": set(), f"{PACKAGE}.a": {f"{PACKAGE}.sub.b"},
                     f"{PACKAGE}.sub.b": {f"{PACKAGE}.a"}, f"{PACKAGE}.sub.c": {f"{PACKAGE}.sub.b"}}
    assert cycles(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.sub.b", f"{PACKAGE}.a"]]


def test_the_graph_sees_the_package():
    graph = import_graph(ROOT)
    assert f"{PACKAGE}.cli" in graph and f"{PACKAGE}.policy" in graph
    assert f"{PACKAGE}.potentials" in graph[f"{PACKAGE}.policy"]


def test_no_import_cycle_among_gam_rl_modules():
    found = cycles(import_graph(ROOT))
    if found:
        pytest.fail("import cycles among gam_rl's modules:\n" + "\n".join(" -> ".join(c) for c in found))
