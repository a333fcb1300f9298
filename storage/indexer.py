"""The index half of ingest: upsert patient, study, series and instance rows in one transaction.

Statements are built once and executed with bound parameters on a plain Connection: building
SQLAlchemy statements per call cost more CPU than SQLite spends running them. On the hot path
(an instance of a series already known) one transaction runs one joined SELECT (series, study,
patient), one UPDATE of the series (arrival time, AE titles, changed attributes), one SELECT and
one INSERT (or UPDATE, for a re-sent instance) of the instance.

Creation races (two writers making the same patient, study or series): on SQLite a writer holds
the database from BEGIN IMMEDIATE (storage/db.py), so a row found missing cannot appear before
its INSERT. Elsewhere (PostgreSQL) the INSERT runs in a savepoint and, on IntegrityError, the
winner's row is used.

Group commit (SQLite): threads that want to commit while another does are served together by
the next one to get the lock: one transaction, one WAL fsync, a savepoint per instance.

Patient identity (PS3.3 C.7.1.1; IHE PIX): a patient is its Patient ID within its Issuer of
Patient ID. A study whose Patient ID is empty or absent gets a patient record of its own (scoped
to the study), so it never joins another person. Each study keeps the patient attributes of its
first instance (the name, birth date and sex that C-FIND and QIDO-RS show for it); a later
instance that names other values is stored as sent, the study keeps the first values, and a
warning is logged. The patient record (PATIENT level C-FIND) takes the values of its latest study.
An instance re-sent under another series moves there; a series, study or patient left with
nothing under it is deleted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from nnunet_node.core.clock import utcnow
from nnunet_node.storage.models import Instance, Patient, Series, Study

LOGGER = logging.getLogger(__name__)

_P: Table = Patient.__table__  # type: ignore[assignment]
_ST: Table = Study.__table__  # type: ignore[assignment]
_SE: Table = Series.__table__  # type: ignore[assignment]
_I: Table = Instance.__table__  # type: ignore[assignment]

PATIENT_KEY = ("patient_id", "issuer_of_patient_id")
PATIENT_TRAITS = ("patient_name", "patient_birth_date", "patient_sex")
"""Patient attributes each study keeps its own copy of (storage/models.py, Study)."""


def patient_scope(header: Header) -> str:
    """The patient record's scope: empty for an identified patient, the study's UID when the
    Patient ID is empty or absent (one patient record per such study)."""
    return "" if header.patient.get("patient_id") else header.study_instance_uid


@dataclass
class Header:
    """What the index keeps of one instance, read from its header (see storage.archive)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient: dict[str, Any] = field(default_factory=dict)
    """patient_id, issuer_of_patient_id, patient_name, patient_birth_date, patient_sex"""
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_path(self) -> str:
        return f"{self.study_instance_uid}/{self.series_instance_uid}/{self.sop_instance_uid}.dcm"


def join_modalities(modalities: Iterable[str]) -> str:
    """A study's ModalitiesInStudy as its ``modalities_in_study`` column holds it: the distinct
    modalities of its series, sorted, backslash-separated (PS3.5 6.4 multi-valued CS)."""
    return "\\".join(sorted({m for m in modalities if m}))


def split_modalities(column: str) -> list[str]:
    """The ``modalities_in_study`` column as ModalitiesInStudy's values (sorted)."""
    return column.split("\\") if column else []


def recount(conn: Connection) -> None:
    """Count every aggregate of the index again from its rows (inside the caller's
    transaction): each series' number of instances, each study's number of series and of
    instances and its modalities. Ingest keeps them right as it goes (:class:`Indexer`); this is
    for rows loaded in bulk, and what migration 0006 does to existing rows."""
    per_series = (
        select(func.count()).select_from(_I).where(_I.c.series_pk == _SE.c.id).scalar_subquery()
    )
    conn.execute(update(_SE).values(number_of_instances=per_series))
    series_of_study = select(func.count()).where(_SE.c.study_pk == _ST.c.id).scalar_subquery()
    instances_of_study = (
        select(func.coalesce(func.sum(_SE.c.number_of_instances), 0))
        .where(_SE.c.study_pk == _ST.c.id)
        .scalar_subquery()
    )
    conn.execute(
        update(_ST).values(number_of_series=series_of_study, number_of_instances=instances_of_study)
    )
    modalities: dict[int, set[str]] = {}
    for study_pk, modality in conn.execute(
        select(_SE.c.study_pk, _SE.c.modality).where(_SE.c.modality != "").distinct()
    ):
        modalities.setdefault(study_pk, set()).add(modality)
    conn.execute(update(_ST).values(modalities_in_study=""))
    rows = [{"_pk": pk, "_m": join_modalities(ms)} for pk, ms in modalities.items()]
    if rows:
        conn.execute(
            update(_ST)
            .where(_ST.c.id == bindparam("_pk"))
            .values(modalities_in_study=bindparam("_m")),
            rows,
        )


def _changes(current: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Newer headers refresh the attributes they carry; an empty value never erases one."""
    return {k: v for k, v in values.items() if v not in ("", None) and current[k] != v}


def _label(table: Table, prefix: str) -> list[Any]:
    return [c.label(f"{prefix}{c.name}") for c in table.c]


@dataclass
class _Request:
    header: Header
    size: int
    source: str
    calling_ae: str
    called_ae: str
    done: bool = False
    result: tuple[bool, str | None] | None = None
    error: BaseException | None = None


class Indexer:
    """Upserts the rows of one instance; thread-safe (one connection per call)."""

    def __init__(self, engine: Engine, *, process_lock: Callable[[], Any] | None = None) -> None:
        """``process_lock``, when given, is held around each write transaction besides the
        threads' own lock: a lock the other processes writing this database take too (the
        node's receiver processes, storage/locks.py), so that they queue and are handed the
        database at once instead of sleeping in SQLite's busy handler."""
        self.engine = engine
        self._process_lock = process_lock
        # SQLite has one writer at a time; waiting in its busy handler means sleeping in steps
        # of up to 100 ms. Writers of this process queue on a lock instead and are handed the
        # database at once. Other databases lock rows, not the file: no lock here.
        self._group_commit = engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Request] = []
        self._conn: Connection | None = None
        # One row with everything the hot path compares: series, its study, the study's patient.
        self._select_series = (
            select(*_label(_SE, "se_"), *_label(_ST, "st_"), *_label(_P, "p_"))
            .join(_ST, _ST.c.id == _SE.c.study_pk)
            .join(_P, _P.c.id == _ST.c.patient_pk)
            .where(_SE.c.series_instance_uid == bindparam("uid"))
        )
        self._select_study = (
            select(*_label(_ST, "st_"), *_label(_P, "p_"))
            .join(_P, _P.c.id == _ST.c.patient_pk)
            .where(_ST.c.study_instance_uid == bindparam("uid"))
        )
        self._select_instance = select(_I.c.id, _I.c.path, _I.c.series_pk).where(
            _I.c.sop_instance_uid == bindparam("uid")
        )
        self._select_patient = select(_P.c.id).where(
            _P.c.patient_id == bindparam("pid"),
            _P.c.issuer_of_patient_id == bindparam("issuer"),
            _P.c.study_scope == bindparam("scope"),
        )
        self._select_study_pk = select(_ST.c.id).where(_ST.c.study_instance_uid == bindparam("uid"))
        self._select_series_pk = select(_SE.c.id).where(
            _SE.c.series_instance_uid == bindparam("uid")
        )
        self._select_series_study = select(_SE.c.study_pk).where(_SE.c.id == bindparam("pk"))
        # Aggregates (PS3.4 C.3.4): counts kept with the rows, modalities per study.
        self._count_series = (
            update(_SE)
            .where(_SE.c.id == bindparam("_pk"))
            .values(number_of_instances=_SE.c.number_of_instances + bindparam("_delta"))
        )
        self._count_study = (
            update(_ST)
            .where(_ST.c.id == bindparam("_pk"))
            .values(number_of_instances=_ST.c.number_of_instances + bindparam("_delta"))
        )
        # FOR NO KEY UPDATE: the lock that an UPDATE of the row takes. FOR UPDATE would also
        # wait for the key-share locks that inserting a series of the study takes, so two
        # writers each adding a series would deadlock.
        self._lock_study = (
            select(_ST.c.id).where(_ST.c.id == bindparam("pk")).with_for_update(key_share=True)
        )
        self._select_study_modalities = (
            select(_SE.c.modality)
            .where(_SE.c.study_pk == bindparam("pk"), _SE.c.modality != "")
            .distinct()
        )
        self._count_study_series = (
            select(func.count()).select_from(_SE).where(_SE.c.study_pk == bindparam("pk"))
        )
        tables = (_P, _ST, _SE, _I)
        self._update = {t.name: update(t).where(t.c.id == bindparam("_pk")) for t in tables}
        self._insert = {t.name: insert(t) for t in tables}

    def upsert(
        self,
        header: Header,
        *,
        size: int,
        source: str,
        calling_ae: str,
        called_ae: str,
    ) -> tuple[bool, str | None]:
        """Index one instance; return (duplicate, the previous path) once its rows are committed.

        On SQLite, writers that arrive while another commits are grouped: the next thread to
        get the lock commits every waiting instance in one transaction (each in its own
        savepoint, so one failure fails only its instance), and one WAL fsync serves them all.
        """
        request = _Request(header, size, source, calling_ae, called_ae)
        if not self._group_commit:
            with self.engine.begin() as conn:
                return self._upsert(conn, request)
        with self._queue_lock:
            self._queue.append(request)
        with self._write_lock:
            if not request.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit_batch(batch)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _writer(self) -> Connection:
        """The connection the writers of this process share (SQLite: one writer at a time, under
        ``_write_lock``): kept, since a pool checkout per instance cost ~0.2 ms of CPU."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self.engine.connect()
        return self._conn

    def close(self) -> None:
        """Give the shared writer connection back to the pool."""
        with self._write_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _commit_batch(self, batch: list[_Request]) -> None:
        if self._process_lock is None:
            self._commit_batch_locked(batch)
            return
        try:
            with self._process_lock():
                self._commit_batch_locked(batch)
        except BaseException as exc:  # the lock itself failed (or the batch of one)
            for request in batch:
                if request.result is None:
                    request.error = request.error or exc
                request.done = True
            if len(batch) == 1:
                raise

    def _commit_batch_locked(self, batch: list[_Request]) -> None:
        try:
            conn = self._writer()
            with conn.begin():
                if len(batch) == 1:
                    batch[0].result = self._upsert(conn, batch[0])
                else:
                    for request in batch:
                        try:
                            with conn.begin_nested():
                                request.result = self._upsert(conn, request)
                        except Exception as exc:
                            request.error = exc
        except BaseException as exc:  # the commit failed: nothing of the batch is stored
            if self._conn is not None:  # nor is the connection trusted again
                self._conn.close()
                self._conn = None
            for request in batch:
                request.error = request.error or exc
                request.result = None
            if len(batch) == 1:
                raise
        finally:
            for request in batch:
                request.done = True

    def _upsert(self, conn: Connection, request: _Request) -> tuple[bool, str | None]:
        """Index one instance inside the caller's transaction."""
        header, size, source = request.header, request.size, request.source
        calling_ae, called_ae = request.calling_ae, request.called_ae
        now = utcnow()
        arrival: dict[str, Any] = {"last_received_at": now}
        if calling_ae or called_ae:
            arrival |= {"calling_ae": calling_ae, "called_ae": called_ae}
        row = conn.execute(self._select_series, {"uid": header.series_instance_uid}).first()
        series_update: dict[str, Any] = {}
        if row is not None:
            m = row._mapping
            series_pk, study_pk = m["se_id"], m["st_id"]
            series_changes = {k: v for k, v in header.series.items() if v not in ("", None)}
            series_changes = {k: v for k, v in series_changes.items() if m[f"se_{k}"] != v}
            series_update = series_changes | arrival
            self._refresh_study(conn, m, header)
        else:
            series_pk, study_pk = self._new_series(
                conn, header, now, calling_ae, called_ae, arrival
            )

        values = {
            "series_pk": series_pk,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            **header.instance,
            "path": header.relative_path,
            "size_bytes": size,
            "received_at": now,
            "source": source,
            "calling_ae": calling_ae,
            "called_ae": called_ae,
        }
        uid = {"uid": header.sop_instance_uid}
        existing = conn.execute(self._select_instance, uid).first()
        if existing is None:
            key = {"sop_instance_uid": header.sop_instance_uid}
            _, created = self._insert_or_get(conn, _I, key, values, self._select_instance, uid)
            if created:
                self._count(conn, series_pk, study_pk, +1, series_update)
                if "modality" in series_update:
                    self._recount_study_series(conn, study_pk)
                return False, None
            existing = conn.execute(self._select_instance, uid).one()
        self._set(conn, _I, existing.id, values)
        if existing.series_pk == series_pk:  # re-sent: the counts stay
            self._set(conn, _SE, series_pk, series_update)
        else:  # moved to another series
            LOGGER.warning(
                "instance %s moved to series %s",
                header.sop_instance_uid,
                header.series_instance_uid,
            )
            self._count(conn, series_pk, study_pk, +1, series_update)
            old_study_pk = conn.execute(self._select_series_study, {"pk": existing.series_pk})
            self._count(conn, existing.series_pk, old_study_pk.scalar_one(), -1, {})
            self.prune(conn, existing.series_pk)
        if "modality" in series_update:
            self._recount_study_series(conn, study_pk)
        return True, existing.path

    def remove(self, conn: Connection, instance_pk: int) -> None:
        """Delete one instance row (inside the caller's transaction), keep its series' and
        study's counts right, and prune what is left empty (:meth:`prune`)."""
        found = conn.execute(
            select(_I.c.series_pk, _SE.c.study_pk)
            .join(_SE, _SE.c.id == _I.c.series_pk)
            .where(_I.c.id == instance_pk)
        ).first()
        if found is None:
            return
        conn.execute(_I.delete().where(_I.c.id == instance_pk))
        self._count(conn, found.series_pk, found.study_pk, -1, {})
        self.prune(conn, found.series_pk)

    def _count(
        self,
        conn: Connection,
        series_pk: int,
        study_pk: int,
        delta: int,
        series_values: dict[str, Any],
    ) -> None:
        """Add ``delta`` to the series' and the study's number of instances (one UPDATE each,
        atomic increments, so concurrent writers on PostgreSQL never lose one); the series
        UPDATE also sets ``series_values`` (arrival time, changed attributes)."""
        conn.execute(self._count_series, {"_pk": series_pk, "_delta": delta, **series_values})
        conn.execute(self._count_study, {"_pk": study_pk, "_delta": delta})

    def _recount_study_series(self, conn: Connection, study_pk: int) -> None:
        """Count the study's series and list its modalities again, from the series rows: run
        when a series is added, removed or changes modality. On PostgreSQL the study row is
        locked first (as an UPDATE locks it), so that a concurrent writer adding another
        series to the study waits, and then counts with this one's series committed (READ
        COMMITTED reads what committed before each statement)."""
        conn.execute(self._lock_study, {"pk": study_pk})
        modalities = conn.execute(self._select_study_modalities, {"pk": study_pk}).scalars()
        number = conn.execute(self._count_study_series, {"pk": study_pk}).scalar_one()
        conn.execute(
            self._update[_ST.name],
            {
                "_pk": study_pk,
                "number_of_series": number,
                "modalities_in_study": join_modalities(modalities),
            },
        )

    def prune(self, conn: Connection, series_pk: int) -> None:
        """Delete the series when no instance is left in it, then its study when no series is
        left, then the study's patient when no study is left (inside the caller's transaction),
        so that queries and counts never show an empty entity. A study that keeps other series
        gets its number of series and its modalities counted again."""
        if conn.execute(select(_I.c.id).where(_I.c.series_pk == series_pk).limit(1)).first():
            return
        study_pk = conn.execute(self._select_series_study, {"pk": series_pk}).scalar()
        conn.execute(_SE.delete().where(_SE.c.id == series_pk))
        if study_pk is None:
            return
        if conn.execute(select(_SE.c.id).where(_SE.c.study_pk == study_pk).limit(1)).first():
            self._recount_study_series(conn, study_pk)
            return
        patient_pk = conn.execute(select(_ST.c.patient_pk).where(_ST.c.id == study_pk)).scalar()
        conn.execute(_ST.delete().where(_ST.c.id == study_pk))
        if (
            patient_pk is None
            or conn.execute(select(_ST.c.id).where(_ST.c.patient_pk == patient_pk).limit(1)).first()
        ):
            return
        conn.execute(_P.delete().where(_P.c.id == patient_pk))

    # --- helpers ------------------------------------------------------------------------
    def _set(self, conn: Connection, table: Table, pk: int, values: dict[str, Any]) -> None:
        if values:
            conn.execute(self._update[table.name], {"_pk": pk, **values})

    def _insert_or_get(
        self,
        conn: Connection,
        table: Table,
        key: dict[str, Any],
        values: dict[str, Any],
        select_pk: Any,
        params: dict[str, Any],
    ) -> tuple[int, bool]:
        """Insert a row the caller found missing. On SQLite the write lock was held since that
        look-up (BEGIN IMMEDIATE), so nobody can have inserted it meanwhile. Elsewhere the
        insert runs in a savepoint; if a concurrent writer won the unique key, its row is used."""
        if self._group_commit:
            result = conn.execute(self._insert[table.name], {**key, **values})
            primary_key = result.inserted_primary_key
            assert primary_key is not None
            return int(primary_key[0]), True
        try:
            with conn.begin_nested():
                result = conn.execute(self._insert[table.name], {**key, **values})
        except IntegrityError:
            return int(conn.execute(select_pk, params).scalars().first()), False  # type: ignore[arg-type]
        primary_key = result.inserted_primary_key
        assert primary_key is not None
        return int(primary_key[0]), True

    def _new_series(
        self,
        conn: Connection,
        header: Header,
        now: Any,
        calling_ae: str,
        called_ae: str,
        arrival: dict[str, Any],
    ) -> tuple[int, int]:
        """Insert the series (and its study, patient) of a header; return (series, study) pks.
        The new series starts with no instance (the caller counts the one it inserts)."""
        study = conn.execute(self._select_study, {"uid": header.study_instance_uid}).first()
        if study is not None:
            study_pk = study._mapping["st_id"]
            self._refresh_study(conn, study._mapping, header)
        else:
            study_pk = self._new_study(conn, header)
        uid = {"uid": header.series_instance_uid}
        series_pk, created = self._insert_or_get(
            conn,
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
            self._select_series_pk,
            uid,
        )
        if not created:  # another writer made it meanwhile (and counted it in its study)
            self._set(conn, _SE, series_pk, arrival)
            return series_pk, conn.execute(
                self._select_series_study, {"pk": series_pk}
            ).scalar_one()
        self._recount_study_series(conn, study_pk)
        return series_pk, study_pk

    def _new_study(self, conn: Connection, header: Header) -> int:
        key = {k: header.patient[k] for k in PATIENT_KEY} | {"study_scope": patient_scope(header)}
        traits = {k: header.patient.get(k, "") for k in PATIENT_TRAITS}
        params = {
            "pid": key["patient_id"],
            "issuer": key["issuer_of_patient_id"],
            "scope": key["study_scope"],
        }
        patient_pk = conn.execute(self._select_patient, params).scalar()
        if patient_pk is None:
            patient_pk, _ = self._insert_or_get(conn, _P, key, traits, self._select_patient, params)
        else:
            # A new study of a known patient: the patient record takes its values (the latest).
            current = conn.execute(select(*_P.c).where(_P.c.id == patient_pk)).one()._mapping
            self._set(conn, _P, patient_pk, _changes(current, traits))
        uid = {"uid": header.study_instance_uid}
        study_pk, created = self._insert_or_get(
            conn,
            _ST,
            {"study_instance_uid": header.study_instance_uid},
            {"patient_pk": patient_pk, **header.study, **traits},
            self._select_study_pk,
            uid,
        )
        if not created:
            study = conn.execute(self._select_study, uid).one()
            self._refresh_study(conn, study._mapping, header)
        return int(study_pk)

    def _refresh_study(self, conn: Connection, m: Any, header: Header) -> None:
        """Newer headers refresh the study's own attributes. Its patient attributes are the
        first instance's: a later instance only fills what is still empty, and one naming other
        values is logged (module docstring). A study never moves to another patient."""
        study_changes = {k: v for k, v in header.study.items() if v not in ("", None)}
        study_changes = {k: v for k, v in study_changes.items() if m[f"st_{k}"] != v}
        traits = {k: header.patient.get(k, "") for k in PATIENT_TRAITS}
        conflicts = {k: v for k, v in traits.items() if v and m[f"st_{k}"] and m[f"st_{k}"] != v}
        study_changes |= {k: v for k, v in traits.items() if v and not m[f"st_{k}"]}
        if study_changes:
            self._set(conn, _ST, m["st_id"], study_changes | {"updated_at": utcnow()})
        if any(m[f"p_{k}"] != header.patient[k] for k in PATIENT_KEY):
            LOGGER.warning(
                "study %s belongs to patient %r; instance %s names %r (kept the first)",
                header.study_instance_uid,
                m["p_patient_id"],
                header.sop_instance_uid,
                header.patient["patient_id"],
            )
            return
        if conflicts:
            LOGGER.warning(
                "study %s: instance %s names other patient attributes (%s); the study keeps "
                "its first instance's values",
                header.study_instance_uid,
                header.sop_instance_uid,
                ", ".join(sorted(conflicts)),
            )
        patient_fill = {k: v for k, v in traits.items() if v and not m[f"p_{k}"]}
        self._set(conn, _P, m["p_id"], patient_fill)
