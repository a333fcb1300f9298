"""Migrated SQLite databases for tests: the root ``conftest.py``'s ``migrated_template`` fixture
migrates one file to Alembic's head per run (about 0.2 s a time); each test copies it."""

from __future__ import annotations

import shutil
from pathlib import Path

from nnunet_node.storage.migrations import upgrade


def migrate_to_head(path: Path) -> Path:
    """A SQLite database at ``path`` migrated to head by the node's migrations; ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    upgrade(f"sqlite:///{path}")
    return path


def copy_database(template: Path, target: Path) -> str:
    """``template`` copied to ``target`` (folders made); the SQLAlchemy URL of the copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"
