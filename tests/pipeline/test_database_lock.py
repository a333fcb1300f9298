"""One node per PostgreSQL database: a second node with a data folder of its own on the same
database is refused at start with one line naming ``NNUNET_NODE_DB_URL``, while job workers
share the database (``storage/locks.DatabaseLock``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nnunet_node.core.errors import ConfigError
from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.context import build_context
from tests.support.postgres import NOT_SET, SERVER_URL, scratch_database

pytestmark = pytest.mark.skipif(not SERVER_URL, reason=NOT_SET)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with scratch_database("nnunet_dblock") as url:
        yield url


def _node(tmp: Path, name: str, url: str) -> Settings:
    return Settings(
        data_dir=tmp / name,
        db_url=url,
        model_serve_spec=REPO / "model-serve-spec.yaml",
        dicom_enabled=False,
        device="cpu",
        min_free_disk_mb=0,
    )


def test_a_second_node_on_the_database_is_refused_until_the_first_closes(
    tmp_path: Path, pg_url: str
) -> None:
    # Without the lock the second node started, and its start-up recovery put the first one's
    # running jobs back in the queue (run twice) and its dispatcher sent the first one's results
    # with its own spec.
    first = build_context(_node(tmp_path, "a", pg_url))
    try:
        with pytest.raises(ConfigError) as refused:
            build_context(_node(tmp_path, "b", pg_url))
        message = str(refused.value)
        assert message.startswith("NNUNET_NODE_DB_URL: the database postgresql")
        assert "is in use by another node (server process " in message, message
        worker = build_context(_node(tmp_path, "b", pg_url), recover=False, broker=False)
        worker.close()  # as `nnunet-node worker`: shares it
    finally:
        first.close()
    build_context(_node(tmp_path, "b", pg_url)).close()  # freed; the pool kept no lock
    build_context(_node(tmp_path, "a", pg_url)).close()
