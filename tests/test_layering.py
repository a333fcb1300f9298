"""DESIGN.md's import direction: core <- storage, inference, export <- pipeline <- node, api."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "storage", "inference", "export", "pipeline", "node", "api"]
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "storage": {"core"},
    "inference": {"core"},
    "export": {"core"},
    "pipeline": {"core", "storage", "inference", "export"},
    "node": {"core", "storage", "inference", "export", "pipeline"},
    "api": {"core", "storage", "inference", "export", "pipeline"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names)
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_design_allows(package: str) -> None:
    offences = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_packages(path) - ALLOWED[package] - {package}
        if bad:
            offences.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offences, "\n".join(offences)


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from api.app import create_app\nimport storage.models\n")
    assert _imported_packages(sample) == {"api", "storage"}
