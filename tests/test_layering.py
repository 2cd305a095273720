"""The import direction of the library's packages (module docstrings of megatron_genlip.batch, .model, .parallel,
.data): the batch format depends on nothing of ours; data and model never import each other; the parallel
primitives never import the model; inference and evaluation never import the trainer. Imports inside functions
count too, and no module of any package takes part in an import cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_genlip"
SELF_CONTAINED_HF = ("configuration_genlip.py", "modeling_genlip.py", "image_processing_genlip.py")

FORBIDDEN = {  # importing package -> packages it must not import
    "batch": ("megatron_genlip",),
    "data": ("megatron_genlip.model", "megatron_genlip.parallel", "megatron_genlip.training",
             "megatron_genlip.inference", "megatron_genlip.hf", "megatron_genlip.evaluation"),
    "model": ("megatron_genlip.data", "megatron_genlip.training", "megatron_genlip.inference", "megatron_genlip.hf",
              "megatron_genlip.evaluation"),
    "parallel": ("megatron_genlip.model", "megatron_genlip.data", "megatron_genlip.training",
                 "megatron_genlip.inference", "megatron_genlip.hf", "megatron_genlip.evaluation"),
    "inference": ("megatron_genlip.training", "megatron_genlip.hf", "megatron_genlip.evaluation"),
    "evaluation": ("megatron_genlip.training",),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(layer: str) -> list[str]:
    paths = [PACKAGE / "batch.py"] if layer == "batch" else sorted((PACKAGE / layer).rglob("*.py"))
    return [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
            for path in paths if path.name not in SELF_CONTAINED_HF
            for line, module in imported_modules(path)
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer])]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_import_direction(layer):
    assert not violations(layer), "\n".join(violations(layer))


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: a function-level import of the model from parallel code is reported."""
    fake = tmp_path / "megatron_genlip"
    (fake / "parallel").mkdir(parents=True)
    (fake / "parallel" / "bad.py").write_text("def f():\n    from megatron_genlip.model import genlip\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations("parallel") == ["megatron_genlip/parallel/bad.py:2 imports megatron_genlip.model.genlip"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_lines(path: Path) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports for annotations only, never executed)."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports when run (anywhere in the file, functions included; not under
    ``if TYPE_CHECKING``); ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``."""
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        edges = set()
        skipped = type_checking_lines(path)
        for line, name in imported_modules(path):
            if line in skipped:
                continue
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "megatron_genlip" and name != module_name(path):
                edges.add(name)
        graph[module_name(path)] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_anywhere_in_the_library():
    """Every package, functions included: a cycle hidden by moving an import into a function is still a cycle."""
    assert cycles(import_graph(PACKAGE)) == []


def test_the_cycle_check_sees_a_cycle_through_a_function_import(tmp_path, monkeypatch):
    fake = tmp_path / "megatron_genlip"
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "a.py").write_text("from megatron_genlip.data.b import thing\n")
    (fake / "data" / "b.py").write_text("def f():\n    from megatron_genlip.data import a\n")
    (fake / "data" / "c.py").write_text("import megatron_genlip.data.a\n")
    (fake / "data" / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from megatron_genlip.data.e import E\n")
    (fake / "data" / "e.py").write_text("from megatron_genlip.data import d\n")
    assert cycles(import_graph(fake)) == [["megatron_genlip.data.a", "megatron_genlip.data.b"]]
