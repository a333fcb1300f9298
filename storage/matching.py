"""Attribute matching for C-FIND and QIDO-RS (PS3.4 C.2.2.2, PS3.18 8.3.4) as small pure functions.

Each function turns one query value into a SQLAlchemy condition on one column, or None for
universal matching (an empty value, or a lone ``*``: C.2.2.2.3 and C.2.2.2.4). The kinds:

- single value matching (C.2.2.2.1): equality; case-sensitive except for PN (person names),
  which match case-insensitively as C.2.2.2.1 allows, and a value of one component group
  matches any group of a stored name (alphabetic, ideographic or phonetic);
- wildcard matching (C.2.2.2.4): ``*`` any sequence, ``?`` one character. SQL ``LIKE`` with
  ``%``, ``_`` and the escape character escaped in the value, so they match only themselves. On
  SQLite, whose ``LIKE`` ignores case, a ``GLOB`` pattern keeps the match case-sensitive (and can
  use the column's index for a leading literal prefix);
- range matching (C.2.2.2.5) for DA, TM and DT: ``A-B``, ``-B``, ``A-``; an upper bound of lower
  precision includes the whole interval it names (``-1015`` includes ``101530``). Empty stored
  values never match a range;
- UID list matching (C.2.2.2.2): values separated by backslashes (and, for QIDO-RS, commas);
- integers (IS) match by value.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, ColumnElement, and_, func, or_

from nnunet_node.core.errors import InvalidRequest

LIKE_ESCAPE = "\\"


class Kind(enum.Enum):
    """How an attribute's values match, after its Value Representation."""

    STRING = "string"  # CS, SH, LO, AE, ...: single value and wildcard matching
    PN = "pn"  # person names: case-insensitive
    UID = "uid"  # UI: single value and UID list matching
    DATE = "date"  # DA: single value and range
    TIME = "time"  # TM: single value (prefix) and range
    DATETIME = "datetime"  # DT: single value (prefix) and range
    INT = "int"  # IS, US: single value


def is_universal(value: str | None) -> bool:
    """Empty (C.2.2.2.3) or a lone ``*`` (C.2.2.2.4): every entity matches."""
    return value is None or value.strip(" \x00") in ("", "*")


def has_wildcards(value: str) -> bool:
    return "*" in value or "?" in value


def wildcard_to_like(value: str, escape: str = LIKE_ESCAPE) -> str:
    """A DICOM wildcard value as a SQL ``LIKE`` pattern (used with ``ESCAPE escape``)."""
    out = []
    for char in value:
        if char in (escape, "%", "_"):
            out.append(escape + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)


def wildcard_to_glob(value: str) -> str:
    """A DICOM wildcard value as an SQLite ``GLOB`` pattern (``*`` and ``?`` mean the same;
    only ``[`` needs escaping, as the one-character class ``[[]``)."""
    return value.replace("[", "[[]")


def split_values(value: str, *, commas: bool = False) -> list[str]:
    """Backslash-separated values (PS3.5 6.4), also comma-separated for QIDO-RS UID lists."""
    text = value.replace(",", "\\") if commas else value
    return [part.strip(" \x00") for part in text.split("\\") if part.strip(" \x00")]


def parse_range(value: str) -> tuple[str | None, str | None] | None:
    """``A-B``, ``-B`` or ``A-`` as (lower, upper), either None when open; None when the value
    is not a range. A value with more than one hyphen is refused."""
    if "-" not in value:
        return None
    lower, _, upper = value.partition("-")
    if "-" in upper:
        raise InvalidRequest(f"{value!r} is not a valid range (PS3.4 C.2.2.2.5)")
    return (lower.strip() or None, upper.strip() or None)


def normalise_date(value: str) -> str:
    """YYYYMMDD, a date of the calendar (PS3.5 6.2 DA); the ACR-NEMA form YYYY.MM.DD is
    accepted. Raises InvalidRequest otherwise (20261301 too: it would match nothing, and a
    query that cannot match is the requester's mistake, as QIDO-RS answers it)."""
    text = value.strip().replace(".", "")
    if not (len(text) == 8 and text.isdigit()):
        raise InvalidRequest(f"{value!r} is not a date (YYYYMMDD)")
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError as exc:
        raise InvalidRequest(f"{value!r} is not a calendar date") from exc
    return text


def normalise_time(value: str) -> str:
    """HHMMSS.FFFFFF with any precision from HH; the ACR-NEMA form HH:MM:SS is accepted."""
    text = value.strip().replace(":", "")
    digits = text.split(".", 1)
    if not (digits[0].isdigit() and len(digits[0]) in (2, 4, 6)) or (
        len(digits) == 2 and not digits[1].isdigit()
    ):
        raise InvalidRequest(f"{value!r} is not a time (HHMMSS.FFFFFF)")
    return text


def normalise_datetime(value: str) -> str:
    """YYYY[MM[DD[HH[MM[SS[.F]]]]]]; a ``+`` UTC offset is dropped (a ``-`` offset cannot be
    told from a range's hyphen, so queries must not use one)."""
    text = value.strip().split("+", 1)[0]
    head = text.split(".", 1)
    if not (head[0].isdigit() and len(head[0]) in (4, 6, 8, 10, 12, 14)):
        raise InvalidRequest(f"{value!r} is not a date-time (YYYYMMDDHHMMSS.FFFFFF)")
    return text


_NORMALISE = {
    Kind.DATE: normalise_date,
    Kind.TIME: normalise_time,
    Kind.DATETIME: normalise_datetime,
}


def _upper_bound(value: str) -> str:
    # "~" sorts after every digit and ".", so "-1015" includes 10:15:30 and "-2024" all of 2024.
    return value + "~"


def range_condition(column: Any, lower: str | None, upper: str | None) -> ColumnElement[bool]:
    """C.2.2.2.5 on a text column holding DA, TM or DT values (they sort as they read)."""
    params = [v for v in (lower, upper and _upper_bound(upper)) if v is not None]
    return _range(column, params, lower is not None, upper is not None)


def _range(
    column: Any, params: Sequence[Any], has_lower: bool, has_upper: bool
) -> ColumnElement[bool]:
    parts: list[ColumnElement[bool]] = [column != ""]
    bounds = iter(params)
    if has_lower:
        parts.append(column >= next(bounds))
    if has_upper:
        parts.append(column <= next(bounds))
    return and_(*parts)


def sql_lower(value: str, dialect: str) -> str:
    """``value`` lowered as the database's ``lower()`` lowers a column: SQLite lowers ASCII
    letters only (Ελένη stays as it is), PostgreSQL every letter."""
    if dialect == "sqlite":
        return "".join(c.lower() if c.isascii() else c for c in value)
    return value.lower()


def wildcard_condition(
    column: Any, value: str, *, dialect: str, case_sensitive: bool = True
) -> ColumnElement[bool]:
    """C.2.2.2.4 with the SQL pattern escaped; ``dialect`` picks GLOB on SQLite."""
    match = _wildcard_match(value, dialect=dialect, case_sensitive=case_sensitive)
    return match.condition(column)


def _wildcard_match(value: str, *, dialect: str, case_sensitive: bool = True) -> Match:
    if not case_sensitive:
        return Match(("lower_like",), (wildcard_to_like(sql_lower(value, dialect)),))
    if dialect == "sqlite":
        return Match(("glob",), (wildcard_to_glob(value),))
    return Match(("like",), (wildcard_to_like(value),))


def pn_condition(
    column: Any, value: str, *, dialect: str, fuzzy: bool = False
) -> ColumnElement[bool]:
    """Person names, case-insensitive. ``fuzzy`` (QIDO-RS ``fuzzymatching=true``): the value
    matches the start of any name component (family, given, middle...)."""
    return _pn_match(value, dialect=dialect, fuzzy=fuzzy).condition(column)


def _pn_match(value: str, *, dialect: str, fuzzy: bool) -> Match:
    if fuzzy:
        stem = value.rstrip("*")
        pattern = wildcard_to_like(sql_lower(stem, dialect))
        return Match(
            ("lower_like_any",), (pattern + "%", "%^" + pattern + "%", "% " + pattern + "%")
        )
    whole = (
        _wildcard_match(value, dialect=dialect, case_sensitive=False)
        if has_wildcards(value)
        else Match(("lower_eq",), (sql_lower(value, dialect),))
    )
    if "=" in value:
        return whole
    # A value of one component group matches any group of a stored name (PS3.5 6.2.1.1:
    # alphabetic=ideographic=phonetic), so 山田^太郎 finds Yamada^Tarou=山田^太郎=やまだ^たろう.
    # A value ending in * already matches what "value=*" and "*=value=*" would (each pattern
    # costs a lower() of every name the query reads).
    groups: tuple[str, ...] = (f"{value}=*", f"*={value}", f"*={value}=*")
    if value.endswith("*"):
        groups = (f"*={value}",)
    patterns = tuple(wildcard_to_like(sql_lower(g, dialect)) for g in groups)
    return Match(("pn_groups", whole.shape[0]), whole.params + patterns)


def _pn_groups(column: Any, params: Sequence[Any], whole: str) -> ColumnElement[bool]:
    lowered = func.lower(column)
    first = _BUILDERS[whole](column, params[:1])
    return or_(first, *(lowered.like(p, escape=LIKE_ESCAPE) for p in params[1:]))


def uid_condition(column: Any, value: str) -> ColumnElement[bool]:
    """C.2.2.2.2: one UID or a list of them."""
    return _values_match(split_values(value, commas=True)).condition(column)


def _values_match(values: Sequence[Any]) -> Match:
    """Equality with one value, else IN the list (a shape per list length)."""
    if len(values) == 1:
        return Match(("eq",), (values[0],))
    return Match(("in", len(values)), tuple(values))


@dataclass(frozen=True)
class Match:
    """How one query value matches, split into what shapes the SQL and the values bound in it:
    two values with the same ``shape`` make the same SQL with other ``params``, so a statement
    built once with bind parameters in their place (storage/query.py) serves both."""

    shape: tuple[Any, ...]
    """Hashable: the builder's name, then what else decides the SQL (a list's length...)."""
    params: tuple[Any, ...]
    """The values the SQL compares with (patterns, bounds, UIDs), in the builder's order."""

    def condition(self, column: Any, params: Sequence[Any] | None = None) -> ColumnElement[bool]:
        """The condition on ``column`` with ``params`` (default: this match's own values; bind
        parameters in their place make the statement of every value of this shape)."""
        build = _BUILDERS[self.shape[0]]
        return build(column, self.params if params is None else params, *self.shape[1:])


_BUILDERS: dict[str, Callable[..., ColumnElement[bool]]] = {
    "eq": lambda col, p: col == p[0],
    "in": lambda col, p, _count: col.in_(list(p)),
    "lower_eq": lambda col, p: func.lower(col) == p[0],
    "lower_like": lambda col, p: func.lower(col).like(p[0], escape=LIKE_ESCAPE),
    "lower_like_any": lambda col, p: or_(*(func.lower(col).like(x, escape=LIKE_ESCAPE) for x in p)),
    "glob": lambda col, p: col.op("GLOB", return_type=Boolean)(p[0]),
    "like": lambda col, p: col.like(p[0], escape=LIKE_ESCAPE),
    "range": _range,
    "pn_groups": _pn_groups,
}


def match_of(
    value: str | None, kind: Kind, *, dialect: str = "sqlite", fuzzy: bool = False
) -> Match | None:
    """How ``value`` matches an attribute of ``kind``, or None for universal matching. Raises
    :class:`InvalidRequest` for a value the kind cannot take (a malformed date or range, an
    integer that is not one)."""
    if value is None or is_universal(value):
        return None
    text = value.strip(" \x00")
    if kind is Kind.UID:
        return _values_match(split_values(text, commas=True))
    if kind is Kind.INT:
        try:
            numbers = [int(v) for v in split_values(text)]
        except ValueError as exc:
            raise InvalidRequest(f"{value!r} is not an integer") from exc
        return _values_match(numbers)
    if kind is Kind.PN:
        return _pn_match(text, dialect=dialect, fuzzy=fuzzy)
    if kind in _NORMALISE:
        normalise = _NORMALISE[kind]
        bounds = parse_range(text)
        if bounds is not None:
            lower, upper = (normalise(b) if b else None for b in bounds)
        else:
            single = normalise(text)
            if kind is Kind.DATE:
                return Match(("eq",), (single,))
            # TM and DT: a value of lower precision names the whole interval (10 = 10:00-10:59).
            lower = upper = single
        params = tuple(v for v in (lower, upper and _upper_bound(upper)) if v is not None)
        return Match(("range", lower is not None, upper is not None), params)
    if has_wildcards(text):
        return _wildcard_match(text, dialect=dialect)
    values = split_values(text)
    if len(values) > 1:
        return Match(("in", len(values)), tuple(values))
    return Match(("eq",), (text,))


def value_condition(
    column: Any,
    value: str | None,
    kind: Kind,
    *,
    dialect: str = "sqlite",
    fuzzy: bool = False,
) -> ColumnElement[bool] | None:
    """The condition for one attribute of a query, or None for universal matching."""
    match = match_of(value, kind, dialect=dialect, fuzzy=fuzzy)
    return None if match is None else match.condition(column)
