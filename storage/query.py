"""Queries over the index for C-FIND (PS3.4 C.6) and QIDO-RS (PS3.18 10.6), and the file lists
that C-MOVE, C-GET and WADO-RS send.

A query is a mapping of DICOM keywords (or tags, ``0020000D``) to query values as they arrive
(matching keys); :mod:`storage.matching` turns each into a condition. Keys that the index does
not hold are not matched on (they come back empty, as PS3.4 C.2.2.1.2 allows for optional keys).
Each ``find_*`` returns rows: dicts from keyword to value, one per entity, carrying the entity's
attributes, those of the levels above it, and the computed attributes (ModalitiesInStudy,
NumberOf...Related...). :func:`to_dataset` makes a response identifier of the requested keys.

Speed at 1,000,000 instances (``bench/bench_query.py``): one SELECT per query, LIMIT and OFFSET
in it; the computed attributes are columns that ingest keeps (storage/indexer.py), except
SOPClassesInStudy, read from the instance rows of the page's studies and only on request.
C-FIND (:func:`iter_find`) keeps each query shape's statement compiled, with bind parameters
for the values (:class:`storage.matching.Match` splits a value into both), and runs it on the
driver's cursor: no statement is built, compiled or wrapped in ORM rows per request.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import defaultdict
from collections.abc import (
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    Select,
    bindparam,
    exists,
    func,
    select,
)
from sqlalchemy.orm import Session, aliased

from nnunet_node.core.charset import answer_charset
from nnunet_node.core.errors import InvalidRequest
from nnunet_node.storage.indexer import split_modalities
from nnunet_node.storage.matching import Kind, Match, match_of, split_values
from nnunet_node.storage.models import Instance, Patient, Series, Study

LOGGER = logging.getLogger(__name__)

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
Row = dict[str, Any]
_CHUNK = 500  # keeps IN lists under SQLite's bound-parameter limit


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    column: Any  # an ORM column attribute
    kind: Kind


def _attrs(level: Level, *items: tuple[str, Any, Kind]) -> dict[str, Attribute]:
    return {kw: Attribute(kw, level, col, kind) for kw, col, kind in items}


ATTRIBUTES: dict[str, Attribute] = {
    **_attrs(
        "PATIENT",
        ("PatientID", Patient.patient_id, Kind.STRING),
        ("IssuerOfPatientID", Patient.issuer_of_patient_id, Kind.STRING),
        ("PatientName", Patient.patient_name, Kind.PN),
        ("PatientBirthDate", Patient.patient_birth_date, Kind.DATE),
        ("PatientSex", Patient.patient_sex, Kind.STRING),
    ),
    **_attrs(
        "STUDY",
        ("StudyInstanceUID", Study.study_instance_uid, Kind.UID),
        ("StudyDate", Study.study_date, Kind.DATE),
        ("StudyTime", Study.study_time, Kind.TIME),
        ("AccessionNumber", Study.accession_number, Kind.STRING),
        ("StudyID", Study.study_id, Kind.STRING),
        ("StudyDescription", Study.study_description, Kind.STRING),
        ("ReferringPhysicianName", Study.referring_physician_name, Kind.PN),
    ),
    **_attrs(
        "SERIES",
        ("SeriesInstanceUID", Series.series_instance_uid, Kind.UID),
        ("Modality", Series.modality, Kind.STRING),
        ("SeriesNumber", Series.series_number, Kind.INT),
        ("SeriesDescription", Series.series_description, Kind.STRING),
        ("BodyPartExamined", Series.body_part_examined, Kind.STRING),
        ("SeriesDate", Series.series_date, Kind.DATE),
        ("SeriesTime", Series.series_time, Kind.TIME),
        ("FrameOfReferenceUID", Series.frame_of_reference_uid, Kind.UID),
    ),
    **_attrs(
        "IMAGE",
        ("SOPInstanceUID", Instance.sop_instance_uid, Kind.UID),
        ("SOPClassUID", Instance.sop_class_uid, Kind.UID),
        ("InstanceNumber", Instance.instance_number, Kind.INT),
        ("Rows", Instance.rows, Kind.INT),
        ("Columns", Instance.columns, Kind.INT),
        ("NumberOfFrames", Instance.number_of_frames, Kind.INT),
        ("AvailableTransferSyntaxUID", Instance.transfer_syntax_uid, Kind.UID),
    ),
}
_ORDER: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_PATIENT_ONLY: tuple[Level, ...] = ("PATIENT",)

STUDY_PATIENT_ATTRIBUTES: dict[str, Attribute] = _attrs(
    "PATIENT",
    ("PatientName", Study.patient_name, Kind.PN),
    ("PatientBirthDate", Study.patient_birth_date, Kind.DATE),
    ("PatientSex", Study.patient_sex, Kind.STRING),
)
"""Below the PATIENT level, each study's own patient attributes (storage/indexer.py): a study
is always shown, and matched, with the name its instances carry."""


def _attribute(keyword: str, levels: Collection[Level]) -> Attribute | None:
    if "STUDY" in levels and keyword in STUDY_PATIENT_ATTRIBUTES:
        return STUDY_PATIENT_ATTRIBUTES[keyword]
    return ATTRIBUTES.get(keyword)


COMPUTED: dict[Level, tuple[str, ...]] = {
    "PATIENT": (
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ),
    "STUDY": (
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "IMAGE": (),
}
"""Computed attributes (PS3.4 C.3.4, C.3.5) available on rows of each level."""


def keyword_of(key: str) -> str:
    """A query key as a keyword: ``PatientID``, ``00100020`` and ``(0010,0020)`` alike."""
    text = key.strip()
    compact = text.strip("()").replace(",", "")
    if len(compact) == 8 and all(c in "0123456789abcdefABCDEF" for c in compact):
        keyword = keyword_for_tag(int(compact, 16))
        if not keyword:
            raise InvalidRequest(f"unknown attribute tag {key!r}")
        return keyword
    if tag_for_keyword(text) is None:
        raise InvalidRequest(f"unknown attribute {key!r}")
    return text


def _normalise_query(query: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in query.items():
        keyword = keyword_of(key)
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = "\\".join(str(v) for v in value)
        out[keyword] = str(value)
    return out


_STUDY_KEYS: dict[str, Kind] = {"ModalitiesInStudy": Kind.STRING, "SOPClassesInStudy": Kind.UID}
"""Computed attributes that are matching keys at the STUDY level and below."""

_LEVEL_SETS: dict[str, tuple[Level, ...]] = {
    "PATIENT": _PATIENT_ONLY,
    "STUDY": ("PATIENT", "STUDY"),
    "SERIES": ("PATIENT", "STUDY", "SERIES"),
    "IMAGE": _ORDER,
}
"""The levels whose attributes match (and come back) at each Query/Retrieve Level."""


def _matches(
    query: Mapping[str, str], level: str, *, dialect: str, fuzzy: bool
) -> dict[str, Match]:
    """How each of the query's keys that apply at ``level`` matches (universal ones and keys
    the index does not hold left out); raises :class:`InvalidRequest` for a malformed value."""
    levels = _LEVEL_SETS[level]
    out: dict[str, Match] = {}
    for keyword, value in query.items():
        attr = _attribute(keyword, levels)
        if attr is not None and attr.level in levels:
            kind = attr.kind
        elif keyword in _STUDY_KEYS and level != "PATIENT":
            kind = _STUDY_KEYS[keyword]
        else:
            continue
        match = match_of(value, kind, dialect=dialect, fuzzy=fuzzy)
        if match is not None:
            out[keyword] = match
    return out


def _conditions(
    matches: Mapping[str, Match], levels: Collection[Level]
) -> list[ColumnElement[bool]]:
    conditions = []
    for keyword, match in matches.items():
        attr = _attribute(keyword, levels)
        if attr is not None and attr.level in levels:
            conditions.append(match.condition(attr.column))
    return conditions


def _study_computed_conditions(matches: Mapping[str, Match]) -> list[ColumnElement[bool]]:
    """ModalitiesInStudy and SOPClassesInStudy as keys: a study matches when one of its
    series (instances) matches one of the values."""
    out: list[ColumnElement[bool]] = []
    modalities = matches.get("ModalitiesInStudy")
    if modalities is not None:
        inner = aliased(Series)
        cond = modalities.condition(inner.modality)
        out.append(exists().where(inner.study_pk == Study.id, cond))
    classes = matches.get("SOPClassesInStudy")
    if classes is not None:
        s2, i2 = aliased(Series), aliased(Instance)
        cond = classes.condition(i2.sop_class_uid)
        out.append(exists().where(s2.study_pk == Study.id, i2.series_pk == s2.id, cond))
    return out


def _columns(levels: Collection[Level]) -> list[Any]:
    attributes = (_attribute(k, levels) for k in ATTRIBUTES)
    return [a.column.label(a.keyword) for a in attributes if a is not None and a.level in levels]


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _page(stmt: Select[Any], limit: int | None, offset: int) -> Select[Any]:
    if offset < 0 or (limit is not None and limit < 0):
        raise InvalidRequest("limit and offset must not be negative")
    if offset:
        stmt = stmt.offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    return stmt


def _row(record: Any) -> Row:
    return _finished_row(dict(record._mapping))


def _finished_row(row: Row) -> Row:
    row["InstanceAvailability"] = "ONLINE"
    if "ModalitiesInStudy" in row:
        row["ModalitiesInStudy"] = split_modalities(row["ModalitiesInStudy"])
    return row


def _chunks(values: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _wanted(include: Collection[str] | None, level: Level) -> set[str]:
    """The computed attributes to add: when ``include`` is None all of the level's except
    SOPClassesInStudy (it reads every instance row of the page's studies: ~20 ms for 100
    studies of 100 instances), else only those named. QIDO-RS passes its requested fields,
    C-FIND its identifier's keys, so that nothing unasked is counted."""
    names = set(COMPUTED[level])
    if include is None:
        return names - {"SOPClassesInStudy"}
    return names & set(include)


# --- the four levels -------------------------------------------------------------------------


Executor = Session | Connection
"""What runs the statements that complete a batch of rows."""
Finish = Callable[[Executor, list[Row]], None]


@dataclass(frozen=True)
class _Search:
    """One level's query: the SELECT of its rows (ordered, not paged) and what completes a batch
    of its rows (computed attributes that are not columns)."""

    stmt: Select[Any]
    finish: Finish


def _no_finish(session: Executor, rows: list[Row]) -> None:
    return None


def _one_series(query: Mapping[str, str]) -> bool:
    return len(split_values(query.get("SeriesInstanceUID", ""), commas=True)) == 1


def _wanted_at(level: str, include: Collection[str] | None) -> frozenset[str]:
    if level == "PATIENT":
        return frozenset(_wanted(include, "PATIENT"))
    if level == "STUDY":
        return frozenset(_wanted(include, "STUDY"))
    return frozenset(_wanted(include, "SERIES") | _wanted(include, "STUDY"))


def _patients(matches: Mapping[str, Match], wanted: frozenset[str], one_series: bool) -> _Search:
    conds = _conditions(matches, _PATIENT_ONLY)
    stmt = select(Patient.id.label("_pk"), *_columns(_PATIENT_ONLY)).where(*conds)

    def finish(session: Executor, rows: list[Row]) -> None:
        _add_patient_counts(session, rows, wanted)

    return _Search(stmt.order_by(Patient.id), finish if wanted else _no_finish)


def _add_patient_counts(session: Executor, rows: list[Row], wanted: Collection[str]) -> None:
    """NumberOfPatientRelated...: one GROUP BY over the studies of the rows' patients, which
    keep their own counts."""
    counts: dict[str, dict[int, Any]] = {name: {} for name in COMPUTED["PATIENT"] if name in wanted}
    for chunk in _chunks([r["_pk"] for r in rows]):
        counted = (
            select(
                Study.patient_pk,
                func.count(),
                func.sum(Study.number_of_series),
                func.sum(Study.number_of_instances),
            )
            .where(Study.patient_pk.in_(chunk))
            .group_by(Study.patient_pk)
        )
        for pk, studies, series, instances in session.execute(counted):
            for name, value in (
                ("NumberOfPatientRelatedStudies", studies),
                ("NumberOfPatientRelatedSeries", series),
                ("NumberOfPatientRelatedInstances", instances),
            ):
                if name in counts:
                    counts[name][pk] = int(value or 0)
    for row in rows:
        for name, by_pk in counts.items():
            row[name] = by_pk.get(row["_pk"], 0)


def _studies(matches: Mapping[str, Match], wanted: frozenset[str], one_series: bool) -> _Search:
    conds = _conditions(matches, ("PATIENT", "STUDY")) + _study_computed_conditions(matches)
    stmt = (
        select(Study.id.label("_pk"), *_columns(("PATIENT", "STUDY")), *_aggregates(wanted))
        .join(Patient, Patient.id == Study.patient_pk)
        .where(*conds)
        .order_by(Study.id)
    )
    return _Search(stmt, _sop_classes_finish(wanted, "_pk"))


def _series(matches: Mapping[str, Match], wanted: frozenset[str], one_series: bool) -> _Search:
    conds = _conditions(matches, ("PATIENT", "STUDY", "SERIES"))
    conds += _study_computed_conditions(matches)
    stmt = (
        select(
            Series.id.label("_pk"),
            Study.id.label("_study_pk"),
            *_columns(("PATIENT", "STUDY", "SERIES")),
            *_aggregates(wanted),
        )
        .join(Study, Study.id == Series.study_pk)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(*conds)
        .order_by(Series.study_pk, Series.series_number, Series.id)
    )
    return _Search(stmt, _sop_classes_finish(wanted, "_study_pk"))


def _instances(matches: Mapping[str, Match], wanted: frozenset[str], one_series: bool) -> _Search:
    conds = _conditions(matches, _ORDER) + _study_computed_conditions(matches)
    order = (Instance.instance_number, Instance.id) if one_series else (Instance.id,)
    stmt = (
        select(
            Instance.id.label("_pk"),
            Series.id.label("_series_pk"),
            Study.id.label("_study_pk"),
            Instance.path.label("_path"),
            Instance.size_bytes.label("_size"),
            *_columns(_ORDER),
            *_aggregates(wanted),
        )
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(*conds)
        .order_by(*order)
    )
    return _Search(stmt, _sop_classes_finish(wanted, "_study_pk"))


_AGGREGATES: dict[str, Any] = {
    "ModalitiesInStudy": Study.modalities_in_study,
    "NumberOfStudyRelatedSeries": Study.number_of_series,
    "NumberOfStudyRelatedInstances": Study.number_of_instances,
    "NumberOfSeriesRelatedInstances": Series.number_of_instances,
}
"""Computed attributes the index keeps as columns (storage/indexer.py keeps them right)."""


def _aggregates(wanted: Collection[str]) -> list[Any]:
    return [column.label(name) for name, column in _AGGREGATES.items() if name in wanted]


def _sop_classes_finish(wanted: Collection[str], pk_key: str) -> Finish:
    if "SOPClassesInStudy" not in wanted:
        return _no_finish

    def finish(session: Executor, rows: list[Row]) -> None:
        _add_sop_classes(session, rows, pk_key)

    return finish


def _add_sop_classes(session: Executor, rows: list[Row], pk_key: str) -> None:
    """SOPClassesInStudy, read from the instance rows of the rows' studies (only on request)."""
    classes: dict[int, list[str]] = defaultdict(list)
    for chunk in _chunks(sorted({r[pk_key] for r in rows})):
        stmt = (
            select(Series.study_pk, Instance.sop_class_uid)
            .join(Instance, Instance.series_pk == Series.id)
            .where(Series.study_pk.in_(chunk))
            .group_by(Series.study_pk, Instance.sop_class_uid)
            .order_by(Series.study_pk, Instance.sop_class_uid)
        )
        for pk, uid in session.execute(stmt):
            classes[pk].append(uid)
    for row in rows:
        row["SOPClassesInStudy"] = classes.get(row[pk_key], [])


_SEARCHES: dict[str, Callable[[Mapping[str, Match], frozenset[str], bool], _Search]] = {
    "PATIENT": _patients,
    "STUDY": _studies,
    "SERIES": _series,
    "IMAGE": _instances,
}


def _find(
    session: Session,
    level: str,
    query: Mapping[str, Any],
    limit: int | None,
    offset: int,
    fuzzy: bool,
    include: Collection[str] | None,
) -> list[Row]:
    q = _normalise_query(query)
    matches = _matches(q, level, dialect=_dialect(session), fuzzy=fuzzy)
    search = _SEARCHES[level](matches, _wanted_at(level, include), _one_series(q))
    rows = [_row(record) for record in session.execute(_page(search.stmt, limit, offset))]
    search.finish(session, rows)
    return rows


def find_patients(
    session: Session,
    query: Mapping[str, Any],
    *,
    limit: int | None = None,
    offset: int = 0,
    fuzzy: bool = False,
    include: Collection[str] | None = None,
) -> list[Row]:
    """PATIENT level (Patient Root C-FIND): patients with a matching key, by arrival."""
    return _find(session, "PATIENT", query, limit, offset, fuzzy, include)


def find_studies(
    session: Session,
    query: Mapping[str, Any],
    *,
    limit: int | None = None,
    offset: int = 0,
    fuzzy: bool = False,
    include: Collection[str] | None = None,
) -> list[Row]:
    """STUDY level (C-FIND both roots, QIDO-RS ``/studies``): patient and study keys match,
    plus ModalitiesInStudy and SOPClassesInStudy. Ordered by arrival (stable for paging)."""
    return _find(session, "STUDY", query, limit, offset, fuzzy, include)


def find_series(
    session: Session,
    query: Mapping[str, Any],
    *,
    limit: int | None = None,
    offset: int = 0,
    fuzzy: bool = False,
    include: Collection[str] | None = None,
) -> list[Row]:
    """SERIES level (C-FIND, QIDO-RS ``/series`` and ``/studies/{study}/series``): patient,
    study and series keys match. Rows carry the study's attributes too. Ordered by study, then
    Series Number, then arrival."""
    return _find(session, "SERIES", query, limit, offset, fuzzy, include)


def find_instances(
    session: Session,
    query: Mapping[str, Any],
    *,
    limit: int | None = None,
    offset: int = 0,
    fuzzy: bool = False,
    include: Collection[str] | None = None,
) -> list[Row]:
    """IMAGE level (C-FIND, QIDO-RS ``/instances`` and the study- and series-scoped forms):
    every level's keys match. Rows carry the series and study attributes too, and ``_path``
    (relative to the archive). Within one series ordered by Instance Number, else by arrival."""
    return _find(session, "IMAGE", query, limit, offset, fuzzy, include)


def _level(level: str) -> str:
    name = level.strip().upper()
    if name not in _SEARCHES:
        raise InvalidRequest(f"unknown query/retrieve level {level!r}")
    return name


def find(
    session: Session,
    level: str,
    query: Mapping[str, Any],
    **options: Any,
) -> list[Row]:
    """C-FIND at ``level`` (the Query/Retrieve Level, PS3.4 C.4.1.1.3.1)."""
    finders = {
        "PATIENT": find_patients,
        "STUDY": find_studies,
        "SERIES": find_series,
        "IMAGE": find_instances,
    }
    return finders[_level(level)](session, query, **options)


def iter_find(
    source: Session | Connection | Engine,
    level: str,
    query: Mapping[str, Any],
    *,
    fuzzy: bool = False,
    include: Collection[str] | None = None,
    batch: int = 500,
) -> Generator[Row, None, None]:
    """:func:`find` without a limit, streamed: the rows come ``batch`` at a time from one
    SELECT (a server-side cursor on PostgreSQL), so that a C-FIND matching a million instances
    answers its first match at once and never holds every row in memory. ``source``: a session
    or connection (kept open while iterating; its transaction is used), or an engine (a
    connection is taken from its pool for the iteration). Closing the iterator early (a
    C-CANCEL) stops the SELECT.

    The statement is kept per query shape (level, which keys match and how, the computed
    attributes asked for) and run with the query's values bound, on the driver's cursor: a
    repeated query builds and compiles nothing (~30 us instead of ~600 us for a C-FIND).

    Raises :class:`InvalidRequest` for an unknown level or a malformed value (before the
    first row)."""
    name = _level(level)
    dialect = (source.get_bind() if isinstance(source, Session) else source).dialect
    q = _normalise_query(query)
    matches = _matches(q, name, dialect=dialect.name, fuzzy=fuzzy)
    shapes = tuple((kw, m.shape, len(m.params)) for kw, m in matches.items())
    plan = _plan(dialect, name, shapes, _wanted_at(name, include), _one_series(q))
    return _stream(source, plan, plan.parameters(matches), batch)


@dataclass(frozen=True)
class _Plan:
    """A level's SELECT for one query shape, compiled for one database, with bind parameters
    named ``{keyword}_{n}`` for the values of each matching key."""

    sql: str
    positions: tuple[str, ...] | None
    """The bind names in order for a positional paramstyle (SQLite's ``?``), else None."""
    defaults: Mapping[str, Any]
    """Every bind name with the value compiled in (constants such as ``''``)."""
    columns: tuple[str, ...]
    finish: Finish

    def parameters(self, matches: Mapping[str, Match]) -> Any:
        """The DBAPI parameters for ``matches`` (of this plan's shape)."""
        values = dict(self.defaults)
        for keyword, match in matches.items():
            for n, value in enumerate(match.params):
                values[f"{keyword}_{n}"] = value
        if self.positions is None:
            return values
        return tuple(values[name] for name in self.positions)


@functools.lru_cache(maxsize=512)
def _plan(
    dialect: Dialect,
    level: str,
    shapes: tuple[tuple[str, tuple[Any, ...], int], ...],
    wanted: frozenset[str],
    one_series: bool,
) -> _Plan:
    """Build and compile the statement of a query shape (kept: at most 512 shapes)."""
    matches = {
        keyword: Match(shape, tuple(bindparam(f"{keyword}_{n}") for n in range(count)))
        for keyword, shape, count in shapes
    }
    search = _SEARCHES[level](matches, wanted, one_series)
    compiled = search.stmt.compile(dialect=dialect)
    defaults = {name: bind.value for bind, name in compiled.bind_names.items()}
    positions = tuple(compiled.positiontup or ()) if compiled.positional else None
    columns = tuple(search.stmt.selected_columns.keys())
    return _Plan(compiled.string, positions, defaults, columns, search.finish)


@contextmanager
def _connection(source: Session | Connection | Engine) -> Iterator[Connection]:
    if isinstance(source, Session):
        yield source.connection()
    elif isinstance(source, Connection):
        yield source
    else:
        with source.connect() as connection:
            yield connection


_CURSORS = itertools.count()


def _stream(
    source: Session | Connection | Engine, plan: _Plan, parameters: Any, batch: int
) -> Generator[Row, None, None]:
    if isinstance(source, Engine) and plan.finish is _no_finish:
        # Nothing but the one SELECT: the pool's DBAPI connection alone (a Connection around
        # it costs ~3 times the SQLite query on a fresh association thread).
        dbapi = source.raw_connection()
        try:
            yield from _fetch(dbapi, source.dialect.name, plan, parameters, batch, None)
        finally:
            dbapi.close()  # back to the pool (rolled back there)
        return
    with _connection(source) as connection:
        if plan.finish is not _no_finish and not connection.in_transaction():
            connection.begin()  # the rows and what completes them read one snapshot
        name = connection.dialect.name
        yield from _fetch(connection.connection, name, plan, parameters, batch, connection)


def _fetch(
    dbapi: Any,
    dialect: str,
    plan: _Plan,
    parameters: Any,
    batch: int,
    connection: Connection | None,
) -> Generator[Row, None, None]:
    if dialect == "sqlite":
        cursor = dbapi.cursor()
    else:  # a server-side cursor: the rows come as they are fetched
        cursor = dbapi.cursor(name=f"nnunet_find_{next(_CURSORS)}")
    try:
        cursor.execute(plan.sql, parameters)
        columns = plan.columns
        while records := cursor.fetchmany(batch):
            rows = [_finished_row(dict(zip(columns, record, strict=True))) for record in records]
            if connection is not None:
                plan.finish(connection, rows)
            yield from rows
    finally:
        cursor.close()


# --- responses -------------------------------------------------------------------------------


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC"}
_TEXT_VRS |= {"UI", "UR", "UT"}


@functools.lru_cache(maxsize=4096)
def response_key(key: str) -> tuple[str, int, str] | None:
    """A returned key's keyword, tag and VR (pydicom's dictionary of PS3.6); None for keys not
    returned as elements (rows' private ``_`` keys, unknown keywords, Specific Character Set,
    Query/Retrieve Level)."""
    if key.startswith("_"):
        return None
    try:
        keyword = keyword_of(key)
    except InvalidRequest:
        return None
    if keyword in ("SpecificCharacterSet", "QueryRetrieveLevel"):
        return None
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return keyword, tag, dictionary_VR(tag)


def to_dataset(
    row: Mapping[str, Any], keys: Iterable[str], *, requested_charset: Any = None
) -> Dataset:
    """A response identifier with the requested keys: the row's value, or an empty value when
    the index does not hold the attribute (PS3.4 C.4.1.1.3.2). Rows' private ``_`` keys and
    unknown keywords are skipped.

    Specific Character Set: the requester's (``requested_charset``, the C-FIND identifier's)
    when it can encode every value, else ``ISO_IR 192`` (UTF-8) when a value is not ASCII
    (:func:`core.charset.answer_charset`); absent for plain ASCII with no request."""
    ds = Dataset()
    texts: list[str] = []
    for key in keys:
        spec = response_key(key)
        if spec is None:
            continue
        keyword, tag, vr = spec
        if vr == "SQ":
            value: Any = []
        else:
            value = row.get(keyword)
            if value is None or value == "" or value == []:
                value = "" if vr in _TEXT_VRS else None
            else:
                if isinstance(value, str):
                    texts.append(value)
                if vr == "IS" and isinstance(value, int):
                    value = str(value)
        # The index's values were checked when they were read; validating them again per
        # answer cost more than the rest of building it.
        ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
    answer = answer_charset(texts, requested_charset)
    if answer is not None:
        ds.SpecificCharacterSet = answer
    return ds


# --- retrieve --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRef:
    """One file to send (C-MOVE, C-GET, WADO-RS)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: str
    """Relative to the archive folder."""
    size_bytes: int


_RETRIEVE_KEY = {
    "PATIENT": Patient.patient_id,
    "STUDY": Study.study_instance_uid,
    "SERIES": Series.series_instance_uid,
    "IMAGE": Instance.sop_instance_uid,
}


def instance_refs(
    session: Session,
    level: str,
    uids: str | Sequence[str],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[InstanceRef]:
    """Every instance under the entities named by ``uids`` at ``level`` (PATIENT: Patient IDs;
    STUDY, SERIES, IMAGE: UIDs), ordered by study, series number and instance number.
    ``study_uid``/``series_uid`` narrow the search, as a C-MOVE identifier or a WADO-RS URL
    does (``/studies/{s}/series/{x}``)."""
    column = _RETRIEVE_KEY.get(level.strip().upper())
    if column is None:
        raise InvalidRequest(f"unknown query/retrieve level {level!r}")
    values = [uids] if isinstance(uids, str) else list(uids)
    values = [v for value in values for v in value.replace(",", "\\").split("\\") if v]
    if not values:
        return []
    out: list[InstanceRef] = []
    for start in range(0, len(values), _CHUNK):
        stmt = (
            select(
                Instance.sop_instance_uid,
                Instance.sop_class_uid,
                Instance.transfer_syntax_uid,
                Series.series_instance_uid,
                Study.study_instance_uid,
                Instance.path,
                Instance.size_bytes,
            )
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(column.in_(values[start : start + _CHUNK]))
            .order_by(Study.id, Series.series_number, Series.id)
            .order_by(Instance.instance_number, Instance.id)
        )
        if study_uid:
            stmt = stmt.where(Study.study_instance_uid == study_uid)
        if series_uid:
            stmt = stmt.where(Series.series_instance_uid == series_uid)
        out.extend(InstanceRef(*record) for record in session.execute(stmt))
    return out


def instance_paths(
    session: Session, level: str, uids: str | Sequence[str], **narrow: str | None
) -> list[Path]:
    """The files (relative to the archive folder) under the named entities; see
    :func:`instance_refs`."""
    return [Path(ref.path) for ref in instance_refs(session, level, uids, **narrow)]


def instance_files(
    session: Session,
    archive_root: Path,
    level: str,
    uids: str | Sequence[str],
    **narrow: str | None,
) -> list[Path]:
    """Absolute paths of the files under the named entities; see :func:`instance_refs`."""
    return [Path(archive_root) / ref.path for ref in instance_refs(session, level, uids, **narrow)]


def series_owners(
    session: Session, series_uids: Sequence[str]
) -> dict[str, tuple[str | None, str | None]]:
    """``{SeriesInstanceUID: (StudyInstanceUID, PatientID)}`` of the archived series among
    ``series_uids`` (absent ones are left out)."""
    found: dict[str, tuple[str | None, str | None]] = {}
    values = list(series_uids)
    for start in range(0, len(values), _CHUNK):
        rows = session.execute(
            select(Series.series_instance_uid, Study.study_instance_uid, Patient.patient_id)
            .join(Study, Series.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
            .where(Series.series_instance_uid.in_(values[start : start + _CHUNK]))
        ).all()
        found.update({uid: (study, patient) for uid, study, patient in rows})
    return found


__all__ = [
    "ATTRIBUTES",
    "COMPUTED",
    "InstanceRef",
    "Level",
    "Row",
    "find",
    "find_instances",
    "find_patients",
    "find_series",
    "find_studies",
    "instance_files",
    "instance_paths",
    "instance_refs",
    "iter_find",
    "keyword_of",
    "response_key",
    "series_owners",
    "to_dataset",
]


def index_counts(session: Session) -> dict[str, int]:
    """Rows of the DICOM index at each level: ``patients``, ``studies``, ``series``,
    ``instances``, and ``bytes``, the size of the archived files."""
    counts = {
        name: int(session.scalar(select(func.count()).select_from(model)) or 0)
        for name, model in (
            ("patients", Patient),
            ("studies", Study),
            ("series", Series),
            ("instances", Instance),
        )
    }
    counts["bytes"] = int(
        session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0
    )
    return counts
