"""Engine and sessions: one engine and one sessionmaker per process, a session per unit of work.

SQLite runs in WAL mode with a busy timeout so that the DIMSE threads, the HTTP workers and the job
workers write without ``database is locked`` errors; any other SQLAlchemy URL (PostgreSQL) works
as is.

Durability: ``synchronous=FULL`` fsyncs the WAL at every commit, so a committed row survives a
power loss, not only a crash of the process. An acknowledged C-STORE hands responsibility for
the instance to us (the sender may delete its copy), so its index row must be as durable as its
file. ``NORMAL`` (faster, may lose the last commits on power loss) can be chosen per engine.

Write transactions start with ``BEGIN IMMEDIATE`` (a writer waits for the lock at the start, not
half-way through). Read-only work (C-FIND, QIDO-RS) should use :func:`make_read_sessionmaker`:
its transactions start with a plain ``BEGIN``, read a WAL snapshot and neither wait for writers
nor hold them up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


READ_ONLY = "nnunet_read_only"
"""Execution option that marks an engine (or connection) as read-only: plain BEGIN on SQLite."""


def make_engine(url: str, *, synchronous: str = "FULL") -> Engine:
    """Create the process's engine; for SQLite make the folder and turn on WAL and foreign keys."""
    if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling defers BEGIN; take it over so that a writer
        # takes the lock at BEGIN IMMEDIATE and waits there (busy timeout) instead of failing
        # on lock upgrade half-way through a transaction.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for queries only (C-FIND, QIDO-RS, WADO-RS look-ups): on SQLite they take no
    write lock. Do not write through them: a deferred transaction that turns into a writer can
    fail with ``database is locked`` when another writer got there first."""
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises."""
    with factory() as session, session.begin():
        yield session


def ping(factory: sessionmaker[Session]) -> None:
    """Run ``SELECT 1`` through a session of ``factory`` (the readiness probe); raises what the
    driver raises when the database cannot be reached."""
    with factory() as session:
        session.execute(text("SELECT 1"))
