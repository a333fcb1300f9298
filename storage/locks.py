"""Locks shared by the processes that write one archive (the node's receiver processes), and the
lock that keeps a data folder to one node (:class:`DataFolderLock`).

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
