"""The layering the library keeps: no import cycles, no imports of another module's private names, the network only
in `hf_moe.parallel`, and files short enough to read. Read from the source with `ast`, imports inside functions
included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hf_moe", "conversions", "benchmarks")
MAX_LINES = 400  # "no file over ~400 lines"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import statement of the module, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            found.append((base, [n for n in names if f"{base}.{n}" not in modules]))
            found += [(sub, []) for sub in submodules]
    return [(target, names) for target, names in found if target.split(".")[0] in PACKAGES]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        # the modules named in import statements (a package's __init__ that re-exports its submodules is no cycle)
        graph[name] = {target for target, _ in _imports(name, path, modules) if target in modules} - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = [
        f"{name}: {target}.{n}"
        for name, path in modules.items()
        for target, names in _imports(name, path, modules)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert private == []


def test_only_hf_moe_parallel_talks_to_the_network():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        if name.startswith("hf_moe.parallel") or not name.startswith("hf_moe"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
                offenders.append(name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
                offenders.append(name)
    assert offenders == []


@pytest.mark.parametrize("package", [*PACKAGES, "tests", "examples"])
def test_no_file_is_too_long_to_read(package):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_quack_is_imported_only_inside_the_functions_of_its_kernel_module():
    """quack-kernels is optional: hf-moe imports it (and its CuTe DSL, `cutlass`) only when a quack GEMM is asked
    for, from `hf_moe.moe.kernels.quack_gemm`'s functions."""
    optional = ("quack", "cutlass")
    found = []
    for name, path in _modules().items():
        if name.startswith("benchmarks"):  # the lab measures quack itself
            continue
        tree = ast.parse(path.read_text())
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(t.split(".")[0] in optional for t in targets):
                found.append((name, id(node) in in_function))
    assert found and all(where == ("hf_moe.moe.kernels.quack_gemm", True) for where in found), found
