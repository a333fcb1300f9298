"""Scratch PostgreSQL databases for the tests that run on PostgreSQL too.

``NNUNET_NODE_TEST_POSTGRES_URL`` names a server database from which a test may create and drop
databases (``.ci/run`` starts a throw-away server and sets it); without it those tests are skipped
with :data:`NOT_SET`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

SERVER_URL = os.environ.get("NNUNET_NODE_TEST_POSTGRES_URL")
NOT_SET = "NNUNET_NODE_TEST_POSTGRES_URL is not set (.ci/run sets it)"


@contextmanager
def scratch_database(prefix: str = "nnunet_test") -> Iterator[str]:
    """A new, empty database named ``prefix`` and a random suffix on the server of
    ``NNUNET_NODE_TEST_POSTGRES_URL``; yields its URL and drops it afterwards (``WITH (FORCE)``:
    connections still open are closed)."""
    assert SERVER_URL, NOT_SET
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(SERVER_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(SERVER_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
