"""PS3.4 C.2.2.2 matching, function by function, and against real rows in SQLite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.dialects import postgresql

from nnunet_node.core.errors import InvalidRequest
from nnunet_node.storage.matching import (
    Kind,
    has_wildcards,
    is_universal,
    normalise_date,
    normalise_time,
    parse_range,
    split_values,
    value_condition,
    wildcard_to_glob,
    wildcard_to_like,
)


def test_universal() -> None:
    assert is_universal(None)
    assert is_universal("")
    assert is_universal("*")
    assert is_universal("  ")
    assert not is_universal("**x")
    assert value_condition(Column("x", String), "", Kind.STRING) is None
    assert value_condition(Column("x", String), "*", Kind.UID) is None


def test_wildcards_to_like_escape_sql_specials() -> None:
    assert has_wildcards("AB*") and has_wildcards("A?C") and not has_wildcards("ABC")
    assert wildcard_to_like("Doe*") == "Doe%"
    assert wildcard_to_like("A?C") == "A_C"
    assert wildcard_to_like("100%_x*") == "100\\%\\_x%"
    assert wildcard_to_like("back\\slash?") == "back\\\\slash_"
    assert wildcard_to_glob("a[1]*") == "a[[]1]*"


def test_ranges() -> None:
    assert parse_range("20240101-20240131") == ("20240101", "20240131")
    assert parse_range("-20240131") == (None, "20240131")
    assert parse_range("20240101-") == ("20240101", None)
    assert parse_range("20240101") is None
    with pytest.raises(InvalidRequest):
        parse_range("1-2-3")


def test_normalise_date_and_time() -> None:
    assert normalise_date("2024.01.02") == "20240102"
    assert normalise_time("10:15:30") == "101530"
    assert normalise_time("101530.25") == "101530.25"
    assert normalise_date("20240229") == "20240229"
    for bad in ("2024", "abc", "2024013", "20261301", "20230229", "20240000"):
        with pytest.raises(InvalidRequest):
            normalise_date(bad)
    with pytest.raises(InvalidRequest):
        normalise_time("1x")


def test_uid_lists() -> None:
    assert split_values("1.2\\1.3") == ["1.2", "1.3"]
    assert split_values("1.2,1.3", commas=True) == ["1.2", "1.3"]
    assert split_values("a\\\\b ") == ["a", "b"]


def test_other_databases_get_an_escaped_like() -> None:
    cond = value_condition(Column("name", String), "A%*", Kind.STRING, dialect="postgresql")
    assert cond is not None
    compiled = cond.compile(dialect=postgresql.dialect())
    assert "LIKE" in str(compiled) and "ESCAPE '\\'" in str(compiled)
    assert list(compiled.params.values()) == ["A\\%%"]


# --- the same rules against rows ----------------------------------------------------------

ROWS = [
    (1, "Doe^Jane", "CT", "1.2.3", "20240102", "101530", 7),
    (2, "DOE^John", "MR", "1.2.4", "20240215", "090000", 8),
    (3, "Smith^Ann", "SEG", "1.2.5", "20231231", "235959.5", None),
    (4, "100%_Mark", "C_", "1.2.6", "", "", 1),
    (5, "Ab[c]", "ct", "1.2.7", "20240110", "1015", 2),
]


@pytest.fixture(scope="module")
def table() -> Iterator[tuple[Engine, Table]]:
    engine = create_engine("sqlite://")
    meta = MetaData()
    t = Table(
        "t",
        meta,
        Column("id", Integer, primary_key=True),
        Column("name", String),
        Column("modality", String),
        Column("uid", String),
        Column("date", String),
        Column("time", String),
        Column("number", Integer),
    )
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            t.insert(),
            [
                dict(
                    zip(("id", "name", "modality", "uid", "date", "time", "number"), r, strict=True)
                )
                for r in ROWS
            ],
        )
    yield engine, t
    engine.dispose()


def _ids(table: tuple[Engine, Table], column: str, value: str, kind: Kind, **kw: bool) -> list[int]:
    engine, t = table
    cond = value_condition(t.c[column], value, kind, dialect="sqlite", **kw)
    stmt = select(t.c.id).order_by(t.c.id)
    if cond is not None:
        stmt = stmt.where(cond)
    with engine.connect() as conn:
        return list(conn.scalars(stmt))


@pytest.mark.parametrize(
    ("column", "value", "kind", "expected"),
    [
        # single value: exact and case-sensitive
        ("modality", "CT", Kind.STRING, [1]),
        ("modality", "ct", Kind.STRING, [5]),
        # wildcards: case-sensitive, SQL specials literal
        ("modality", "C*", Kind.STRING, [1, 4]),
        ("modality", "?T", Kind.STRING, [1]),
        ("modality", "C_", Kind.STRING, [4]),  # "_" is not a wildcard in DICOM
        ("name", "100%*", Kind.STRING, [4]),
        ("name", "Ab[c]*", Kind.STRING, [5]),
        ("name", "*", Kind.STRING, [1, 2, 3, 4, 5]),
        # person names: case-insensitive
        ("name", "doe^jane", Kind.PN, [1]),
        ("name", "DOE*", Kind.PN, [1, 2]),
        (
            "name",
            "jo",
            Kind.PN,
            [],
        ),
        # UID single and list
        ("uid", "1.2.3", Kind.UID, [1]),
        ("uid", "1.2.3\\1.2.5", Kind.UID, [1, 3]),
        ("uid", "1.2.4,1.2.7", Kind.UID, [2, 5]),
        ("uid", "1.2", Kind.UID, []),
        # dates: single, closed, open ranges; empty values never match a range
        ("date", "20240102", Kind.DATE, [1]),
        ("date", "20240101-20240131", Kind.DATE, [1, 5]),
        ("date", "-20231231", Kind.DATE, [3]),
        ("date", "20240110-", Kind.DATE, [2, 5]),
        # times: lower precision names the whole interval
        ("time", "10", Kind.TIME, [1, 5]),
        ("time", "1015", Kind.TIME, [1, 5]),
        ("time", "-1015", Kind.TIME, [1, 2, 5]),
        ("time", "2300-", Kind.TIME, [3]),
        ("time", "09:00-10:00", Kind.TIME, [2]),
        # integers
        ("number", "7", Kind.INT, [1]),
        ("number", "1\\2", Kind.INT, [4, 5]),
        # a value list on strings
        ("modality", "MR\\SEG", Kind.STRING, [2, 3]),
    ],
)
def test_matching_rows(
    table: tuple[Engine, Table], column: str, value: str, kind: Kind, expected: list[int]
) -> None:
    assert _ids(table, column, value, kind) == expected


def test_fuzzy_person_name_matches_any_component(table: tuple[Engine, Table]) -> None:
    assert _ids(table, "name", "jo", Kind.PN, fuzzy=True) == [2]
    assert _ids(table, "name", "ann", Kind.PN, fuzzy=True) == [3]
    assert _ids(table, "name", "do", Kind.PN, fuzzy=True) == [1, 2]


def test_bad_values_are_client_errors(table: tuple[Engine, Table]) -> None:
    with pytest.raises(InvalidRequest):
        _ids(table, "number", "seven", Kind.INT)
    with pytest.raises(InvalidRequest):
        _ids(table, "date", "yesterday", Kind.DATE)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("yamada*", [1, 2, 4]),  # the alphabetic group of 1 and 2, the second group of 4
        ("山田*", [1]),  # the ideographic group
        ("やまだ*", [1]),  # the phonetic group
        ("*太郎*", [1]),
        ("yamada^tarou", [1]),  # a whole group, first
        ("山田^太郎", [1]),  # a whole group, in the middle
        ("スミス^アン", [3]),  # a whole group, last
        ("tanaka*", [4]),
        ("*=yamada", [4]),  # a value naming groups matches the whole name only
        ("yamada", [4]),  # the whole second group of 4
    ],
)
def test_person_name_groups_with_and_without_wildcards(value: str, expected: list[int]) -> None:
    """PS3.5 6.2.1.1: a value of one component group matches any group of a stored name; a
    trailing * (the usual search) spans the groups after it."""
    engine = create_engine("sqlite://")
    meta = MetaData()
    t = Table("names", meta, Column("id", Integer, primary_key=True), Column("name", String))
    meta.create_all(engine)
    names = [
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "Yamada^Hanako",
        "Smith^Ann=スミス^アン",
        "Tanaka=Yamada",
    ]
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": i, "name": n} for i, n in enumerate(names, 1)])
    try:
        assert _ids((engine, t), "name", value, Kind.PN) == expected
    finally:
        engine.dispose()
