"""Files being received into the archive's ``.incoming`` folder, and spare ones made ahead."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path

from nnunet_node.core import dicomscan
from nnunet_node.core.errors import InvalidDicom
from nnunet_node.storage.headers import check_pixel_length, header_from_prefix, read_header
from nnunet_node.storage.indexer import Header

LOGGER = logging.getLogger(__name__)


HEAD_BYTES = 1 << 16
"""An incoming file keeps its first bytes in memory, to read the header from (CT, MR and the
like carry it in their first few KiB)."""


class IncomingFile:
    """A Part 10 file being received into the archive's ``.incoming`` folder.

    Made by :meth:`Archive.open_incoming` with its head (preamble and File Meta Information)
    already written; the receiver appends the dataset's fragments with :meth:`write` as they
    arrive, and :meth:`Archive.ingest_incoming` files it once complete. ``write`` never raises:
    the receiving thread must not die of a full disk; the first error is kept in :attr:`error`
    and reported by ``ingest_incoming``, and what follows it is not written. (Handing the writes
    to a thread of their own was measured and lost ~12% of the C-STORE rate on 2 cores.)

    It has the parts of a file object that pynetdicom's chunked C-STORE reception uses (``write``,
    ``file.flush``, ``close``, ``name``): pynetdicom deletes ``name`` after the C-STORE handler,
    which is a no-op once the file was moved into place or discarded.
    """

    def __init__(self, path: Path, fd: int, head: bytes, *, fsync: bool) -> None:
        self.path = path
        self.name = str(path)
        self.size = 0
        self.error: OSError | None = None
        self._fsync = fsync
        self._lock = threading.Lock()  # the receiving thread writes, another may discard
        self._synced = False
        self._head = bytearray()  # the first HEAD_BYTES written, to read the header from
        self._head_copy = b""  # the last bytes() of it (a 64 KiB copy costs ~4 us)
        self._header: Header | None = None
        self._pixel_at: int | None = None  # where the header scan found the pixel data
        self._head_tried = False
        self._fd: int | None = fd
        self.write(head)
        if self.error is not None:
            self.discard()
            raise self.error

    @property
    def file(self) -> IncomingFile:
        return self

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._lock:
            if self._fd is None or self.error is not None:
                return 0
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self.error = exc
                return 0
            self.size += len(data)
            if len(self._head) < HEAD_BYTES:
                self._head += memoryview(data)[: HEAD_BYTES - len(self._head)]
            return len(data)

    def flush(self) -> None:
        """Writes go straight to the file; nothing is buffered."""

    def read_ahead(self) -> None:
        """Read the header as soon as the bytes written hold it: the receiver calls this
        between fragments, so the handler does not wait for it. Never raises."""
        if self._header is not None or self._head_tried or self.error is not None:
            return
        pixel_at: list[int] = []
        self._header = header_from_prefix(self._head_bytes(), pixel_at)
        if self._header is not None and pixel_at:
            self._pixel_at = pixel_at[0]
        self._head_tried = self._header is None and len(self._head) >= HEAD_BYTES

    def header(self) -> Header:
        """The header (read ahead, or now: from memory when the whole file is there, else
        from the file). Raises InvalidDicom."""
        if self._header is None:
            whole = self.size == len(self._head)
            self._header = read_header(self._head_bytes() if whole else self.path)
        return self._header

    def _head_bytes(self) -> bytes:
        """The head as bytes (it only grows, so a copy of the same length is the same)."""
        if len(self._head_copy) != len(self._head):
            self._head_copy = bytes(self._head)
        return self._head_copy

    def check_complete(self) -> None:
        """Raise InvalidDicom when the received file ends inside its pixel data (PS3.5 7.1:
        the element's length says more bytes than came), or when its native pixel data holds
        fewer bytes than its image attributes say (:func:`check_pixel_length`). Read from the
        head kept in memory, so a header longer than :data:`HEAD_BYTES`, or one only pydicom
        reads, is not checked.
        When the header was read ahead by the node's scan, the pixel data element it found is
        checked where it lies, without scanning the head again."""
        whole = self.size == len(self._head)
        try:
            if self._pixel_at is not None and self._header is not None:
                check_pixel_length(self._head_bytes(), self._pixel_at, self._header, self.size)
                return
            dicomscan.scan(self._head_bytes(), frozenset(), complete=whole, size=self.size)
        except dicomscan.NotSure:
            return
        except dicomscan.Truncated as exc:
            raise InvalidDicom(f"not a readable DICOM Part 10 file: {exc}") from exc

    def complete(self) -> None:
        """The receiver wrote the last byte: start making the file durable now, in the
        receiving thread, while the handler reads the header and commits the rows."""
        with self._lock:
            if self._fd is not None and not self._synced and self.error is None and self._fsync:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self.error = exc
            self._synced = True

    def sync(self) -> None:
        """Make the written bytes durable (with the archive's ``fsync``; waits for a
        :meth:`complete` under way), then close; raises the first write or fsync error."""
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        self.complete()
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def discard(self) -> None:
        """Close and delete: the transfer was refused, failed or abandoned."""
        self.close()
        self.path.unlink(missing_ok=True)


def new_temp(folder: Path) -> tuple[Path, int]:
    """A new, empty temporary file in ``folder``, open for writing."""
    path = folder / f"{uuid.uuid4().hex}.tmp"
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


SPARE_FILES = 2
"""Empty temporary files kept ready for :meth:`Archive.open_incoming`."""


class SpareFiles:
    """Empty files in ``.incoming``, made ahead by a daemon thread (started on first use)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._ready: list[tuple[Path, int]] = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def take(self) -> tuple[Path, int] | None:
        with self._lock:
            if self._closed:
                return None
            spare = self._ready.pop() if self._ready else None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="archive-spare-files", daemon=True
                )
                self._thread.start()
        self._wanted.set()
        return spare

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if len(self._ready) >= SPARE_FILES:
                        break
                try:
                    path, fd = new_temp(self.folder)
                except OSError:
                    LOGGER.warning("cannot make a spare file in %s", self.folder, exc_info=True)
                    break
                with self._lock:
                    if self._closed:
                        os.close(fd)
                        path.unlink(missing_ok=True)
                        return
                    self._ready.append((path, fd))

    def close(self) -> None:
        """Stop making spare files and delete the ready ones. Returns once the thread has
        ended, so a file it was making just then is gone too (:meth:`Archive.recover` after
        :meth:`Archive.close` would otherwise count it as a spare, or find it deleted under it)."""
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
            thread = self._thread
        self._wanted.set()
        for path, fd in ready:
            os.close(fd)
            path.unlink(missing_ok=True)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
