"""The node's one clock convention: every datetime it stores or compares is timezone-aware UTC.

SQLAlchemy's ``DateTime`` columns (``timezone=False``) hand back naive datetimes on SQLite, and
aware ones on PostgreSQL; :func:`as_utc` makes either comparable with :func:`utcnow`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utcnow() -> datetime:
    """Now, timezone-aware in UTC."""
    return datetime.now(UTC)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """``value`` as an aware UTC datetime: a naive one is taken to be UTC already (how the node
    stores them, and how SQLite hands them back), an aware one is converted to UTC; ``None``
    stays ``None``."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
