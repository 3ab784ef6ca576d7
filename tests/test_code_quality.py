"""The code stays as clean as it was made: ruff's lint and format, the import layers of
docs/architecture.md (import-linter, configured in pyproject.toml), and short modules."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500


def _run(command: list[str]) -> subprocess.CompletedProcess:
    # PYTHONPATH: import-linter must read this tree's moekit, whatever is installed.
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return [sys.executable, "-m", "ruff"]


def test_ruff_lint_passes():
    done = _run([*_ruff(), "check", "src", "tests", "bench"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_leaves_every_file_unchanged():
    done = _run([*_ruff(), "format", "--check", "src", "tests", "bench"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_imports_follow_the_layers():
    lint_imports = shutil.which("lint-imports")
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = _run([lint_imports, "--no-cache"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_is_longer_than_500_lines():
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in (ROOT / "src").rglob("*.py")
    }
    too_long = {path: n for path, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


MAX_CLI_FUNCTION_LINES = 60
CLI_MODULES = ("cli.py", "*/cli.py", "*_cli.py", "*/*_cli.py", "benchmark.py")


def test_no_cli_function_is_longer_than_60_lines():
    """A command reads as named steps (parse, check, build, run, print), each short."""
    package = ROOT / "src" / "moekit"
    too_long = {}
    for path in sorted({path for pattern in CLI_MODULES for path in package.glob(pattern)}):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLI_FUNCTION_LINES:
                    too_long[f"{path.relative_to(package)}:{node.name}"] = lines
    assert not too_long, f"CLI functions over {MAX_CLI_FUNCTION_LINES} lines: {too_long}"


def test_no_test_module_imports_another():
    """Shared models live in tests/builders.py, other shared pieces in helper modules: a
    test module that imports another runs (and collects) that module's tests' setup too."""
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not found, f"test modules import test modules: {found}"
