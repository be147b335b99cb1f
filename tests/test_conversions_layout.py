"""`conversions` is layered: no module imports another that imports it back (function-level and type-checking
imports count)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "conversions"


def imported_modules(path: Path) -> set[str]:
    """The sibling modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("conversions."):
            found.add(node.module.split(".")[1])
    return {name.split(".")[0] for name in found}


def test_conversions_modules_import_each_other_without_cycles():
    graph = {p.stem: imported_modules(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(module, ())):
            if nxt in path:
                cycles.append(" → ".join(path[path.index(nxt):] + [nxt]))
            elif nxt in graph:
                visit(nxt, path + [nxt])

    for module in graph:
        visit(module, [module])
    assert not cycles, cycles
