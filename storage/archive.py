"""The file store and ingest: a DICOM instance's file and its index rows as one unit.

Files lie at ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Ingest
takes the Part 10 bytes as received (PS3.10 7.1: preamble, ``DICM``, File Meta Information),
reads the header without the pixel data and never decodes or re-encodes the dataset.

Order of one ingest, chosen so that a crash (SIGKILL, power loss) at any point leaves nothing half
done once :meth:`Archive.recover` has run at the next start:

1. Parse the header and check the four UIDs (PS3.5 9.1), then the free-space floor. Refusals leave
   no file and no row.
2. Write the bytes to ``<root>/.incoming/<SOPInstanceUID>.<random>.tmp`` (streamed ones:
   ``<random>.tmp``; ``recover`` goes by the header inside) and fsync it (and the folder, with
   ``fsync_folders``). Crash here: the temporary file has no row, ``recover``
   deletes it.
3. In ONE transaction upsert the patient, study, series and instance rows; commit (SQLite
   ``synchronous=FULL``: the row is durable, storage/db.py). Crash after the commit: the row
   exists and the temporary file holds its bytes, ``recover`` moves it into place.
4. Rename the temporary file to its final name; only then return, so the caller acknowledges
   (C-STORE success, STOW-RS reference) only what is in both the files and the index. The
   folder is not fsynced after the rename: should a power loss undo the rename, the temporary
   file (durable, with its committed row) is still there and ``recover`` moves it in.

Streaming (:meth:`Archive.open_incoming`, used by the DIMSE node): step 2 starts while the data
still arrives: the receiver writes each fragment into the temporary file as it comes, reads the
header as soon as the bytes hold it, and fsyncs the file after the last fragment while
:meth:`Archive.ingest_incoming` runs steps 1, 3 and 4 (the rows commit beside the fsync; both end
before it returns). Starting writeback earlier with ``sync_file_range`` was measured and gained
nothing: the fsync already runs beside the commit.

A re-sent instance (same SOP Instance UID) keeps ONE row: the newer copy replaces the older file and
the row is updated from it (the sender's latest word wins; ``IngestResult.duplicate`` says so).
Writes of the same SOP Instance UID are serialised in this process, so the file in place is always
the one the row describes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import shutil
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core import metrics
from nnunet_node.core.errors import InvalidDicom, StorageFull
from nnunet_node.storage.db import make_read_sessionmaker
from nnunet_node.storage.headers import (
    fit_column,
    is_valid_uid,
    read_header,
    read_header_pydicom,
)
from nnunet_node.storage.incoming import IncomingFile, SpareFiles, new_temp
from nnunet_node.storage.indexer import Header, Indexer
from nnunet_node.storage.locks import ProcessLocks
from nnunet_node.storage.models import Instance

LOGGER = logging.getLogger(__name__)


INCOMING = ".incoming"
LOCK_FILE = ".archive.lock"
_LOCK_STRIPES = 64
_INDEX_LOCK = 0
_FIRST_STRIPE_LOCK = 1


@dataclass(frozen=True)
class IngestResult:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    path: Path
    """The file's absolute path in the archive."""
    duplicate: bool
    """True when the instance was already indexed; the new copy replaced the old one."""


_COMPARE_CHUNK = 1 << 20
_META_HEAD = 144
"""Preamble (128), ``DICM`` (4) and the File Meta Information Group Length element (12)."""


def _data_set_start(fh: BinaryIO) -> int:
    """Where the data set starts in the Part 10 file ``fh``: after the File Meta Information,
    whose Group Length (0002,0000) says how long it is (PS3.10 7.1); 0 (the whole file) when
    the file does not start with that element."""
    head = fh.read(_META_HEAD)
    if len(head) == _META_HEAD and head[128:138] == b"DICM\x02\x00\x00\x00UL":
        return _META_HEAD + int(struct.unpack("<I", head[140:144])[0])
    return 0


def same_data_set(new: Path, held: Path) -> bool:
    """Whether the instance the archive holds at ``held`` (if any) has byte for byte the data
    set of ``new``: a re-sent instance that changes nothing. The File Meta Information is left
    out (it says how the copy arrived: the sender's implementation, its AE title), the data set
    as encoded is compared. A failed stat when nothing is held (a first arrival); both files
    read in 1 MiB pieces only when their data sets are the same size. Any OSError: False."""
    try:
        held_size = os.stat(held).st_size
        with open(new, "rb") as a, open(held, "rb") as b:
            start_a, start_b = _data_set_start(a), _data_set_start(b)
            if os.fstat(a.fileno()).st_size - start_a != held_size - start_b:
                return False
            a.seek(start_a)
            b.seek(start_b)
            while True:
                chunk = a.read(_COMPARE_CHUNK)
                if chunk != b.read(_COMPARE_CHUNK):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class RecoveryReport:
    completed: int = 0
    """Temporary files whose rows were committed, moved into place."""
    dropped: int = 0
    """Temporary files with bytes but without a committed row (never acknowledged), deleted."""
    spares: int = 0
    """Empty files without a row (spare files made ahead, or a transfer that never wrote a
    byte), deleted: nothing was received in them, so they are not counted as dropped."""


class Archive:
    """The DICOM file store under ``root`` and its index in the database."""

    def __init__(
        self,
        root: Path,
        session_factory: sessionmaker[Session],
        *,
        min_free_bytes: int = 0,
        fsync: bool = True,
        fsync_folders: bool = False,
        shared: bool = False,
        incoming_name: str | None = None,
    ) -> None:
        """``shared``: other processes write this archive at the same time (the node's receiver
        processes, node/receivers.py): writes of one SOP Instance UID and the index's write
        transactions are serialised across them too, through byte-range locks on
        ``<root>/.archive.lock`` (storage/locks.py). ``incoming_name``: this process receives
        into ``.incoming/<incoming_name>/``, a folder no other process writes, so that
        :meth:`recover` can finish that folder's interrupted writes while the others run on.

        Durability knobs (bench/bench_ingest.py --variants measures them):

        ``fsync``: fsync each temporary file before its row commits (default). Off, an
        acknowledged instance survives a crash of this process but not of the machine; pair it
        with ``make_engine(url, synchronous="NORMAL")`` for the fastest ingest.

        ``fsync_folders``: also fsync ``.incoming`` after each temporary file. POSIX makes a
        new name durable only by an fsync of its folder; ext4 and XFS (journalled) commit it
        with the file's own fsync, and the extra fsync cost ~4 ms per instance here (~45% of
        the write). Turn it on for other filesystems."""
        self.root = Path(root).resolve()
        self.session_factory = session_factory
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.fsync_folders = fsync and fsync_folders
        self.incoming = self.root / INCOMING
        if incoming_name is not None:
            self.incoming = self.incoming / incoming_name
        self.incoming.mkdir(parents=True, exist_ok=True)
        engine = session_factory.kw.get("bind")
        if not isinstance(engine, Engine):
            raise TypeError("Archive needs a sessionmaker bound to an Engine")
        self._process_locks = ProcessLocks(self.root / LOCK_FILE) if shared else None
        self._indexer = Indexer(
            engine,
            process_lock=(
                functools.partial(self._process_locks.hold, _INDEX_LOCK)
                if self._process_locks is not None and engine.dialect.name == "sqlite"
                else None
            ),
        )
        self.read_sessions = make_read_sessionmaker(engine)
        """Sessions for look-ups (C-FIND, C-MOVE/C-GET lists, QIDO, WADO): no write lock."""
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._spares = SpareFiles(self.incoming)
        self._dirs_lock = threading.Lock()

    # --- public API -------------------------------------------------------------------
    def ingest(
        self,
        data: bytes | Path,
        *,
        source: str,
        calling_ae: str = "",
        called_ae: str = "",
    ) -> IngestResult:
        """File and index one Part 10 instance (PS3.10 7.1: preamble, ``DICM``, File Meta
        Information, then the dataset as sent); return only once both are durable (module
        docstring, and ``docs/architecture.md``, "Crash safety of ingest").

        ``data`` is the file's bytes or a path to copy them from; ``source`` says how it came
        (``dimse``, ``stow``, ``job``), the AE titles which association brought it. Raises
        :class:`InvalidDicom` (unparsable, missing or unsafe UIDs, PS3.5 9.1) or
        :class:`StorageFull` (below the free-space floor), nothing written in both cases; an
        ``OSError`` of the disk or the database leaves nothing acknowledged either.
        ``storage/refusals.py`` maps each to its C-STORE status and STOW-RS Failure Reason.
        """
        header = read_header(data)
        size = len(data) if isinstance(data, bytes | bytearray) else Path(data).stat().st_size
        self._check_space(size)
        tmp = self._write_temp(header.sop_instance_uid, data)
        return self._commit(
            header, tmp, size, source=source, calling_ae=calling_ae, called_ae=called_ae
        )

    def open_incoming(self, head: bytes) -> IncomingFile:
        """A temporary file in ``.incoming`` for an instance about to arrive in fragments,
        starting with ``head`` (see :mod:`storage.part10`); file it with
        :meth:`ingest_incoming`, or :meth:`IncomingFile.discard` it. Raises OSError.

        The file was made beforehand when it could be (:data:`SPARE_FILES` are kept ready by a
        background thread): creating a file waits for the filesystem journal, which is busy
        committing the previous instance just then (~1.5 ms per instance here)."""
        path, fd = self._spares.take() or new_temp(self.incoming)
        return IncomingFile(path, fd, head, fsync=self.fsync)

    def close(self) -> None:
        """Delete the spare temporary files and stop making them, and give the index writer's
        connection back (the node's shutdown). The archive still works afterwards."""
        self._spares.close()
        self._indexer.close()
        if self._process_locks is not None:
            self._process_locks.close()

    def ingest_incoming(
        self,
        incoming: IncomingFile,
        *,
        source: str,
        calling_ae: str = "",
        called_ae: str = "",
    ) -> IngestResult:
        """File a completely received :class:`IncomingFile`, as :meth:`ingest` files bytes:
        return only once the file and its rows are durable. Raises InvalidDicom or StorageFull
        (also for a write that failed for want of space) or OSError; then the file is gone.

        The rows commit while the file may still be flushing (:meth:`IncomingFile.complete`,
        in the receiving thread): both must be done before this returns, and a flush that
        fails takes the commit back. ``recover`` checks a temporary file's size against its
        row, so that a power loss between the two cannot move a short file into place."""
        try:
            if incoming.error is not None:
                if incoming.error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFull(f"no space left in {self.root}") from incoming.error
                raise incoming.error
            header = incoming.header()
            incoming.check_complete()
            self._check_space(0)  # the file is already on the disk: what is left is free
        except BaseException:
            incoming.discard()
            raise
        return self._commit(
            header,
            incoming.path,
            incoming.size,
            source=source,
            calling_ae=calling_ae,
            called_ae=called_ae,
            durable=incoming.sync,
        )

    def ingest_dataset(self, ds: Dataset, *, source: str = "job") -> IngestResult:
        """Ingest a dataset of ours (SEG, RTSTRUCT): encode it as a Part 10 file first.

        The File Meta Information is completed from the dataset (PS3.10 7.1); an absent transfer
        syntax defaults to Explicit VR Little Endian.
        """
        buffer = io.BytesIO()
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            meta = pydicom.dataset.FileMetaDataset(meta or {})
            meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds = ds.copy()
            ds.file_meta = meta
        try:
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        except Exception as exc:
            raise InvalidDicom(f"dataset cannot be written as a Part 10 file: {exc}") from exc
        return self.ingest(buffer.getvalue(), source=source)

    def path_for(self, instance: Instance) -> Path:
        """The absolute path of an indexed instance's file."""
        return self.root / instance.path

    def recover(self, folder: Path | None = None) -> RecoveryReport:
        """Finish or drop the writes a crash interrupted; call at start, before any ingest.

        A temporary file is matched to its row by the SOP Instance UID in its header (or, when
        the header cannot be read, in its name). With a row of the same size, it is the newest
        copy of an instance whose index write committed: it is re-indexed and moved into place
        (the newer copy wins, as for any re-sent instance). Otherwise it was never acknowledged
        (no row; or a row that committed while the file was still flushing, and a power loss
        cut the file short): it is deleted, with a row that has no file left, and a row whose
        file in place is an older copy is indexed from that copy again. Spare files are empty:
        deleted. Oldest first, so the newest copy ends in place.

        ``folder``: only the temporary files in that folder, one that no other process writes
        (a receiver process that died, node/receivers.py); by default those of this archive's
        ``.incoming`` and of every folder in it (at start, before any receiver runs).
        """
        report = RecoveryReport()
        folders = [folder] if folder is not None else [self.incoming]
        if folder is None:
            folders += sorted(p for p in self.incoming.iterdir() if p.is_dir())
        temps = sorted(
            (p for f in folders for p in f.iterdir() if p.is_file()),
            key=lambda p: p.stat().st_mtime,
        )
        for tmp in temps:
            cut = False
            try:
                header: Header | None = read_header(tmp)
            except InvalidDicom:
                cut = True  # never filed as it is; its header may still say whose it was
                try:
                    header = read_header_pydicom(tmp)
                except InvalidDicom:
                    header = None
            # Unreadable: the name may still say whose it was ("<SOPInstanceUID>.<random>.tmp").
            sop = header.sop_instance_uid if header else tmp.name.rsplit(".", 2)[0]
            with self.session_factory() as session:
                row = (
                    session.scalars(select(Instance).filter_by(sop_instance_uid=sop)).one_or_none()
                    if is_valid_uid(sop)
                    else None
                )
            size = tmp.stat().st_size
            if row is None and size == 0:
                tmp.unlink(missing_ok=True)
                report.spares += 1
                continue
            if row is None or header is None or cut or size != row.size_bytes:
                if header is not None or size:
                    LOGGER.warning("recover: %s was never acknowledged: deleted", tmp.name)
                tmp.unlink(missing_ok=True)
                report.dropped += 1
                if row is not None:
                    self._reindex_or_drop(row)
                continue
            self._commit(
                header,
                tmp,
                size,
                source=row.source,
                calling_ae=row.calling_ae,
                called_ae=row.called_ae,
            )
            report.completed += 1
        if report.completed or report.dropped or report.spares:
            for touched in folders:
                _fsync_dir(touched)
        if report.completed or report.dropped:
            LOGGER.warning(
                "recover: %d interrupted write(s) completed, %d dropped",
                report.completed,
                report.dropped,
            )
        return report

    def _reindex_or_drop(self, row: Instance, final: Path | None = None) -> None:
        """A row whose newest copy was dropped: index the copy in place (``final``, by default
        the row's path) again, since the row may describe the dropped one; or drop the row when
        no copy is in place."""
        final = final or self.path_for(row)
        try:
            header = read_header(final) if final.is_file() else None
        except InvalidDicom:
            header = None
        if header is None or header.sop_instance_uid != row.sop_instance_uid:
            with self.session_factory() as session, session.begin():
                self._indexer.remove(session.connection(), row.id)
            return
        self._indexer.upsert(
            header,
            size=final.stat().st_size,
            source=row.source,
            calling_ae=row.calling_ae,
            called_ae=row.called_ae,
        )

    # --- steps --------------------------------------------------------------------------
    def _check_space(self, size: int) -> None:
        if self.min_free_bytes <= 0:
            return
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            raise StorageFull(
                f"{free // 2**20} MiB free in {self.root}, floor {self.min_free_bytes // 2**20} MiB"
            )

    def _write_temp(self, sop_uid: str, data: bytes | Path) -> Path:
        tmp = self.incoming / f"{sop_uid}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if isinstance(data, bytes | bytearray):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            else:
                with open(data, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        if self.fsync_folders:
            # The name must be durable before the row commits, or a power loss could leave a
            # committed row whose bytes are nowhere (see __init__).
            _fsync_dir(self.incoming)
        return tmp

    def _commit(
        self,
        header: Header,
        tmp: Path,
        size: int,
        *,
        source: str,
        calling_ae: str,
        called_ae: str,
        durable: Callable[[], None] | None = None,
    ) -> IngestResult:
        """Index ``tmp`` and move it into place. ``durable``, when given, makes ``tmp`` durable
        (it may still be flushing while the rows commit) and is awaited before the move; if
        it fails, the commit is undone."""
        final = self.root / header.relative_path
        stripe = zlib.crc32(header.sop_instance_uid.encode()) % _LOCK_STRIPES
        committed = False
        try:
            self._ensure_dir(final.parent)
            with self._hold_stripe(stripe):
                duplicate, old_path = self._indexer.upsert(
                    header,
                    size=size,
                    source=fit_column(Instance, "source", source),
                    calling_ae=fit_column(Instance, "calling_ae", calling_ae.strip()),
                    called_ae=fit_column(Instance, "called_ae", called_ae.strip()),
                    changed=not same_data_set(tmp, final),
                )
                committed = True
                if durable is not None:
                    try:
                        durable()
                    except BaseException:
                        self._undo(header, old_path if duplicate else None)
                        committed = False
                        raise
                # No fsync of the folder after the rename: if a power loss undoes the rename,
                # the temporary file (durable, with its committed row) is moved in by recover().
                os.replace(tmp, final)
                if old_path is not None and old_path != header.relative_path:
                    # The re-sent instance names another series or study: drop the old file.
                    (self.root / old_path).unlink(missing_ok=True)
        except BaseException:
            if not committed:
                tmp.unlink(missing_ok=True)
            else:
                LOGGER.exception("indexed %s but could not move it into place", tmp.name)
            raise
        metrics.instance_received(source, calling_ae, header.transfer_syntax_uid, size)
        return IngestResult(
            sop_instance_uid=header.sop_instance_uid,
            series_instance_uid=header.series_instance_uid,
            study_instance_uid=header.study_instance_uid,
            sop_class_uid=header.sop_class_uid,
            path=final,
            duplicate=duplicate,
        )

    @contextlib.contextmanager
    def _hold_stripe(self, stripe: int) -> Iterator[None]:
        """Serialise the writes of SOP Instance UIDs that hash to ``stripe``: this process's
        threads, and with ``shared`` the other processes too."""
        with self._locks[stripe]:
            if self._process_locks is None:
                yield
            else:
                with self._process_locks.hold(_FIRST_STRIPE_LOCK + stripe):
                    yield

    def _undo(self, header: Header, old_path: str | None) -> None:
        """Take back a committed index write whose file could not be made durable: index the
        copy still in place again (a re-sent instance), or drop the new row."""
        with self.session_factory() as session:
            row = session.scalars(
                select(Instance).filter_by(sop_instance_uid=header.sop_instance_uid)
            ).one_or_none()
        if row is not None:
            self._reindex_or_drop(row, self.root / old_path if old_path else None)

    def _ensure_dir(self, folder: Path) -> None:
        """Create the study and series folders, fsyncing each parent that gained an entry."""
        if folder.is_dir():
            return
        with self._dirs_lock:
            missing: list[Path] = []
            probe = folder
            while not probe.is_dir():
                missing.append(probe)
                probe = probe.parent
            for path in reversed(missing):
                path.mkdir(exist_ok=True)
                _fsync_dir(path.parent)


__all__ = [
    "Archive",
    "Header",
    "IncomingFile",
    "IngestResult",
    "RecoveryReport",
    "is_valid_uid",
    "read_header",
]
