"""The package's imports run one way: no module imports another that (directly or not) imports it back.

Every import counts, function-level ones included, so a cycle cannot hide behind a lazy import. The
folders that form the package come from pyproject's package-dir, as the installed package sees them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the layerwise package."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for file in (ROOT / folder).rglob("*.py"):
            parts = list(file.relative_to(ROOT / folder).with_suffix("").parts)
            if package == "layerwise" and parts[0] in {p.split(".")[1] for p in package_dir if p != "layerwise"}:
                continue  # a sub-package with a folder of its own
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = file
    return modules


def _imports(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The layerwise modules `name` imports anywhere in its file (a package importing its own parts aside)."""
    is_package = file.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - (0 if is_package else 1)]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not target.startswith(name + "."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, file, modules) for name, file in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (edges into a module's own package ignored)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if v.startswith(w + "."):
                continue  # a module importing its package (its __init__ re-exports)
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_whole_package():
    graph = _graph()
    assert {"layerwise.api", "layerwise.engine.pipeline", "layerwise.quant.gptq", "layerwise.kernels"} <= set(graph)
    assert "layerwise.engine.pipeline" in graph["layerwise.api"]
    assert "layerwise.model.adapter" in graph["layerwise.engine.applier"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_are_a_leaf():
    """The kernels read the packed layout from core, never from the quantizers that write it."""
    graph = _graph()
    kernels = {m: deps for m, deps in graph.items() if m.startswith("layerwise.kernels")}
    assert kernels
    for module, deps in kernels.items():
        outside = {d for d in deps if not d.startswith(("layerwise.kernels", "layerwise.core"))}
        assert not outside, (module, outside)


def test_transform_reads_only_core_and_model():
    """Rotations are weight algebra on a model: they need the adapter and the core types, nothing that runs."""
    graph = _graph()
    transform = {m: deps for m, deps in graph.items() if m.startswith("layerwise.transform")}
    assert transform
    allowed = ("layerwise.transform", "layerwise.core", "layerwise.model")
    for module, deps in transform.items():
        outside = {d for d in deps if not d.startswith(allowed)}
        assert not outside, (module, outside)
