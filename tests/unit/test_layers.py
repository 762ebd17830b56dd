"""The layers import only downwards: engine <- store <- actors <- serve <- ops.

``engine`` is pure rules, ``store`` speaks Postgres, ``actors`` are the Ray actors, ``serve``
is the HTTP edge and ``ops`` the command line around all of them; ``reporting`` talks to the
engine over HTTP only. Every import is counted, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "store", "actors", "serve", "ops", "reporting")
# What each package may import from the project (itself included).
ALLOWED = {
    "engine": {"engine"},
    "store": {"engine", "store"},
    "actors": {"engine", "store", "actors"},
    "serve": {"engine", "store", "actors", "serve"},
    "ops": {"engine", "store", "actors", "serve", "ops", "reporting"},
    "reporting": {"engine", "reporting"},
}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) for every import in one module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in PACKAGES]
    return found


def upward_imports(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, target in project_imports(path):
            if target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_only_down_the_layers(package: str) -> None:
    assert upward_imports(package) == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from serve.app import build_app\n    import actors.client\n")
    assert project_imports(module) == [(2, "serve"), (3, "actors")]
