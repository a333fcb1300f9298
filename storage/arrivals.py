"""Series arrival bookkeeping, read and written by series completion (``pipeline.completion``).

Every ingest bumps ``Series.last_received_at``; completion records the arrival it handled in
``Series.completion_handled_at``. A series is unhandled while that is older than the last
arrival (or unset). These are the only statements on those columns outside ingest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.clock import as_utc
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.models import Instance, Series, Study


@dataclass(frozen=True)
class SeriesArrival:
    """A series with instances that completion has not handled yet. Datetimes UTC.

    ``last_source``, ``called_ae`` and ``calling_ae`` are those of its last arrival (the source
    empty for rows indexed before migration 0007); ``content_changed_at`` is the last arrival
    that changed it (a new instance or other bytes; ``last_received_at`` when not known)."""

    pk: int
    uid: str
    study_uid: str
    last_received_at: datetime
    called_ae: str
    calling_ae: str
    last_source: str = ""
    content_changed_at: datetime | None = None

    @property
    def changed_at(self) -> datetime:
        """When the series' content last changed (``last_received_at`` when not known)."""
        return self.content_changed_at or self.last_received_at


@dataclass(frozen=True)
class FirstInstance:
    """How a series' first instance arrived (``Instance.source``) and its archive path."""

    source: str
    path: str
    """Relative to the archive folder."""


_ARRIVAL_COLUMNS = (
    Series.id,
    Series.series_instance_uid,
    Study.study_instance_uid,
    Series.last_received_at,
    Series.called_ae,
    Series.calling_ae,
    Series.last_source,
    Series.content_changed_at,
)
"""What a :class:`SeriesArrival` is made of, in its field order."""


def _arrival(row: Sequence[Any]) -> SeriesArrival:
    """A :class:`SeriesArrival` from the :data:`_ARRIVAL_COLUMNS` of a row."""
    pk, uid, study, last, called, calling, source, changed = row
    return SeriesArrival(
        pk, uid, study, as_utc(last), called or "", calling or "", source or "", as_utc(changed)
    )


def _unhandled() -> ColumnElement[bool]:
    """A series not handled since its last arrival."""
    return or_(
        Series.completion_handled_at.is_(None),
        Series.completion_handled_at < Series.last_received_at,
    )


def unhandled_series(
    sessions: sessionmaker[Session], *, received_before: datetime, limit: int = 500
) -> list[SeriesArrival]:
    """Unhandled series whose last instance arrived at or before ``received_before``, oldest
    arrival first, at most ``limit``."""
    with sessions() as session:
        rows = session.execute(
            select(*_ARRIVAL_COLUMNS)
            .join(Study, Series.study_pk == Study.id)
            .where(_unhandled(), Series.last_received_at <= received_before)
            .order_by(Series.last_received_at)
            .limit(limit)
        ).all()
    return [_arrival(row) for row in rows]


@dataclass(frozen=True)
class WaitingArrival:
    """An unhandled series with what a status page shows of it."""

    arrival: SeriesArrival
    modality: str
    series_description: str
    instances: int


def unhandled_series_newest(
    sessions: sessionmaker[Session], limit: int = 200
) -> list[WaitingArrival]:
    """Every unhandled series, newest arrival first, at most ``limit``, with its modality,
    description and instance count."""
    with sessions() as session:
        rows = session.execute(
            select(
                *_ARRIVAL_COLUMNS,
                Series.modality,
                Series.series_description,
                select(func.count(Instance.id))
                .where(Instance.series_pk == Series.id)
                .scalar_subquery(),
            )
            .join(Study, Series.study_pk == Study.id)
            .where(_unhandled())
            .order_by(Series.last_received_at.desc())
            .limit(limit)
        ).all()
    width = len(_ARRIVAL_COLUMNS)
    out = []
    for row in rows:
        modality, description, count = row[width:]
        out.append(
            WaitingArrival(
                _arrival(row[:width]),
                str(modality or ""),
                str(description or ""),
                int(cast(int | None, count) or 0),
            )
        )
    return out


def first_instance(sessions: sessionmaker[Session], series_pk: int) -> FirstInstance | None:
    """The series' first indexed instance, or None when it has none."""
    with sessions() as session:
        row = session.execute(
            select(Instance.source, Instance.path)
            .where(Instance.series_pk == series_pk)
            .order_by(Instance.id)
            .limit(1)
        ).first()
    return None if row is None else FirstInstance(row[0], row[1])


def mark_handled(sessions: sessionmaker[Session], series_pk: int, arrival: datetime) -> None:
    """Record that completion handled the series' arrival of ``arrival`` (its
    ``last_received_at`` then); a later arrival keeps it unhandled."""
    with unit_of_work(sessions) as session:
        session.execute(
            update(Series)
            .where(Series.id == series_pk)
            .values(completion_handled_at=arrival)
            .execution_options(synchronize_session=False)
        )


def calling_aes(sessions: sessionmaker[Session], series_uids: Iterable[str]) -> dict[str, str]:
    """``{SeriesInstanceUID: calling AE title}`` of the archived series among ``series_uids``
    (the AE that sent them, PS3.8 9.3.2; empty for STOW-RS and imports)."""
    uids = sorted(set(series_uids))
    if not uids:
        return {}
    with sessions() as session:
        rows = session.execute(
            select(Series.series_instance_uid, Series.calling_ae).where(
                Series.series_instance_uid.in_(uids)
            )
        ).all()
    return {uid: calling or "" for uid, calling in rows}


__all__ = [
    "FirstInstance",
    "SeriesArrival",
    "WaitingArrival",
    "calling_aes",
    "first_instance",
    "mark_handled",
    "unhandled_series",
    "unhandled_series_newest",
]
