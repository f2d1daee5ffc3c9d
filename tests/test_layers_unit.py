"""lb/ is laid out in layers; imports only point down (none at run time upward).

    control -> proxy -> tts -> scheduling -> wire      (config_model: anyone)

An import only for type hints (under `if TYPE_CHECKING:`) is allowed to
name an upper layer: it is not executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LB = Path(__file__).resolve().parent.parent / "lb"
ORDER = ["wire", "scheduling", "tts", "proxy", "control"]


def _layer(path: Path) -> str | None:
    rel = path.relative_to(LB).parts
    return rel[0] if len(rel) > 1 else None


def _runtime_imports(tree: ast.Module, package: list[str]) -> list[str]:
    """Absolute lb.* module names imported outside `if TYPE_CHECKING:`."""
    out = []

    def visit(node, guarded=False):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                out.append(name)
                if not node.module:
                    out.extend(f"{name}.{a.name}" for a in node.names)
            elif node.module and node.module.startswith("lb"):
                out.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)
    visit(tree)
    return out


MODULES = sorted(p for p in LB.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(LB)))
def test_imports_point_down(path):
    layer = _layer(path)
    if layer is None:
        return      # lb/__main__.py and the vocabulary (config_model) sit above/below all
    package = ["lb", *path.relative_to(LB).parts[:-1]]
    rank = ORDER.index(layer)
    for name in _runtime_imports(ast.parse(path.read_text()), package):
        parts = name.split(".")
        if len(parts) > 1 and parts[1] in ORDER:
            assert ORDER.index(parts[1]) <= rank, f"{path.relative_to(LB)} imports {name}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(LB)))
def test_no_module_is_much_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 440, path
