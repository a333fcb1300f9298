"""Fixtures for the storage tests: a real SQLite file migrated by Alembic, an archive, DICOM bytes.

The DICOM builder (:mod:`tests.support.datasets`) makes small CT instances with pydicom directly
(4x4 int16 pixels), so these tests do not depend on the phantom generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.storage.archive import Archive
from nnunet_node.storage.db import make_engine, make_sessionmaker
from tests.support.database import copy_database
from tests.support.datasets import build_dataset, encode


@pytest.fixture
def index_url(tmp_path: Path, migrated_template: Path) -> str:
    """A copy of the run's migrated database (root ``conftest.py``) for this test."""
    return copy_database(migrated_template, tmp_path / "index.db")


@pytest.fixture
def index_sessions(index_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(index_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def archive(tmp_path: Path, index_sessions: sessionmaker[Session]) -> Archive:
    return Archive(tmp_path / "dicom", index_sessions)


@pytest.fixture
def make_instance() -> Callable[..., bytes]:
    """``make_instance(**attributes) -> Part 10 bytes`` (see :func:`build_dataset`)."""

    def make(**attributes: Any) -> bytes:
        return encode(build_dataset(**attributes))

    return make


@pytest.fixture
def make_dataset() -> Callable[..., Dataset]:
    """``make_dataset(**attributes) -> Dataset`` (see :func:`build_dataset`)."""
    return build_dataset
