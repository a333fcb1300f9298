"""Locks shared by the processes that write one archive (the node's receiver processes), and the
locks that keep a data folder and a PostgreSQL database to one node (:class:`DataFolderLock`,
:class:`DatabaseLock`).

:class:`ProcessLocks` holds advisory byte-range locks (fcntl(2) open file description locks, one
byte each) on one lock file: every process that opens the same file and locks the same byte
waits for the others, and the kernel releases the locks of a process that dies, so a killed
receiver never leaves a lock behind. The lock belongs to the open file, which all threads of the
process share: callers serialise their own threads first (a ``threading.Lock`` per byte) and
take the byte second.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nnunet_node.core.errors import ConfigError

# Open file description locks (Linux 3.15; POSIX.1-2024 F_OFD_SETLKW): owned by the open file,
# not the process, so the kernel's deadlock check, which sees processes and not threads, cannot
# refuse a wait that is safe thread by thread (thread A of one process waits for the index lock
# held by thread B of another, while thread C of that one waits for a stripe A holds).
_SET_LOCK_WAIT: int | None = getattr(fcntl, "F_OFD_SETLKW", None)


def _flock(kind: int, index: int) -> bytes:
    """A ``struct flock`` (fcntl(2)) for the one byte at offset ``index``; ``l_pid`` 0."""
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, index, 1, 0)


def available() -> bool:
    """Whether this system has open file description locks (Linux)."""
    return _SET_LOCK_WAIT is not None


class ProcessLocks:
    """Exclusive locks numbered ``0 .. n`` shared between processes through the file ``path``
    (created when missing). Raises OSError when the file cannot be opened."""

    def __init__(self, path: Path) -> None:
        if _SET_LOCK_WAIT is None:
            raise OSError("open file description locks (F_OFD_SETLKW) are not available here")
        self.path = path
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._descriptor()  # fail early: the folder must be writable

    def _descriptor(self) -> int:
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            return self._fd

    @contextmanager
    def hold(self, index: int) -> Iterator[None]:
        """Hold lock ``index`` (waits for another process that holds it). The caller's threads
        must already be serialised on ``index`` (see the module docstring)."""
        fd = self._descriptor()
        assert _SET_LOCK_WAIT is not None  # checked in __init__
        fcntl.fcntl(fd, _SET_LOCK_WAIT, _flock(fcntl.F_WRLCK, index))
        try:
            yield
        finally:
            fcntl.fcntl(fd, _SET_LOCK_WAIT, _flock(fcntl.F_UNLCK, index))

    def close(self) -> None:
        """Close the lock file (call it when no lock is held; a later :meth:`hold` opens it
        again)."""
        with self._fd_lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class DataFolderLock:
    """The one node process that uses a data folder: an exclusive flock(2) on
    ``<data>/node.lock``, held until :meth:`release` (the kernel drops it when the process dies,
    so a killed node leaves none behind). The file holds the holder's pid, for the message a
    second node gets.

    A second node on the same folder would "recover" the first one's live state at its start: put
    its running jobs back in the queue (they then run twice, into one output folder) and delete
    its spare and in-flight files under ``dicom/.incoming`` (its next C-STORE fails with 0xA701).
    Job workers on other hosts (``nnunet-node worker``) share the folder without this lock: they
    recover nothing.

    :meth:`acquire` raises ConfigError naming ``NNUNET_NODE_DATA`` when another process holds
    the lock, and OSError when the file cannot be opened.
    """

    NAME = "node.lock"

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, folder: Path) -> DataFolderLock:
        path = folder / cls.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise ConfigError(
                f"NNUNET_NODE_DATA: the folder {folder} is in use by another node{by}: stop it, "
                "or give this node a data folder of its own"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Let another node use the folder (closing the file drops the lock); idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class DatabaseLock:
    """The one node on a PostgreSQL database: a session-level advisory lock
    (``pg_try_advisory_lock``, PostgreSQL manual "Advisory Lock Functions") taken on a
    connection of its own and held until :meth:`release`; the server drops it when that session
    ends, so a node that died (or lost its connection) leaves none behind. Advisory locks are
    local to a database, so other databases on the server are not concerned.

    Two nodes with data folders of their own but one database would each recover the other's
    live state: put its running jobs back in the queue (they run twice), send its dispatches
    with their own spec and fire its routing rules. Job workers on other hosts
    (``nnunet-node worker``) share the database without this lock. SQLite needs none: its file
    lives in the data folder, which :class:`DataFolderLock` keeps to one node.

    :meth:`acquire` raises ConfigError naming ``NNUNET_NODE_DB_URL`` (the URL without its
    password) when another session holds the lock.
    """

    KEY = 0x6E6E754E6F646501
    """The lock's 64-bit key ("nnuNode" and 1), unlikely to be another program's."""

    def __init__(self, connection: Any) -> None:
        self._connection: Any = connection

    @classmethod
    def acquire(cls, engine: Any, shown_url: str) -> DatabaseLock | None:
        """Take the lock on ``engine``'s database (None for any other database than
        PostgreSQL); ``shown_url`` names the database in the error."""
        if engine.dialect.name != "postgresql":
            return None
        connection = engine.connect()
        try:
            taken = connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({cls.KEY})").scalar()
            holder = None if taken else cls._holder(connection)
            connection.commit()  # a session-level lock outlives the transaction
        except BaseException:
            connection.invalidate()
            connection.close()
            raise
        if not taken:
            connection.close()
            by = f" ({holder})" if holder else ""
            raise ConfigError(
                f"NNUNET_NODE_DB_URL: the database {shown_url} is in use by another node{by}: "
                "stop it, or give this node a database of its own (`nnunet-node worker` "
                "processes share it)"
            )
        return cls(connection)

    @classmethod
    def _holder(cls, connection: Any) -> str | None:
        """Where the session holding the lock comes from, for the message."""
        row = connection.exec_driver_sql(
            "SELECT a.pid, host(a.client_addr) FROM pg_locks l JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            f"AND l.classid = {cls.KEY >> 32} AND l.objid = {cls.KEY & 0xFFFFFFFF} "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).first()
        if row is None:
            return None
        pid, address = row
        return f"server process {pid}" + (f", client {address}" if address else "")

    def release(self) -> None:
        """Let another node use the database; idempotent. The connection is closed, not given
        back to the pool (its session would keep the lock)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.invalidate()
        finally:
            connection.close()
