"""Migrations are the only way the schema is made: up, down, up again, and equal to the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from nnunet_node.storage.db import make_engine
from nnunet_node.storage.migrations import current, downgrade, upgrade
from nnunet_node.storage.models import Base

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"patients", "studies", "series", "instances", "jobs", "job_artifacts", "dispatches"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_on_a_fresh_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert current(url) is None
    upgrade(url)
    assert current(url) == "0001"
    assert _tables(url) == TABLES
    downgrade(url, "base")
    assert current(url) is None
    assert _tables(url) == set()
    upgrade(url, "head")
    assert _tables(url) == TABLES
    upgrade(url)  # idempotent at head


def test_migrated_schema_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'diff.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_cli_db_upgrade(tmp_path: Path) -> None:
    env = {**os.environ, "NNUNET_NODE_DATA": str(tmp_path / "data")}
    env.pop("NNUNET_NODE_DB_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "nnunet_node.cli", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    db_file = tmp_path / "data" / "nnunet-node.db"
    assert db_file.is_file()
    assert current(f"sqlite:///{db_file}") == "0001"
