"""The index half of ingest: upsert patient, study, series and instance rows in one transaction.

Statements are built with SQLAlchemy Core once, compiled once for the engine's dialect, and run
on the DBAPI cursor itself: SQLAlchemy's execution of a statement (~20 us of CPU) cost more than
SQLite spends running it (~2 us), and ingest runs several per instance (bench/bench_ingest_cpu.py).
On the hot path (a new instance of a series already known) a transaction runs one joined SELECT
(series, study, patient), one ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` of the instance
(no row back: it was re-sent, and is updated instead), and at its end one UPDATE per series and
per study it touched: the counts (number of instances; number of series and modalities where a
series was added, removed or changed modality) and the series' arrival columns are summed over
the transaction and written once, series rows before study rows, each in key order. The arrival
columns: ``last_received_at``, ``last_source`` (how the last instance came), the AE titles (when
it came with some), and ``content_changed_at``, moved only by an instance that changed the
series (the caller says whether a re-sent one did: ``upsert(changed=...)``).

Creation races (two writers making the same patient, study or series): on SQLite a writer holds
the database from BEGIN IMMEDIATE (storage/db.py), so nobody else can insert meanwhile. On
PostgreSQL the ``ON CONFLICT DO NOTHING`` insert waits for a concurrent writer of the same key
and, once that one committed, returns no row: the winner's row is used. Other databases run the
insert in a savepoint and take a unique-key violation as the same answer.

Group commit (SQLite): threads that want to commit while another does are served together by
the next one to get the lock: one transaction, one WAL fsync, a savepoint per instance (one
that fails is rolled back alone, with its share of the counts).

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
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Dialect,
    Engine,
    Integer,
    Table,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

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
    pixel_bytes: int | None = None
    """How many bytes native (uncompressed) Pixel Data must hold at least: Rows x Columns x
    Number of Frames x Bits Allocated / 8, rounded up, times 1 for one sample per pixel and 2
    for colour (YBR_FULL_422 holds 2 samples per pixel; PS3.5 8.1.1, PS3.3 C.7.6.3); None when
    the header does not say (no image, or an attribute missing)."""

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


def _changes(current: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Newer headers refresh the attributes they carry; an empty value never erases one."""
    return {k: v for k, v in values.items() if v not in ("", None) and current[k] != v}


class _Statement:
    """One statement compiled once for a dialect; :meth:`params` turns a dict of values into
    the parameters its DBAPI takes (a dict for named and pyformat styles, a tuple in the order
    of the placeholders for a positional one), each converted as the column's type does for
    that dialect (SQLite keeps a datetime as text)."""

    __slots__ = ("_defaults", "_names", "_processors", "sql")

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if compiled.escaped_bind_names:
            raise ValueError(f"bind names that need escaping: {compiled.escaped_bind_names}")
        self.sql: str = compiled.string
        # The statement's own values (a literal in it, a LIMIT), by their rendered names.
        self._defaults = {
            name: bind.value for name, bind in compiled.binds.items() if not bind.required
        }
        self._processors: list[tuple[str, Callable[[Any], Any]]] = []
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._processors.append((name, process))
        self._names = tuple(compiled.positiontup or ()) if dialect.positional else None

    def params(self, values: dict[str, Any]) -> Any:
        values = self._defaults | values if self._defaults else dict(values)
        for name, process in self._processors:
            value = values.get(name)
            if value is not None:
                values[name] = process(value)
        if self._names is None:
            return values
        return tuple([values[name] for name in self._names])


def _statement_dialect(dialect: Dialect) -> Dialect:
    """The dialect to compile for: SQLite's with named parameters (``:name``), which its driver
    reads from the dict itself; others as they are."""
    if dialect.name == "sqlite" and dialect.paramstyle == "qmark":
        named: Dialect = type(dialect)(paramstyle="named")  # type: ignore[call-arg]
        return named
    return dialect


class _Run:
    """Runs :class:`_Statement` s on one DBAPI cursor (ingest's own transactions), or through a
    caller's :class:`Connection` (``exec_driver_sql``: :meth:`Indexer.remove` and
    :meth:`Indexer.prune` inside a session's transaction)."""

    __slots__ = ("_conn", "_cursor")

    def __init__(self, cursor: Any = None, conn: Connection | None = None) -> None:
        self._cursor = cursor
        self._conn = conn

    def execute(self, statement: _Statement, values: dict[str, Any]) -> Any:
        if self._cursor is not None:
            self._cursor.execute(statement.sql, statement.params(values))
            return self._cursor
        assert self._conn is not None
        return self._conn.exec_driver_sql(statement.sql, statement.params(values))

    def first(self, statement: _Statement, values: dict[str, Any]) -> Any:
        return self.execute(statement, values).fetchone()

    def scalar(self, statement: _Statement, values: dict[str, Any]) -> Any:
        rows = self.execute(statement, values).fetchall()
        return rows[0][0] if rows else None

    def column(self, statement: _Statement, values: dict[str, Any]) -> list[Any]:
        return [row[0] for row in self.execute(statement, values).fetchall()]

    def sql(self, sql: str) -> None:
        """A statement without parameters (transaction control)."""
        if self._cursor is not None:
            self._cursor.execute(sql)
        else:
            assert self._conn is not None
            self._conn.exec_driver_sql(sql)


@dataclass
class _Pending:
    """What one transaction adds to the series' and studies' counts and arrival columns,
    written once per row at its end (:meth:`Indexer._flush`): additions commute, and the
    arrival columns take the last instance's values, as one UPDATE per instance would."""

    series: dict[int, int] = field(default_factory=dict)
    studies: dict[int, int] = field(default_factory=dict)
    recount: set[int] = field(default_factory=set)
    """Studies whose series were added, removed or changed modality: their number of series
    and modalities are counted again from the series rows (:meth:`Indexer._flush`)."""
    arrival: dict[int, tuple[Any, str, str] | tuple[Any]] = field(default_factory=dict)
    """series pk -> (last_received_at, calling_ae, called_ae), or (last_received_at,) when
    the instance came with no AE titles (the series keeps the ones it has)."""
    sources: dict[int, str] = field(default_factory=dict)
    """series pk -> how its last instance came (``last_source``)."""
    changed: dict[int, Any] = field(default_factory=dict)
    """series pk -> when an instance last changed it (``content_changed_at``); absent when
    every instance of the transaction was a byte-identical re-send."""

    def count(self, series_pk: int, study_pk: int, delta: int) -> None:
        self.series[series_pk] = self.series.get(series_pk, 0) + delta
        self.studies[study_pk] = self.studies.get(study_pk, 0) + delta

    def arrive(
        self,
        series_pk: int,
        now: Any,
        calling_ae: str,
        called_ae: str,
        source: str = "",
        changed: bool = True,
    ) -> None:
        if calling_ae or called_ae:
            self.arrival[series_pk] = (now, calling_ae, called_ae)
        else:
            before = self.arrival.get(series_pk)
            self.arrival[series_pk] = (now, *before[1:]) if before else (now,)
        self.sources[series_pk] = source
        if changed:
            self.changed[series_pk] = now

    def merge(self, later: _Pending) -> None:
        """Add what a later instance of the same transaction pends."""
        for pk, delta in later.series.items():
            self.series[pk] = self.series.get(pk, 0) + delta
        for pk, delta in later.studies.items():
            self.studies[pk] = self.studies.get(pk, 0) + delta
        self.recount |= later.recount
        for pk, (now, *aes) in later.arrival.items():
            calling_ae, called_ae = (str(aes[0]), str(aes[1])) if aes else ("", "")
            self.arrive(pk, now, calling_ae, called_ae, later.sources.get(pk, ""), changed=False)
        self.changed |= later.changed


@dataclass
class _Request:
    header: Header
    size: int
    source: str
    calling_ae: str
    called_ae: str
    changed: bool = True
    done: bool = False
    result: tuple[bool, str | None] | None = None
    error: BaseException | None = None


def _plain_columns(table: Table) -> list[Any]:
    """The columns ingest compares with a header: all but the datetimes."""
    return [c for c in table.c if not isinstance(c.type, DateTime)]


def _bind(column: Any, name: str | None = None) -> Any:
    return bindparam(name or column.name, type_=column.type)


class _Statements:
    """Every statement of ingest, compiled once for the engine's dialect. Inserts of rows a
    concurrent writer may make too use ``INSERT ... ON CONFLICT (key) DO NOTHING RETURNING id``
    on SQLite (3.35+) and PostgreSQL: no row back means the row exists; elsewhere the insert
    runs in a savepoint and a unique-key violation means the same."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = _statement_dialect(dialect)
        self.on_conflict = dialect.name in ("sqlite", "postgresql") and not (
            dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35)
        )
        c = self.compile
        self.series_columns = [
            f"{prefix}{col.name}"
            for prefix, table in (("se_", _SE), ("st_", _ST), ("p_", _P))
            for col in _plain_columns(table)
        ]
        self.select_series = c(
            select(*_plain_columns(_SE), *_plain_columns(_ST), *_plain_columns(_P))
            .join(_ST, _ST.c.id == _SE.c.study_pk)
            .join(_P, _P.c.id == _ST.c.patient_pk)
            .where(_SE.c.series_instance_uid == _bind(_SE.c.series_instance_uid, "uid"))
        )
        self.study_columns = self.series_columns[len(_plain_columns(_SE)) :]
        self.select_study = c(
            select(*_plain_columns(_ST), *_plain_columns(_P))
            .join(_P, _P.c.id == _ST.c.patient_pk)
            .where(_ST.c.study_instance_uid == _bind(_ST.c.study_instance_uid, "uid"))
        )
        self.select_instance = c(
            select(_I.c.id, _I.c.path, _I.c.series_pk).where(
                _I.c.sop_instance_uid == _bind(_I.c.sop_instance_uid, "uid")
            )
        )
        self.patient_key = c(
            select(_P.c.id).where(*(_P.c[k] == _bind(_P.c[k]) for k in _PATIENT_UNIQUE))
        )
        self.patient_traits = c(
            select(*(_P.c[k] for k in PATIENT_TRAITS)).where(_P.c.id == _bind(_P.c.id, "pk"))
        )
        self.study_pk = c(
            select(_ST.c.id).where(_ST.c.study_instance_uid == _bind(_ST.c.study_instance_uid))
        )
        self.series_pks = c(
            select(_SE.c.id, _SE.c.study_pk).where(
                _SE.c.series_instance_uid == _bind(_SE.c.series_instance_uid)
            )
        )
        self.series_study = c(select(_SE.c.study_pk).where(_SE.c.id == _bind(_SE.c.id, "pk")))
        # Aggregates (PS3.4 C.3.4): counts kept with the rows, modalities per study.
        delta = bindparam("delta", type_=Integer)
        count_series = (
            update(_SE)
            .where(_SE.c.id == _bind(_SE.c.id, "pk"))
            .values(number_of_instances=_SE.c.number_of_instances + delta)
        )
        self.count_series = c(count_series)
        arrival = count_series.values(
            last_received_at=_bind(_SE.c.last_received_at),
            last_source=_bind(_SE.c.last_source),
            # NULL: no instance of the transaction changed the series; the time it last did stays
            content_changed_at=func.coalesce(
                _bind(_SE.c.content_changed_at, "changed_at"), _SE.c.content_changed_at
            ),
        )
        self.count_series_arrival = c(arrival)
        self.count_series_arrival_ae = c(
            arrival.values(calling_ae=_bind(_SE.c.calling_ae), called_ae=_bind(_SE.c.called_ae))
        )
        self.count_study = c(
            update(_ST)
            .where(_ST.c.id == _bind(_ST.c.id, "pk"))
            .values(
                number_of_instances=_ST.c.number_of_instances + delta,
                updated_at=_bind(_ST.c.updated_at),
            )
        )
        # FOR NO KEY UPDATE: the lock that an UPDATE of the row takes. FOR UPDATE would also
        # wait for the key-share locks that inserting a series of the study takes, so two
        # writers each adding a series would deadlock.
        self.lock_study = c(
            select(_ST.c.id)
            .where(_ST.c.id == _bind(_ST.c.id, "pk"))
            .with_for_update(key_share=True)
        )
        self.study_modalities = c(
            select(_SE.c.modality)
            .where(_SE.c.study_pk == _bind(_SE.c.study_pk, "pk"), _SE.c.modality != "")
            .distinct()
        )
        self.study_series_count = c(
            select(func.count())
            .select_from(_SE)
            .where(_SE.c.study_pk == _bind(_SE.c.study_pk, "pk"))
        )
        self.study_aggregates = c(
            update(_ST)
            .where(_ST.c.id == _bind(_ST.c.id, "pk"))
            .values(
                number_of_instances=_ST.c.number_of_instances + delta,
                number_of_series=_bind(_ST.c.number_of_series),
                modalities_in_study=_bind(_ST.c.modalities_in_study),
                updated_at=_bind(_ST.c.updated_at),
            )
        )
        # Removal and pruning.
        self.instance_origin = c(
            select(_I.c.series_pk, _SE.c.study_pk)
            .join(_SE, _SE.c.id == _I.c.series_pk)
            .where(_I.c.id == _bind(_I.c.id, "pk"))
        )
        self.delete_instance = c(_I.delete().where(_I.c.id == _bind(_I.c.id, "pk")))
        self.any_instance = c(
            select(_I.c.id).where(_I.c.series_pk == _bind(_I.c.series_pk, "pk")).limit(1)
        )
        self.delete_series = c(_SE.delete().where(_SE.c.id == _bind(_SE.c.id, "pk")))
        self.any_series = c(
            select(_SE.c.id).where(_SE.c.study_pk == _bind(_SE.c.study_pk, "pk")).limit(1)
        )
        self.study_patient = c(select(_ST.c.patient_pk).where(_ST.c.id == _bind(_ST.c.id, "pk")))
        self.delete_study = c(_ST.delete().where(_ST.c.id == _bind(_ST.c.id, "pk")))
        self.any_study = c(
            select(_ST.c.id).where(_ST.c.patient_pk == _bind(_ST.c.patient_pk, "pk")).limit(1)
        )
        self.delete_patient = c(_P.delete().where(_P.c.id == _bind(_P.c.id, "pk")))
        # Inserts: every column but the key, the defaults filled in here (no Core to do it).
        self.insert_columns = {
            t.name: [col for col in t.c if col.name != "id"] for t in (_P, _ST, _SE, _I)
        }
        self.insert = {t.name: self._insert(t) for t in (_P, _ST, _SE, _I)}
        self.insert_key = {
            t.name: c(select(t.c.id).where(*(t.c[k] == _bind(t.c[k]) for k in key)))
            for t, key in _UNIQUE.items()
        }
        self._updates: dict[tuple[str, tuple[str, ...]], _Statement] = {}
        self._lock = threading.Lock()

    def compile(self, statement: Any) -> _Statement:
        return _Statement(statement, self.dialect)

    def _insert(self, table: Table) -> _Statement:
        values = {col.name: _bind(col) for col in self.insert_columns[table.name]}
        key = [table.c[k] for k in _UNIQUE[table]]
        if not self.on_conflict:
            return self.compile(insert(table).values(values))
        dialect_insert = sqlite_insert if self.dialect.name == "sqlite" else postgresql_insert
        return self.compile(
            dialect_insert(table)
            .values(values)
            .on_conflict_do_nothing(index_elements=key)
            .returning(table.c.id)
        )

    def row_values(self, table: Table, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` completed with the column defaults (models.py) for an insert."""
        row = {}
        for col in self.insert_columns[table.name]:
            default: Any = col.default
            if col.name in values:
                row[col.name] = values[col.name]
            elif default is None:
                row[col.name] = None
            elif default.is_callable:
                row[col.name] = default.arg(None)
            else:
                row[col.name] = default.arg
        return row

    def update(self, table: Table, columns: Iterable[str]) -> _Statement:
        """``UPDATE table SET <columns> WHERE id = :pk`` (compiled once per set of columns);
        a column with ``onupdate`` (Study.updated_at) is set too, as Core would."""
        names = tuple(sorted(columns))
        statement = self._updates.get((table.name, names))
        if statement is None:
            with self._lock:
                statement = self.compile(
                    update(table)
                    .where(table.c.id == _bind(table.c.id, "pk"))
                    .values({name: _bind(table.c[name]) for name in (*names, *_ONUPDATE[table])})
                )
                self._updates[(table.name, names)] = statement
        return statement


_COMPILED: dict[tuple[type, str], _Statements] = {}
_COMPILED_LOCK = threading.Lock()


def _statements(dialect: Dialect) -> _Statements:
    """The statements for a dialect, compiled once per process (~15 ms) for every engine of
    that dialect and parameter style."""
    key = (type(dialect), dialect.paramstyle)
    with _COMPILED_LOCK:
        if key not in _COMPILED:
            _COMPILED[key] = _Statements(dialect)
        return _COMPILED[key]


_PATIENT_UNIQUE = ("patient_id", "issuer_of_patient_id", "study_scope")
_UNIQUE: dict[Table, tuple[str, ...]] = {
    _P: _PATIENT_UNIQUE,
    _ST: ("study_instance_uid",),
    _SE: ("series_instance_uid",),
    _I: ("sop_instance_uid",),
}
_ONUPDATE: dict[Table, tuple[str, ...]] = {
    t: tuple(c.name for c in t.c if c.onupdate is not None) for t in _UNIQUE
}


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
        self._raw: Any = None  # the writer's pooled DBAPI connection (SQLite), and its cursor
        self._cursor: Any = None
        self._s = _statements(engine.dialect)

    def upsert(
        self,
        header: Header,
        *,
        size: int,
        source: str,
        calling_ae: str,
        called_ae: str,
        changed: bool = True,
    ) -> tuple[bool, str | None]:
        """Index one instance; return (duplicate, the previous path) once its rows are committed.

        Each call is an arrival of the series: ``last_received_at`` and ``last_source`` are set
        (and the AE titles, when given); ``changed`` false (the caller found the instance held
        with the same data set) leaves ``content_changed_at`` as it was.

        On SQLite, writers that arrive while another commits are grouped: the next thread to
        get the lock commits every waiting instance in one transaction (each in its own
        savepoint, so one failure fails only its instance), and one WAL fsync serves them all.
        Raises what the database driver raises (then nothing of the instance is stored).
        """
        request = _Request(header, size, source, calling_ae, called_ae, changed)
        if not self._group_commit:
            return self._commit_alone(request)
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

    def _commit_alone(self, request: _Request) -> tuple[bool, str | None]:
        """One instance in a transaction of its own, on a connection of the pool (PostgreSQL:
        concurrent writers lock rows, not the database)."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                run = _Run(cursor)
                pending = _Pending()
                result = self._upsert(run, request, pending)
                self._flush(run, pending)
                raw.commit()
            except BaseException:
                _rollback(raw)
                raise
            finally:
                cursor.close()
        finally:
            raw.close()
        return result

    def _writer(self) -> Any:
        """The cursor the writers of this process share (SQLite: one writer at a time, under
        ``_write_lock``), on a DBAPI connection kept from the pool: a checkout per instance, and
        SQLAlchemy's execution of each statement, cost more CPU than SQLite spends running it."""
        if self._raw is None:
            self._raw = self.engine.raw_connection()
            self._cursor = self._raw.cursor()
        return self._cursor

    def _drop_writer(self) -> None:
        raw, self._raw, self._cursor = self._raw, None, None
        if raw is not None:
            try:
                raw.close()
            except Exception:  # already broken: the pool discards it
                LOGGER.debug("closing the index writer's connection failed", exc_info=True)

    def close(self) -> None:
        """Give the shared writer connection back to the pool."""
        with self._write_lock:
            self._drop_writer()

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
        """One transaction for the batch (BEGIN IMMEDIATE: storage/db.py), a savepoint per
        instance when there is more than one, the counts written once at the end."""
        try:
            cursor = self._writer()
            run = _Run(cursor)
            cursor.execute("BEGIN IMMEDIATE")
            try:
                pending = _Pending()
                if len(batch) == 1:
                    batch[0].result = self._upsert(run, batch[0], pending)
                else:
                    for request in batch:
                        mine = _Pending()
                        cursor.execute("SAVEPOINT ingest")
                        try:
                            request.result = self._upsert(run, request, mine)
                        except Exception as exc:
                            cursor.execute("ROLLBACK TO SAVEPOINT ingest")
                            cursor.execute("RELEASE SAVEPOINT ingest")
                            request.error, request.result = exc, None
                            continue
                        cursor.execute("RELEASE SAVEPOINT ingest")
                        pending.merge(mine)
                self._flush(run, pending)
                self._raw.commit()
            except BaseException:
                _rollback(self._raw)
                raise
        except BaseException as exc:  # the commit failed: nothing of the batch is stored
            self._drop_writer()  # nor is the connection trusted again
            for request in batch:
                request.error = request.error or exc
                request.result = None
            if len(batch) == 1:
                raise
        finally:
            for request in batch:
                request.done = True

    def _flush(self, run: _Run, pending: _Pending) -> None:
        """Write the transaction's counts and arrival columns, one UPDATE per series, then one
        per study, each in key order: concurrent writers on PostgreSQL lock rows in one order
        (series before studies), and a study's series are counted once all are in place.

        Counting a study's series again (when they were added, removed or changed modality):
        on PostgreSQL the study row is locked first (as an UPDATE locks it), so that a
        concurrent writer adding another series to the study waits, and then counts with this
        one's series committed (READ COMMITTED reads what committed before each statement)."""
        s = self._s
        for series_pk in sorted(pending.series.keys() | pending.arrival.keys()):
            values: dict[str, Any] = {"pk": series_pk, "delta": pending.series.get(series_pk, 0)}
            arrival = pending.arrival.get(series_pk)
            if arrival is not None:
                values["last_source"] = pending.sources.get(series_pk, "")
                values["changed_at"] = pending.changed.get(series_pk)
            if arrival is None:  # counted, not arrived at (an instance moved away from it)
                run.execute(s.count_series, values)
            elif len(arrival) == 1:
                run.execute(s.count_series_arrival, values | {"last_received_at": arrival[0]})
            else:
                now, calling_ae, called_ae = arrival
                values |= {"last_received_at": now, "calling_ae": calling_ae}
                run.execute(s.count_series_arrival_ae, values | {"called_ae": called_ae})
        now = utcnow()
        for study_pk in sorted(pending.studies.keys() | pending.recount):
            values = {"pk": study_pk, "delta": pending.studies.get(study_pk, 0), "updated_at": now}
            if study_pk in pending.recount:
                run.execute(s.lock_study, {"pk": study_pk}).fetchall()
                modalities = run.column(s.study_modalities, {"pk": study_pk})
                values["number_of_series"] = run.scalar(s.study_series_count, {"pk": study_pk})
                values["modalities_in_study"] = join_modalities(modalities)
                run.execute(s.study_aggregates, values)
            elif values["delta"]:
                run.execute(s.count_study, values)

    def _upsert(self, run: _Run, request: _Request, pending: _Pending) -> tuple[bool, str | None]:
        """Index one instance inside the caller's transaction; its counts and arrival go to
        ``pending`` (written by :meth:`_flush` before the commit)."""
        s = self._s
        header, calling_ae, called_ae = request.header, request.calling_ae, request.called_ae
        now = utcnow()
        row = run.first(s.select_series, {"uid": header.series_instance_uid})
        modality_changed = False
        if row is not None:
            m = dict(zip(s.series_columns, row, strict=True))
            series_pk, study_pk = m["se_id"], m["se_study_pk"]
            changes = {
                k: v for k, v in header.series.items() if v not in ("", None) and m[f"se_{k}"] != v
            }
            if changes:
                self._set(run, _SE, series_pk, changes)
                modality_changed = "modality" in changes
            self._refresh_study(run, m, header)
        else:
            series_pk, study_pk = self._new_series(run, request, now, pending)
        pending.arrive(series_pk, now, calling_ae, called_ae, request.source, request.changed)

        values = {
            "sop_instance_uid": header.sop_instance_uid,
            "series_pk": series_pk,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            **header.instance,
            "path": header.relative_path,
            "size_bytes": request.size,
            "received_at": now,
            "source": request.source,
            "calling_ae": calling_ae,
            "called_ae": called_ae,
        }
        if self._insert_or_get(run, _I, values)[1]:
            pending.count(series_pk, study_pk, +1)
            if modality_changed:
                pending.recount.add(study_pk)
            return False, None
        existing = run.first(s.select_instance, {"uid": header.sop_instance_uid})
        instance_pk, old_path, old_series_pk = existing
        del values["sop_instance_uid"]
        self._set(run, _I, instance_pk, values)
        if old_series_pk != series_pk:  # moved to another series (re-sent: the counts stay)
            LOGGER.warning(
                "instance %s moved to series %s",
                header.sop_instance_uid,
                header.series_instance_uid,
            )
            pending.count(series_pk, study_pk, +1)
            old_study_pk = run.scalar(s.series_study, {"pk": old_series_pk})
            pending.count(old_series_pk, old_study_pk, -1)
            self._prune(run, old_series_pk, pending)
        if modality_changed:
            pending.recount.add(study_pk)
        return True, old_path

    def remove(self, conn: Connection, instance_pk: int) -> None:
        """Delete one instance row (inside the caller's transaction), keep its series' and
        study's counts right, and prune what is left empty (:meth:`prune`)."""
        run = _Run(conn=conn)
        found = run.first(self._s.instance_origin, {"pk": instance_pk})
        if found is None:
            return
        series_pk, study_pk = found
        run.execute(self._s.delete_instance, {"pk": instance_pk})
        pending = _Pending()
        pending.count(series_pk, study_pk, -1)
        self._prune(run, series_pk, pending)
        self._flush(run, pending)

    def prune(self, conn: Connection, series_pk: int) -> None:
        """Delete the series when no instance is left in it, then its study when no series is
        left, then the study's patient when no study is left (inside the caller's transaction),
        so that queries and counts never show an empty entity. A study that keeps other series
        gets its number of series and its modalities counted again."""
        run, pending = _Run(conn=conn), _Pending()
        self._prune(run, series_pk, pending)
        self._flush(run, pending)

    def _prune(self, run: _Run, series_pk: int, pending: _Pending) -> None:
        s = self._s
        if run.first(s.any_instance, {"pk": series_pk}) is not None:
            return
        study_pk = run.scalar(s.series_study, {"pk": series_pk})
        run.execute(s.delete_series, {"pk": series_pk})
        if study_pk is None:
            return
        if run.first(s.any_series, {"pk": study_pk}) is not None:
            pending.recount.add(study_pk)
            return
        patient_pk = run.scalar(s.study_patient, {"pk": study_pk})
        run.execute(s.delete_study, {"pk": study_pk})
        if patient_pk is None or run.first(s.any_study, {"pk": patient_pk}) is not None:
            return
        run.execute(s.delete_patient, {"pk": patient_pk})

    # --- helpers ------------------------------------------------------------------------
    def _set(self, run: _Run, table: Table, pk: int, values: dict[str, Any]) -> None:
        if values:
            now = {name: utcnow() for name in _ONUPDATE[table] if name not in values}
            run.execute(self._s.update(table, values), {"pk": pk, **values, **now})

    def _insert_or_get(self, run: _Run, table: Table, values: dict[str, Any]) -> tuple[int, bool]:
        """Insert a row unless its unique key exists (``values`` hold the key): return (its
        pk, whether it was inserted). On SQLite the write lock is held since BEGIN IMMEDIATE,
        so only this transaction can have made it; on PostgreSQL a concurrent writer may have
        (its INSERT waits for that one's commit, then finds the row)."""
        s = self._s
        row = s.row_values(table, values)
        key = {k: values[k] for k in _UNIQUE[table]}
        if s.on_conflict:
            pk = run.scalar(s.insert[table.name], row)
            if pk is not None:
                return int(pk), True
        else:
            run.sql("SAVEPOINT ingest_insert")
            try:
                run.execute(s.insert[table.name], row)
            except self.engine.dialect.loaded_dbapi.IntegrityError:
                run.sql("ROLLBACK TO SAVEPOINT ingest_insert")
                run.sql("RELEASE SAVEPOINT ingest_insert")
            else:
                run.sql("RELEASE SAVEPOINT ingest_insert")
                return int(run.scalar(s.insert_key[table.name], key)), True
        return int(run.scalar(s.insert_key[table.name], key)), False

    def _new_series(
        self, run: _Run, request: _Request, now: Any, pending: _Pending
    ) -> tuple[int, int]:
        """Insert the series (and its study, patient) of a header; return (series, study) pks.
        The new series starts with no instance (the caller counts the one it inserts)."""
        s, header = self._s, request.header
        study = run.first(s.select_study, {"uid": header.study_instance_uid})
        if study is not None:
            m = dict(zip(s.study_columns, study, strict=True))
            study_pk = m["st_id"]
            self._refresh_study(run, m, header)
        else:
            study_pk = self._new_study(run, header)
        series_pk, created = self._insert_or_get(
            run,
            _SE,
            {
                "series_instance_uid": header.series_instance_uid,
                "study_pk": study_pk,
                **header.series,
                "calling_ae": request.calling_ae,
                "called_ae": request.called_ae,
                "first_received_at": now,
                "last_received_at": now,
                "last_source": request.source,
                "content_changed_at": now,
            },
        )
        if not created:  # another writer made it meanwhile (and counted it in its study)
            return series_pk, run.scalar(s.series_study, {"pk": series_pk})
        pending.recount.add(study_pk)
        return series_pk, study_pk

    def _new_study(self, run: _Run, header: Header) -> int:
        s = self._s
        key = {k: header.patient[k] for k in PATIENT_KEY} | {"study_scope": patient_scope(header)}
        traits = {k: header.patient.get(k, "") for k in PATIENT_TRAITS}
        patient_pk = run.scalar(s.patient_key, key)
        if patient_pk is None:
            patient_pk, _ = self._insert_or_get(run, _P, key | traits)
        else:
            # A new study of a known patient: the patient record takes its values (the latest).
            found = run.first(s.patient_traits, {"pk": patient_pk})
            current = dict(zip(PATIENT_TRAITS, found, strict=True))
            self._set(run, _P, patient_pk, _changes(current, traits))
        study_pk, created = self._insert_or_get(
            run,
            _ST,
            {
                "study_instance_uid": header.study_instance_uid,
                "patient_pk": patient_pk,
                **header.study,
                **traits,
            },
        )
        if not created:
            study = run.first(s.select_study, {"uid": header.study_instance_uid})
            self._refresh_study(run, dict(zip(s.study_columns, study, strict=True)), header)
        return study_pk

    def _refresh_study(self, run: _Run, m: dict[str, Any], header: Header) -> None:
        """Newer headers refresh the study's own attributes. Its patient attributes are the
        first instance's: a later instance only fills what is still empty, and one naming other
        values is logged (module docstring). A study never moves to another patient."""
        study_changes = {
            k: v for k, v in header.study.items() if v not in ("", None) and m[f"st_{k}"] != v
        }
        traits = {k: header.patient.get(k, "") for k in PATIENT_TRAITS}
        conflicts = {k: v for k, v in traits.items() if v and m[f"st_{k}"] and m[f"st_{k}"] != v}
        study_changes |= {k: v for k, v in traits.items() if v and not m[f"st_{k}"]}
        if study_changes:
            self._set(run, _ST, m["st_id"], study_changes)
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
        self._set(run, _P, m["p_id"], patient_fill)


def _rollback(raw: Any) -> None:
    """Roll back a DBAPI connection's transaction; a failure here (a broken connection) is
    logged, and the error that led here is the one raised."""
    try:
        raw.rollback()
    except Exception:
        LOGGER.debug("rollback failed", exc_info=True)
