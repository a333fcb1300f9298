"""The one table from exceptions to DIMSE statuses (PS3.4 B.2.3, C.4)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError

from nnunet_node.core.errors import InvalidDicom, InvalidRequest, StorageFull
from nnunet_node.node.status import dimse_service, status_for


@pytest.mark.parametrize(
    ("service", "exc", "status"),
    [
        ("C-STORE", StorageFull("full"), 0xA700),
        ("C-STORE", InvalidDicom("bad"), 0xC000),
        ("C-STORE", OSError("disk"), 0xA701),
        ("C-STORE", OperationalError("SELECT 1", {}, Exception("server closed")), 0xA701),
        ("C-STORE", RuntimeError("bug"), 0xC001),
        ("C-FIND", InvalidRequest("level"), 0xA900),
        ("C-FIND", RuntimeError("bug"), 0xC001),
        ("C-MOVE", InvalidRequest("uid"), 0xA900),
        ("C-GET", RuntimeError("bug"), 0xC001),
    ],
)
def test_status_for(service: str, exc: Exception, status: int) -> None:
    assert status_for(service, exc) == status


EVENT = SimpleNamespace(assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="X", address="h")))


def test_plain_handler_returns_the_status() -> None:
    @dimse_service("C-STORE")
    def handler(event: object) -> int:
        raise StorageFull("below the floor")

    assert handler(EVENT) == 0xA700


def test_generator_handler_ends_with_the_status_after_its_preamble() -> None:
    @dimse_service("C-GET")
    def handler(event: object):  # type: ignore[no-untyped-def]
        yield 2
        yield 0xFF00, "first"
        raise RuntimeError("disk went away")

    assert list(handler(EVENT)) == [2, (0xFF00, "first"), (0xC001, None)]


def test_generator_error_before_the_preamble_is_left_to_pynetdicom() -> None:
    @dimse_service("C-MOVE")
    def handler(event: object):  # type: ignore[no-untyped-def]
        raise InvalidRequest("no level")
        yield

    with pytest.raises(InvalidRequest):
        list(handler(EVENT))


def test_a_c_get_refused_before_its_count_still_gets_the_status() -> None:
    """Raised before the count: a count of one goes first, so pynetdicom sends 0xA900 as the
    final response instead of its own 0xC413 (PS3.4 C.4.3.1.3.1)."""

    @dimse_service("C-GET")
    def handler(event: object):  # type: ignore[no-untyped-def]
        raise InvalidRequest("SeriesInstanceUID is required to retrieve at the SERIES level")
        yield

    assert list(handler(EVENT)) == [1, (0xA900, None)]
