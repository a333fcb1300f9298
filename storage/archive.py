"""The file store and ingest: a DICOM instance's file and its index rows as one unit.

Files lie at ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Ingest
takes the Part 10 bytes as received (PS3.10 7.1: preamble, ``DICM``, File Meta Information),
reads the header without the pixel data and never decodes or re-encodes the dataset.

Order of one ingest, chosen so that a crash (SIGKILL, power loss) at any point leaves nothing half
done once :meth:`Archive.recover` has run at the next start:

1. Parse the header and check the four UIDs (PS3.5 9.1), then the free-space floor. Refusals leave
   no file and no row.
2. Write the bytes to ``<root>/.incoming/<SOPInstanceUID>.<random>.tmp``, fsync the file and the
   folder. Crash here: the temporary file has no row, ``recover`` deletes it.
3. In ONE transaction upsert the patient, study, series and instance rows; commit. Crash after the
   commit: the row exists and the temporary file holds its bytes, ``recover`` moves it into place.
4. Rename the temporary file to its final name and fsync the folder; only then return, so the
   caller acknowledges (C-STORE success, STOW-RS reference) only what is in both the files and
   the index.

A re-sent instance (same SOP Instance UID) keeps ONE row: the newer copy replaces the older file and
the row is updated from it (the sender's latest word wins; ``IngestResult.duplicate`` says so).
Writes of the same SOP Instance UID are serialised in this process, so the file in place is always
the one the row describes.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import InvalidDicom, StorageFull
from storage.models import Base, Instance, Patient, Series, Study, utcnow

LOGGER = logging.getLogger(__name__)

_P: Table = Patient.__table__  # type: ignore[assignment]
_ST: Table = Study.__table__  # type: ignore[assignment]
_SE: Table = Series.__table__  # type: ignore[assignment]
_I: Table = Instance.__table__  # type: ignore[assignment]

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


@dataclass
class Header:
    """What the index keeps of one instance, read from its header."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_path(self) -> str:
        return f"{self.study_instance_uid}/{self.series_instance_uid}/{self.sop_instance_uid}.dcm"


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


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value).strip("\x00 ")
    return str(value).strip("\x00 ")


def _raw_text(ds: Dataset, keyword: str) -> str:
    """The value as sent, without pydicom's value validation (hostile UIDs are ours to judge)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    elem = ds.get_item(tag)
    value = elem.value if elem is not None else None
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip("\x00 ")
    return str(value).strip("\x00 ")


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _changes(current: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Newer headers refresh the attributes they carry; an empty value never erases one."""
    return {k: v for k, v in values.items() if v not in ("", None) and current[k] != v}


def _insert_or_get(
    session: Session, table: Table, key: dict[str, Any], values: dict[str, Any]
) -> tuple[int, bool]:
    """Insert a row, or take the one with the same unique key. Returns (primary key, created).

    The insert runs in a savepoint: when a concurrent writer (another process, on PostgreSQL)
    inserted the same key first, the IntegrityError is caught and the winner's row is used.
    """
    where = [table.c[k] == v for k, v in key.items()]
    found = session.connection().execute(select(table.c.id).where(*where)).scalar()
    if found is not None:
        return int(found), False
    try:
        with session.begin_nested():
            result = session.connection().execute(insert(table).values(**key, **values))
        primary_key = result.inserted_primary_key
        assert primary_key is not None
        return int(primary_key[0]), True
    except IntegrityError:
        winner = session.connection().execute(select(table.c.id).where(*where)).scalar_one()
        return int(winner), False


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
    ) -> None:
        self.root = Path(root).resolve()
        self.session_factory = session_factory
        self.min_free_bytes = min_free_bytes
        self.incoming = self.root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)
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
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        # The name must be durable before the row commits, or a power loss could leave a
        # committed row whose bytes are nowhere.
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
                duplicate, old_path = self._index(
                    header, size, source=source, calling_ae=calling_ae, called_ae=called_ae
                )
                committed = True
                os.replace(tmp, final)
                _fsync_dir(final.parent)
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

    def _index(
        self, header: Header, size: int, *, source: str, calling_ae: str, called_ae: str
    ) -> tuple[bool, str | None]:
        """Upsert the four rows in ONE transaction. Returns (duplicate, the previous path).

        Core statements, not ORM objects: on the hot path (a series that exists) this is one
        joined SELECT, an UPDATE of the series, one SELECT and one INSERT of the instance.
        """
        now = utcnow()
        calling_ae = _fit(Instance, "calling_ae", calling_ae.strip())
        called_ae = _fit(Instance, "called_ae", called_ae.strip())
        arrival: dict[str, Any] = {"last_received_at": now}
        if calling_ae or called_ae:
            arrival |= {"calling_ae": calling_ae, "called_ae": called_ae}
        with self.session_factory() as session, session.begin():
            conn = session.connection()
            found = conn.execute(
                select(_SE.c.id, _SE.c.study_pk, *(_SE.c[c] for c in header.series)).where(
                    _SE.c.series_instance_uid == header.series_instance_uid
                )
            ).first()
            if found is None:
                study_pk = self._study(session, header)
                series_pk, created = _insert_or_get(
                    session,
                    _SE,
                    {"series_instance_uid": header.series_instance_uid},
                    {
                        "study_pk": study_pk,
                        **header.series,
                        "calling_ae": calling_ae,
                        "called_ae": called_ae,
                        "first_received_at": now,
                        "last_received_at": now,
                    },
                )
                if not created:  # another writer made it meanwhile
                    conn.execute(update(_SE).where(_SE.c.id == series_pk).values(**arrival))
            else:
                series_pk = found.id
                changes = _changes(found._mapping, header.series) | arrival
                conn.execute(update(_SE).where(_SE.c.id == series_pk).values(**changes))
                self._refresh_study(session, found.study_pk, header)

            values = {
                "series_pk": series_pk,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                **header.instance,
                "path": header.relative_path,
                "size_bytes": size,
                "received_at": now,
                "source": _fit(Instance, "source", source),
                "calling_ae": calling_ae,
                "called_ae": called_ae,
            }
            key = _I.c.sop_instance_uid == header.sop_instance_uid
            existing = conn.execute(select(_I.c.id, _I.c.path).where(key)).first()
            if existing is None:
                _, created = _insert_or_get(
                    session, _I, {"sop_instance_uid": header.sop_instance_uid}, values
                )
                if created:
                    return False, None
                existing = conn.execute(select(_I.c.id, _I.c.path).where(key)).one()
            conn.execute(update(_I).where(_I.c.id == existing.id).values(**values))
            return True, existing.path

    def _study(self, session: Session, header: Header) -> int:
        """The study's primary key, made (with its patient) when new."""
        conn = session.connection()
        study_pk = conn.execute(
            select(_ST.c.id).where(_ST.c.study_instance_uid == header.study_instance_uid)
        ).scalar()
        if study_pk is not None:
            self._refresh_study(session, study_pk, header)
            return int(study_pk)
        patient_key = {k: header.patient[k] for k in ("patient_id", "issuer_of_patient_id")}
        patient_values = {k: v for k, v in header.patient.items() if k not in patient_key}
        patient_pk, created = _insert_or_get(session, _P, patient_key, patient_values)
        if not created:
            self._refresh_patient(session, patient_pk, header)
        study_pk, created = _insert_or_get(
            session,
            _ST,
            {"study_instance_uid": header.study_instance_uid},
            {"patient_pk": patient_pk, **header.study},
        )
        if not created:
            self._refresh_study(session, study_pk, header)
        return study_pk

    def _refresh_study(self, session: Session, study_pk: int, header: Header) -> None:
        """Newer headers refresh the study's attributes (and its patient's, when the patient
        keys agree: a study never moves to another patient)."""
        conn = session.connection()
        row = conn.execute(
            select(_ST.c.patient_pk, *(_ST.c[c] for c in header.study)).where(_ST.c.id == study_pk)
        ).one()
        changes = _changes(row._mapping, header.study)
        if changes:
            conn.execute(
                update(_ST).where(_ST.c.id == study_pk).values(**changes, updated_at=utcnow())
            )
        self._refresh_patient(session, row.patient_pk, header)

    def _refresh_patient(self, session: Session, patient_pk: int, header: Header) -> None:
        conn = session.connection()
        columns = list(header.patient)
        row = conn.execute(select(*(_P.c[c] for c in columns)).where(_P.c.id == patient_pk)).one()
        mine = all(
            row._mapping[k] == header.patient[k] for k in ("patient_id", "issuer_of_patient_id")
        )
        if not mine:
            LOGGER.warning(
                "study %s belongs to patient %r; instance %s names %r (kept the first)",
                header.study_instance_uid,
                row.patient_id,
                header.sop_instance_uid,
                header.patient["patient_id"],
            )
            return
        changes = _changes(row._mapping, header.patient)
        if changes:
            conn.execute(update(_P).where(_P.c.id == patient_pk).values(**changes))

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
    "IngestResult",
    "RecoveryReport",
    "is_valid_uid",
    "read_header",
]
