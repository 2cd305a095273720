"""The import direction of the library's packages (module docstrings of megatron_genlip.batch, .model, .parallel,
.data): the batch format depends on nothing of ours; data and model never import each other; the parallel
primitives never import the model. Imports inside functions count too."""

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
             "megatron_genlip.inference", "megatron_genlip.hf"),
    "model": ("megatron_genlip.data", "megatron_genlip.training", "megatron_genlip.inference", "megatron_genlip.hf"),
    "parallel": ("megatron_genlip.model", "megatron_genlip.data", "megatron_genlip.training",
                 "megatron_genlip.inference", "megatron_genlip.hf"),
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
