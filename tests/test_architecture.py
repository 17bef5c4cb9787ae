"""The package's layers, as ARCHITECTURE.md draws them: imports point one way and never form a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "openchroma"

# Layer -> the layers it must never import (ARCHITECTURE.md, "Layers").
FORBIDDEN = {
    "openchroma.models": ("openchroma.engine", "openchroma.serving", "openchroma.training", "openchroma.tools",
                          "openchroma.eval", "openchroma.loading", "openchroma.cli"),
    "openchroma.engine": ("openchroma.serving", "openchroma.training", "openchroma.tools", "openchroma.eval",
                          "openchroma.cli"),
    "openchroma.training": ("openchroma.serving", "openchroma.cli"),
    "openchroma.eval": ("openchroma.serving", "openchroma.cli"),
    "openchroma.tools": ("openchroma.serving", "openchroma.cli"),
    "openchroma.serving": ("openchroma.training", "openchroma.tools", "openchroma.eval", "openchroma.cli"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every ``openchroma`` module ``path`` imports at run time (inside functions too; not under TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("openchroma"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("openchroma"):
                continue
            for alias in node.names:   # "from pkg import submodule" depends on the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if is_module(sub) else base)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    assert len(graph) > 40   # the walk found the package
    assert cycles(graph) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer):
    bad = sorted((mod, dep) for mod, deps in import_graph().items() if mod == layer or mod.startswith(layer + ".")
                 for dep in deps for f in FORBIDDEN[layer] if dep == f or dep.startswith(f + "."))
    assert bad == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
