"""Fixtures for the DIMSE node tests: a migrated SQLite index, an archive, a node on a free port,
a phantom CT series on disk, and dcmtk run with ``TCP_NODELAY=1`` (FACTS: Nagle otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.core.settings import Settings
from nnunet_node.node.ae import DicomNode
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.migrations import upgrade
from tests.peer_tools import tool

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(
    *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool (found by its real location; skipped when missing) with Nagle off (in
    ``cwd``); output (stdout + stderr) in ``.stdout``."""
    return subprocess.run(
        [tool(args[0]), *args[1:]],
        env=DCMTK_ENV,
        capture_output=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def retrieve(
    tool: str, port: int, *options: str, cwd: Path | None = None, **keys: str
) -> subprocess.CompletedProcess[str]:
    """Run ``movescu`` or ``getscu`` (verbose) against the node at ``port`` with ``options``
    (``-S``, ``-aem PACS``, ``-od DIR``...) and one ``-k Keyword=value`` per key, in order
    (in ``cwd``: movescu's ``+B`` writes there, whatever ``-od`` says)."""
    identifier = [arg for key, value in keys.items() for arg in ("-k", f"{key}={value}")]
    return dcmtk(
        tool, "-v", *options, "-aec", "NNUNET_NODE", *identifier, "127.0.0.1", str(port), cwd=cwd
    )


@pytest.fixture(scope="session")
def node_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("node-template") / "node.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small phantom CT series (12 slices of 40x40)."""
    folder = tmp_path_factory.mktemp("phantom") / "ct"
    return write_dicom_series(make_phantom(3, shape=(12, 40, 40), spacing=(1.0, 1.0, 3.0)), folder)


@pytest.fixture
def sessions(tmp_path: Path, node_db_template: Path) -> Iterator[sessionmaker[Session]]:
    target = tmp_path / "data" / "node.db"
    target.parent.mkdir(parents=True)
    shutil.copyfile(node_db_template, target)
    engine = make_engine(f"sqlite:///{target}")
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def archive(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Archive]:
    made = Archive(tmp_path / "data" / "dicom", sessions)
    yield made
    made.close()  # closed by whoever made it: the nodes that used it have stopped by now


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", dicom_port=0, ae_title="NNUNET_NODE")


NodeFactory = Callable[..., DicomNode]


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
