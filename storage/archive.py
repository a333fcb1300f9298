"""The file store and ingest: a DICOM instance's file and its index rows as one unit.

Files lie at ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Ingest
takes the Part 10 bytes as received (PS3.10 7.1: preamble, ``DICM``, File Meta Information),
reads the header without the pixel data and never decodes or re-encodes the dataset.

Order of one ingest, chosen so that a crash (SIGKILL, power loss) at any point leaves nothing half
done once :meth:`Archive.recover` has run at the next start:

1. Parse the header and check the four UIDs (PS3.5 9.1), then the free-space floor. Refusals leave
   no file and no row.
2. Write the bytes to ``<root>/.incoming/<SOPInstanceUID>.<random>.tmp`` and fsync it (and the
   folder, with ``fsync_folders``). Crash here: the temporary file has no row, ``recover``
   deletes it.
3. In ONE transaction upsert the patient, study, series and instance rows; commit (SQLite
   ``synchronous=FULL``: the row is durable, storage/db.py). Crash after the commit: the row
   exists and the temporary file holds its bytes, ``recover`` moves it into place.
4. Rename the temporary file to its final name; only then return, so the caller acknowledges
   (C-STORE success, STOW-RS reference) only what is in both the files and the index. The
   folder is not fsynced after the rename: should a power loss undo the rename, the temporary
   file (durable, with its committed row) is still there and ``recover`` moves it in.

Streaming (:meth:`Archive.open_incoming`, used by the DIMSE node): step 2 starts while the data
still arrives. The receiver writes each fragment into the temporary file as it comes and asks the
kernel to start writing it back (``sync_file_range``), so the fsync at the end waits for little
more than the last fragment; :meth:`Archive.ingest_incoming` then runs steps 1, 3 and 4.

A re-sent instance (same SOP Instance UID) keeps ONE row: the newer copy replaces the older file and
the row is updated from it (the sender's latest word wins; ``IngestResult.duplicate`` says so).
Writes of the same SOP Instance UID are serialised in this process, so the file in place is always
the one the row describes.
"""

from __future__ import annotations

import ctypes
import errno
import io
import logging
import os
import re
import shutil
import threading
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session, sessionmaker

from core.errors import InvalidDicom, StorageFull
from storage.db import make_read_sessionmaker
from storage.indexer import Header, Indexer
from storage.models import Base, Instance, Patient, Series, Study

LOGGER = logging.getLogger(__name__)


INCOMING = ".incoming"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_LOCK_STRIPES = 64


def is_valid_uid(value: str) -> bool:
    """PS3.5 9.1: digits in dot-separated components, none empty, at most 64 characters.

    Leading zeros inside a component are tolerated (real devices send them); anything else
    (slashes, ``..``, letters, spaces) is refused, so a UID can never leave its folder.
    """
    return 0 < len(value) <= 64 and _UID.match(value) is not None


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


# Keyword -> column, per table. Values are only ever overwritten by a non-empty new value.
PATIENT_ATTRIBUTES = {
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
}
STUDY_ATTRIBUTES = {
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "StudyDescription": "study_description",
    "ReferringPhysicianName": "referring_physician_name",
}
SERIES_ATTRIBUTES = {
    "Modality": "modality",
    "SeriesDescription": "series_description",
    "BodyPartExamined": "body_part_examined",
    "SeriesDate": "series_date",
    "SeriesTime": "series_time",
    "FrameOfReferenceUID": "frame_of_reference_uid",
}
SERIES_INT_ATTRIBUTES = {"SeriesNumber": "series_number"}
INSTANCE_INT_ATTRIBUTES = {
    "InstanceNumber": "instance_number",
    "Rows": "rows",
    "Columns": "columns",
    "NumberOfFrames": "number_of_frames",
}


def _raw(ds: Dataset, keyword: str) -> Any:
    """The element's value as read: bytes while pydicom has not converted it yet."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds.get_item(tag)
    return None if elem is None else elem.value


def _text(ds: Dataset, keyword: str) -> str:
    """A text value. ASCII values are taken straight from the raw bytes (pydicom's conversion
    cost more than the rest of the header parse); others are decoded by pydicom with the
    dataset's Specific Character Set. Multiple values stay backslash-separated."""
    raw = _raw(ds, keyword)
    if raw is None:
        return ""
    if isinstance(raw, bytes) and raw.isascii():
        return raw.decode("ascii").strip("\x00 ")
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value).strip("\x00 ")
    return str(value).strip("\x00 ")


def _raw_text(ds: Dataset, keyword: str) -> str:
    """The value as sent, without pydicom's value validation (hostile UIDs are ours to judge)."""
    raw = _raw(ds, keyword)
    if raw is None:
        return ""
    if isinstance(raw, bytes):
        return raw.decode("ascii", errors="replace").strip("\x00 ")
    return str(raw).strip("\x00 ")


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        raw = _raw(ds, keyword)
        if isinstance(raw, bytes) and pydicom.datadict.dictionary_VR(keyword) == "IS":
            return int(raw.decode("ascii").strip("\x00 ")) if raw.strip(b"\x00 ") else None
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None


def _fit(model: type[Base], column: str, value: str) -> str:
    """Cut a value to its column's length: PostgreSQL refuses what SQLite would store."""
    length = getattr(model.__table__.c[column].type, "length", None)
    return value[:length] if length else value


def read_header(data: bytes | Path) -> Header:
    """Parse a Part 10 file's header (no pixel data) and check its UIDs, or raise InvalidDicom."""
    try:
        source: Any = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on bad bytes
        raise InvalidDicom(f"not a readable DICOM Part 10 file: {exc}") from exc
    try:
        uids = {
            kw: _raw_text(ds, kw)
            for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")
        }
        transfer_syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "").strip("\x00 ")
        for keyword, uid in uids.items():
            if not uid:
                raise InvalidDicom(f"{keyword} is missing")
            if not is_valid_uid(uid):
                raise InvalidDicom(f"{keyword} {uid[:80]!r} is not a valid UID (PS3.5 9.1)")
        header = Header(
            sop_instance_uid=uids["SOPInstanceUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=transfer_syntax if is_valid_uid(transfer_syntax) else "",
        )
        header.patient = {
            "patient_id": _fit(Patient, "patient_id", _text(ds, "PatientID")),
            "issuer_of_patient_id": _fit(
                Patient, "issuer_of_patient_id", _text(ds, "IssuerOfPatientID")
            ),
        }
        header.patient |= {c: _fit(Patient, c, _text(ds, k)) for k, c in PATIENT_ATTRIBUTES.items()}
        header.study = {c: _fit(Study, c, _text(ds, k)) for k, c in STUDY_ATTRIBUTES.items()}
        header.series = {c: _fit(Series, c, _text(ds, k)) for k, c in SERIES_ATTRIBUTES.items()}
        header.series |= {c: _int(ds, k) for k, c in SERIES_INT_ATTRIBUTES.items()}
        header.instance = {c: _int(ds, k) for k, c in INSTANCE_INT_ATTRIBUTES.items()}
        return header
    except InvalidDicom:
        raise
    except Exception as exc:  # a value that cannot be decoded
        raise InvalidDicom(f"unreadable header: {exc}") from exc


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None: it starts writeback of a range without
    waiting for it, so that a later fsync has less left to wait for."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class IncomingFile:
    """A Part 10 file being received into the archive's ``.incoming`` folder.

    Made by :meth:`Archive.open_incoming` with its head (preamble and File Meta Information)
    already written; the receiver appends the dataset's fragments with :meth:`write` as they
    arrive, and :meth:`Archive.ingest_incoming` files it once complete. ``write`` never raises:
    the receiving thread must not die of a full disk; the first error is kept in :attr:`error`
    and reported by ``ingest_incoming``, and what follows it is not written.

    It has the parts of a file object that pynetdicom's chunked C-STORE reception uses (``write``,
    ``file.flush``, ``close``, ``name``): pynetdicom deletes ``name`` after the C-STORE handler,
    which is a no-op once the file was moved into place or discarded.
    """

    def __init__(self, path: Path, head: bytes, *, fsync: bool) -> None:
        self.path = path
        self.name = str(path)
        self.size = 0
        self.error: OSError | None = None
        self._fsync = fsync
        self._lock = threading.Lock()  # the receiving thread writes, another may discard
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.write(head)
        if self.error is not None:
            self.discard()
            raise self.error

    @property
    def file(self) -> IncomingFile:
        return self

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._lock:
            if self._fd is None or self.error is not None:
                return 0
            start = self.size
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self.error = exc
                return 0
            self.size += len(data)
            if self._fsync and _SYNC_FILE_RANGE is not None:
                _SYNC_FILE_RANGE(self._fd, start, len(data), _SYNC_FILE_RANGE_WRITE)
            return len(data)

    def flush(self) -> None:
        """Writes go straight to the file; nothing is buffered."""

    def sync(self) -> None:
        """Make the written bytes durable (with the archive's ``fsync``), then close."""
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        try:
            if self._fsync:
                os.fsync(self._fd)
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def discard(self) -> None:
        """Close and delete: the transfer was refused, failed or abandoned."""
        self.close()
        self.path.unlink(missing_ok=True)


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
    """Temporary files without a committed row (never acknowledged), deleted."""


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
    ) -> None:
        """Durability knobs (bench/bench_ingest.py --variants measures them):

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
        self.incoming.mkdir(parents=True, exist_ok=True)
        engine = session_factory.kw.get("bind")
        if not isinstance(engine, Engine):
            raise TypeError("Archive needs a sessionmaker bound to an Engine")
        self._indexer = Indexer(engine)
        self.read_sessions = make_read_sessionmaker(engine)
        """Sessions for look-ups (C-FIND, C-MOVE/C-GET lists, QIDO, WADO): no write lock."""
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
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
        """File and index one Part 10 instance; return only once both are durable.

        Raises InvalidDicom (unparsable, missing or unsafe UIDs) or StorageFull (below the
        free-space floor); in both cases nothing is written.
        """
        header = read_header(data)
        size = len(data) if isinstance(data, bytes | bytearray) else Path(data).stat().st_size
        self._check_space(size)
        tmp = self._write_temp(header.sop_instance_uid, data)
        return self._commit(
            header, tmp, size, source=source, calling_ae=calling_ae, called_ae=called_ae
        )

    def open_incoming(self, sop_instance_uid: str, head: bytes) -> IncomingFile:
        """A temporary file in ``.incoming`` for an instance about to arrive in fragments,
        starting with ``head`` (see :mod:`storage.part10`); file it with
        :meth:`ingest_incoming`, or :meth:`IncomingFile.discard` it. ``sop_instance_uid`` is
        what the sender announced (the C-STORE command); an unsafe value only names the file
        ``unnamed`` (the dataset's own UID is checked when it is filed). Raises OSError."""
        name = sop_instance_uid if is_valid_uid(sop_instance_uid) else "unnamed"
        return IncomingFile(
            self.incoming / f"{name}.{uuid.uuid4().hex}.tmp", head, fsync=self.fsync
        )

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
        (also for a write that failed for want of space) or OSError; then the file is gone."""
        try:
            if incoming.error is not None:
                if incoming.error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFull(f"no space left in {self.root}") from incoming.error
                raise incoming.error
            incoming.sync()
            header = read_header(incoming.path)
            self._check_space(0)  # the file is already on the disk: what is left is free
            tmp = incoming.path
            if tmp.name.rsplit(".", 2)[0] != header.sop_instance_uid:
                # recover() finds a temporary file's row by the UID in its name: name it by the
                # dataset's UID (the command announced another), durably, before the commit.
                tmp = self.incoming / f"{header.sop_instance_uid}.{uuid.uuid4().hex}.tmp"
                os.replace(incoming.path, tmp)
                _fsync_dir(self.incoming)
        except BaseException:
            incoming.discard()
            raise
        return self._commit(
            header,
            tmp,
            incoming.size,
            source=source,
            calling_ae=calling_ae,
            called_ae=called_ae,
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

    def recover(self) -> RecoveryReport:
        """Finish or drop the writes a crash interrupted; call at start, before any ingest.

        A temporary file whose SOP Instance UID has a row is the newest copy of an instance
        whose index write may have committed: it is re-indexed and moved into place (the
        newer copy wins, as for any re-sent instance). A temporary file without a row was
        never acknowledged: it is deleted. Oldest first, so the newest copy ends in place.
        """
        report = RecoveryReport()
        temps = sorted(
            (p for p in self.incoming.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime
        )
        for tmp in temps:
            sop = tmp.name.rsplit(".", 2)[0] if tmp.name.endswith(".tmp") else ""
            with self.session_factory() as session:
                row = (
                    session.scalars(select(Instance).filter_by(sop_instance_uid=sop)).one_or_none()
                    if is_valid_uid(sop)
                    else None
                )
            header = None
            if row is not None:
                try:
                    header = read_header(tmp)
                except InvalidDicom:
                    LOGGER.warning("recover: unreadable temporary file %s", tmp.name)
            if row is None or header is None or header.sop_instance_uid != sop:
                tmp.unlink(missing_ok=True)
                report.dropped += 1
                if row is not None and not self.path_for(row).is_file():
                    # Only reachable with fsync=False and a machine crash: a committed row
                    # whose bytes were lost. It was never acknowledged intact: drop the row.
                    with self.session_factory() as session, session.begin():
                        session.execute(delete(Instance).where(Instance.id == row.id))
                continue
            self._commit(
                header,
                tmp,
                tmp.stat().st_size,
                source=row.source,
                calling_ae=row.calling_ae,
                called_ae=row.called_ae,
            )
            report.completed += 1
        if report.completed or report.dropped:
            _fsync_dir(self.incoming)
            LOGGER.warning(
                "recover: %d interrupted write(s) completed, %d dropped",
                report.completed,
                report.dropped,
            )
        return report

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
    ) -> IngestResult:
        final = self.root / header.relative_path
        lock = self._locks[zlib.crc32(header.sop_instance_uid.encode()) % _LOCK_STRIPES]
        committed = False
        try:
            self._ensure_dir(final.parent)
            with lock:
                duplicate, old_path = self._indexer.upsert(
                    header,
                    size=size,
                    source=_fit(Instance, "source", source),
                    calling_ae=_fit(Instance, "calling_ae", calling_ae.strip()),
                    called_ae=_fit(Instance, "called_ae", called_ae.strip()),
                )
                committed = True
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
        return IngestResult(
            sop_instance_uid=header.sop_instance_uid,
            series_instance_uid=header.series_instance_uid,
            study_instance_uid=header.study_instance_uid,
            sop_class_uid=header.sop_class_uid,
            path=final,
            duplicate=duplicate,
        )

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
