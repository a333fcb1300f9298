"""Fixtures for the DIMSE node tests: a migrated SQLite index, an archive, a node on a free port,
a phantom CT series on disk. dcmtk is run through :mod:`tests.support.dcmtk`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.core.settings import Settings
from nnunet_node.node.ae import DicomNode
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.storage.archive import Archive
from tests.support.dimse import NodeFactory


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small phantom CT series (12 slices of 40x40)."""
    folder = tmp_path_factory.mktemp("phantom") / "ct"
    return write_dicom_series(make_phantom(3, shape=(12, 40, 40), spacing=(1.0, 1.0, 3.0)), folder)


@pytest.fixture
def archive(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Archive]:
    made = Archive(tmp_path / "data" / "dicom", sessions)
    yield made
    made.close()  # closed by whoever made it: the nodes that used it have stopped by now


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", dicom_port=0, ae_title="NNUNET_NODE")


@pytest.fixture
def start_node(settings: Settings, archive: Archive) -> Iterator[NodeFactory]:
    """Start nodes on free loopback ports; all are stopped at the end of the test."""
    started: list[DicomNode] = []

    def start(
        *, routing: dict[str, Any] | None = None, archive_: Archive | None = None, **overrides: Any
    ) -> DicomNode:
        node_settings = settings.model_copy(update=overrides) if overrides else settings
        node = DicomNode(
            node_settings,
            archive_ or archive,
            RoutingTable.from_spec(routing or {}),
            host="127.0.0.1",
            port=0,
        )
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
