"""`conversions` is layered: no module imports another that imports it back (function-level and type-checking
imports count); its model-card templates install as its package data."""

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "conversions"


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


def test_wheel_installs_the_model_card_templates_as_conversions_package_data(tmp_path):
    """The templates land in `conversions/model_cards/` (no top-level `model_cards` in site-packages), and an
    installed `conversions.model_card` finds them there."""
    pytest.importorskip("setuptools", minversion="77")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("hf_moe", "conversions", "model_cards"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", source],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "conversions/model_cards/upcycled.md" in names
    assert not [n for n in names if n.startswith("model_cards/")], names

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"], check=True, timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True, capture_output=True,
                   timeout=300)
    probe = (f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"  # torch etc. from this venv
             "import conversions.model_card as m\nprint(m.TEMPLATE_PATH, m.TEMPLATE_PATH.is_file())")
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.stdout.split() == [f"{target}/conversions/model_cards/upcycled.md", "True"], run.stderr
