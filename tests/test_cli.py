"""The `hf-moe` command line: fast help and version, every option explained once."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}

# Runs the CLI in a fresh interpreter and reports which heavy modules the answer needed.
HELP_CHILD = """
import sys
from conversions.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("HEAVY:", sorted(m for m in ("torch", "transformers", "hf_moe") if m in sys.modules), "EXIT:", code)
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HELP_CHILD, *args], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=120, check=False)


def test_help_and_version_do_not_import_torch_or_transformers():
    for args in (["--help"], ["upcycle", "--help"], ["--version"]):
        run = run_cli(*args)
        assert "HEAVY: [] EXIT: 0" in run.stdout, (args, run.stdout, run.stderr)


def test_python_dash_m_conversions_help_imports_nothing_heavy():
    probe = ("import runpy, sys; sys.argv = ['conversions', '--help']\n"
             "try:\n    runpy.run_module('conversions', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('HEAVY:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, cwd=REPO,
                         timeout=120, check=False)
    assert "usage: hf-moe" in run.stdout and "HEAVY: []" in run.stdout, run.stdout + run.stderr


def test_version_names_the_package_version():
    import hf_moe

    run = run_cli("--version")
    assert run.stdout.startswith(f"hf-moe {hf_moe.__version__}\n"), run.stdout + run.stderr


def test_every_option_is_explained_and_defaults_are_stated_once():
    text = run_cli("upcycle", "--help").stdout
    options = text[text.index("options:"):]
    for option in ("--router-init", "--seed"):
        block = options[options.index(option):].split("\n  --", 1)[0]
        assert len(" ".join(block.split())) > len(option) + 40, f"{option} has no help text:\n{block}"
    assert "(default: None)" not in text
    assert " ".join(text.split()).count("default: source folder name") == 1
