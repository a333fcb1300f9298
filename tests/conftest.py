"""Suite-wide checks, defaults and fixtures. Under ``CI=true`` every real DICOM peer (dcmtk,
dicom3tools) must be installed: CI installs them, so a missing one stops the run here instead of
skipping tests. ``migrated_template`` is the one SQLite database migrated to head for the run;
tests copy it (:func:`tests.support.database.copy_database`), ``sessions`` gives a test its own
copy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.storage.db import make_engine, make_sessionmaker
from tests.peer_tools import in_ci, missing_reason, missing_tools
from tests.support.database import copy_database, migrate_to_head

# One receiving DICOM process unless a test asks for more: many tests change the node's archive
# or read its metrics in the test's own process right after a C-STORE, which a receiver process
# (node/receivers.py) would not see. tests/node/test_receivers.py and the SIGKILL test of
# tests/integration/test_dicom_process.py run the node with several.
os.environ.setdefault("NNUNET_NODE_DICOM_PROCESSES", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = missing_tools()
    if missing and in_ci():
        raise pytest.UsageError(
            "CI=true but real DICOM peers are missing: "
            + "; ".join(missing_reason(name) for name in missing)
        )


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite database migrated to head for the whole run; tests copy it (migrating each time
    would cost about 0.2 s)."""
    return migrate_to_head(tmp_path_factory.mktemp("migrated") / "node.db")


@pytest.fixture
def sessions(tmp_path: Path, migrated_template: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on this test's own copy of the migrated database, ``tmp_path/data/node.db``."""
    engine = make_engine(copy_database(migrated_template, tmp_path / "data" / "node.db"))
    yield make_sessionmaker(engine)
    engine.dispose()
