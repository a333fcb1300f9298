"""The import direction of docs/architecture.md.

core <- storage, inference, export <- pipeline <- node, api.

Every folder is a sub-package of the one import name ``nnunet_node``; code that imports a folder by
its bare name (``from core.errors import ...``) would load a second copy of it, so that is refused
too. The top-level modules of ``nnunet_node`` (``cli``, ``app``) are the composition roots and may
import everything.
"""

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
BARE = "<bare>"
"""Marks an import of a folder by its bare name instead of through ``nnunet_node``."""


def _parse(path: Path) -> ast.Module:
    """``ast.parse`` of ``path``, tried a second time on CPython 3.11's spurious "AST
    constructor recursion depth mismatch" SystemError (seen once in a whole-suite run on
    3.11.7; the same file parses the next time, python/cpython#106905)."""
    source = path.read_text()
    try:
        return ast.parse(source, filename=str(path))
    except SystemError:
        return ast.parse(source, filename=str(path))


def _imported_packages(path: Path) -> set[str]:
    """The sub-packages of ``nnunet_node`` that ``path`` imports (:data:`BARE` for bare ones)."""
    tree = _parse(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "nnunet_node":
                names = [f"nnunet_node.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "nnunet_node" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add(parts[1])
            elif parts[0] in PACKAGES:
                found.add(BARE)
    return found


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_design_allows(package: str) -> None:
    offences = []
    for path in _python_files(ROOT / package):
        bad = _imported_packages(path) - ALLOWED[package] - {package}
        if bad:
            offences.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("folder", ["nnunet_node", "tests", "bench", "scripts", "alembic"])
def test_no_folder_is_imported_by_its_bare_name(folder: str) -> None:
    paths = [ROOT / "nnunet_node" / p for p in ("cli.py", "app.py", "__init__.py")]
    if folder != "nnunet_node":
        paths = _python_files(ROOT / folder)
    offences = [str(p.relative_to(ROOT)) for p in paths if BARE in _imported_packages(p)]
    assert not offences, f"import these through nnunet_node: {offences}"


def test_every_folder_is_linked_into_the_import_package() -> None:
    for name in [*PACKAGES, "alembic"]:
        link = ROOT / "nnunet_node" / name
        assert link.is_symlink() and link.resolve() == ROOT / name, name


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text(
        "from nnunet_node.api.app import create_app\nimport nnunet_node.storage.models\n"
        "from nnunet_node import pipeline\n"
    )
    assert _imported_packages(sample) == {"api", "storage", "pipeline"}
    sample.write_text("from core.errors import ConfigError\n")
    assert _imported_packages(sample) == {BARE}


SQL_TYPES_OUTSIDE_STORAGE = {
    "sqlalchemy": {"Engine"},
    "sqlalchemy.orm": {"Session", "sessionmaker"},
}
"""What of SQLAlchemy the layers above storage may name: the engine and session factory types
they pass on. Statements (``select``, ``update``, ``text``, ...) belong to ``storage``."""


def _sqlalchemy_names(path: Path) -> set[str]:
    """``module.name`` of everything ``path`` imports from SQLAlchemy (``module`` alone for a
    plain ``import``)."""
    tree = _parse(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sqlalchemy"}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "sqlalchemy"
        ):
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("package", ["pipeline", "node", "api"])
def test_storage_owns_every_sql_statement(package: str) -> None:
    allowed = {f"{m}.{n}" for m, names in SQL_TYPES_OUTSIDE_STORAGE.items() for n in names}
    bad = {
        str(path.relative_to(ROOT)): sorted(_sqlalchemy_names(path) - allowed)
        for path in _python_files(ROOT / package)
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_sql_checker_sees_a_statement(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from sqlalchemy import select, Engine\nimport sqlalchemy.orm\n")
    assert _sqlalchemy_names(sample) == {"sqlalchemy.select", "sqlalchemy.Engine", "sqlalchemy.orm"}


def _pytest_modules_imported(path: Path) -> set[str]:
    """The modules ``path`` imports that pytest loads itself: ``conftest`` modules and test
    modules (``test_*``). pytest imports those under its own names, so importing them again makes
    a second copy with its own state; shared helpers live in ``tests/support/`` instead."""
    tree = _parse(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            last = module.split(".")[-1]
            if last == "conftest" or last.startswith("test_"):
                found.add(module)
    return found


def test_no_test_imports_a_conftest_or_a_test_module() -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(_pytest_modules_imported(path))
        for folder in (ROOT / "tests", ROOT / "bench")
        for path in _python_files(folder)
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_pytest_module_checker_sees_conftest_and_test_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from tests.node.conftest import dcmtk\nimport conftest\n"
        "from tests.integration.test_routed_flow import Node\nfrom tests.support.dcmtk import x\n"
    )
    assert _pytest_modules_imported(sample) == {
        "tests.node.conftest",
        "conftest",
        "tests.integration.test_routed_flow",
    }
