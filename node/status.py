"""The one place where exceptions become DIMSE statuses, and are logged.

Handlers are thin: they raise the node's exceptions (``core.errors``) and :func:`dimse_service`
turns them into the failure statuses of PS3.4:

=============  ===================  =====================================================
service        exception            status
=============  ===================  =====================================================
C-STORE        any                  the C-STORE column of ``storage/refusals.py``, the
                                    table STOW-RS answers from too (PS3.4 B.2.3)
C-FIND/GET     ClientError          0xA900 Identifier does not match SOP class (C.4.1.1.4)
C-FIND/GET     anything else        0xC001 Unable to process
C-MOVE         ClientError          0xA900
C-MOVE         anything else        0xC001 Unable to process
=============  ===================  =====================================================

A C-MOVE to an AE title that is not one of the spec's ``destinations`` is answered 0xA801 by the
handler itself (pynetdicom sends it when the handler yields no address).

For the query/retrieve generators the status is yielded as the final response once the handler
has yielded what pynetdicom needs first (C-MOVE: destination and count; C-GET: count). What a
client can get wrong there (an identifier without a level or its unique key) is refused before
pynetdicom's service class runs, by the handlers' request screen (0xA900 with an Error Comment and
the Offending Element; :func:`refused_before_handler` logs and counts it). A C-GET that still
fails before its count yields a count of one first, so the peer gets the status of the table
(pynetdicom then counts one failed sub-operation). A C-MOVE that fails before its destination is
logged here and re-raised: pynetdicom then answers its own "unable to process" status (0xC5xx),
still a failure in the range PS3.4 gives.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset

from nnunet_node.core import metrics
from nnunet_node.core.errors import ClientError
from nnunet_node.storage.refusals import refusal_for

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_IO = 0xA701
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS = 0xC001

# Yields a handler makes before pynetdicom accepts a status as the final response.
_PREAMBLE = {"C-ECHO": 0, "C-STORE": 0, "C-FIND": 0, "C-GET": 1, "C-MOVE": 2}


def status_for(service: str, exc: BaseException) -> int:
    """The failure status for ``exc`` raised while serving ``service`` (table above)."""
    if service == "C-STORE":
        return refusal_for(exc).dimse_status
    if isinstance(exc, ClientError):
        return IDENTIFIER_DOES_NOT_MATCH
    return UNABLE_TO_PROCESS


def _final_status(service: str, status: int, exc: BaseException) -> int | Dataset:
    """A C-FIND's final status for ``exc``: with an Error Comment saying what is wrong with
    the request when the requester is at fault (PS3.4 C.4.1.1.4: 0xA900 may carry (0000,0902);
    LO, 64 characters at most), as the C-GET and C-MOVE request screen answers; the bare
    status otherwise (the node's own failures are in its log, not the requester's business).
    pynetdicom's service classes and the node's C-FIND path both take a status Dataset."""
    if service != "C-FIND" or not isinstance(exc, ClientError):
        return status
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = str(exc)[:64]
    return answer


def _log(service: str, status: int | None, exc: BaseException, event: Any) -> None:
    """Log what ``exc`` made of a request; ``status`` None: pynetdicom answers its own."""
    peer = _peer(event)
    expected = refusal_for(exc).expected if service == "C-STORE" else isinstance(exc, ClientError)
    answered = "pynetdicom's unable to process" if status is None else f"0x{status:04X}"
    if expected:
        LOGGER.warning("%s from %s: %s: %s", service, peer, answered, exc)
    else:
        LOGGER.error("%s from %s: %s", service, peer, answered, exc_info=exc)


def _peer(event: Any) -> str:
    try:
        requestor = event.assoc.requestor
        return f"{requestor.ae_title}@{requestor.address}"
    except AttributeError:
        return "?"


def _is_failure(status: Any) -> bool:
    """A failure status of PS3.7 C (0xA000-0xAFFF refused, 0xC000-0xCFFF error)."""
    return isinstance(status, int) and (0xA000 <= status <= 0xAFFF or 0xC000 <= status <= 0xCFFF)


def _is_failure_item(item: Any) -> bool:
    return isinstance(item, tuple) and bool(item) and _is_failure(item[0])


def _measure(service: str, outcome: str, started: float) -> None:
    metrics.dimse_request(service, outcome, time.perf_counter() - started)


def refused_before_handler(service: str, status: int, reason: str, assoc: Any) -> None:
    """Log (a warning, no traceback) and count a ``service`` request answered ``status``
    before its handler ran (node/handlers.py's request screen)."""
    try:
        peer = f"{assoc.requestor.ae_title}@{assoc.requestor.address}"
    except AttributeError:
        peer = "?"
    LOGGER.warning("%s from %s: 0x%04X: %s", service, peer, status, reason)
    metrics.dimse_refused(service)


def dimse_service(service: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an event handler so that what it raises becomes ``service``'s failure status."""

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(handler):

            @functools.wraps(handler)
            def guarded_generator(*args: Any) -> Iterator[Any]:
                event = args[-1]  # handlers may be methods: the event comes last
                yielded = 0
                inner = handler(*args)
                started = time.perf_counter()
                outcome = "success"
                suboperations: Any = None
                try:
                    while True:
                        try:
                            item = next(inner)
                        except StopIteration:
                            suboperations = None
                            return
                        except Exception as exc:
                            outcome = "failure"
                            status = status_for(service, exc)
                            if service == "C-GET" and yielded == 0:
                                # A count first, so that pynetdicom sends this status instead
                                # of its own 0xC413 (it then reports that one sub-operation
                                # as failed: it sets the counts itself).
                                _log(service, status, exc, event)
                                yield 1
                                yield status, None
                                return
                            if yielded < _PREAMBLE[service]:
                                _log(service, None, exc, event)
                                raise
                            _log(service, status, exc, event)
                            yield _final_status(service, status, exc), None
                            return
                        yielded += 1
                        if _is_failure_item(item):
                            outcome = "failure"
                        if service == "C-MOVE" and yielded <= 2:
                            suboperations = item if yielded == 2 else -1
                        yield item
                finally:
                    if suboperations not in (None, 0):
                        # pynetdicom stopped taking the C-MOVE's answers before its end: it
                        # answered 0xA801 (destination unknown, or no association with it).
                        outcome = "failure"
                    _measure(service, outcome, started)

            return guarded_generator

        @functools.wraps(handler)
        def guarded(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                answer = handler(*args)
            except Exception as exc:
                status = status_for(service, exc)
                _log(service, status, exc, args[-1])
                _measure(service, "failure", started)
                return status
            _measure(service, "failure" if _is_failure(answer) else "success", started)
            return answer

        return guarded

    return decorate
