"""Logging set-up shared by the server, the DIMSE node and the command line.

One line per event that matters to whoever runs the node (an association, a series complete, a
job's state, a dispatch), at ``NNUNET_NODE_LOG_LEVEL`` (default INFO). Libraries that narrate
their own work at INFO are held at WARNING unless the level is DEBUG: pynetdicom (every PDU),
highdicom (several lines per object written), httpx (every request of ``nnunet-node demo``),
alembic's set-up (the node logs the migration itself), numexpr and uvicorn's access log (every
request, probes and job polling included). Health probes (``/healthz``, ``/readyz``) are never
logged.

``NNUNET_NODE_LOG_FORMAT=json`` writes one JSON object per line (python-json-logger's
``JsonFormatter``: ``time``, ``level``, ``logger``, ``message``, and ``exc_info`` when there is a
traceback) for log collectors; ``text`` (default) writes ``time level logger: message``.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

QUIET_LIBRARIES = (
    "pynetdicom",
    "highdicom",
    "httpx",
    "httpcore",
    "alembic.runtime.plugins",
    "alembic.runtime.migration",
    "numexpr",
    "uvicorn.access",
)
"""Loggers held at WARNING unless the node's level is DEBUG."""

PROBE_PATHS = ("/healthz", "/readyz")

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class ConnectFailureFilter(logging.Filter):
    """Drops pynetdicom's two ERROR lines for an outgoing connection that failed: the node
    reports it itself, once (a dispatch attempt's WARNING, a C-MOVE's 0xA801)."""

    PREFIXES = ("Association request failed: unable to connect", "TCP Initialisation Error")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIXES)


class MoveRefusalFilter(logging.Filter):
    """Drops pynetdicom's ERROR line for a C-MOVE the node refused (an unknown Move Destination,
    0xA801; a destination no association could be made with, 0xA702): the node logs each
    refusal itself, once, as a WARNING naming the destination (a peer's mistake or a PACS that
    is down is no error of the node's)."""

    PREFIXES = ("Unknown Move Destination: ", "Move SCP: Unable to associate with destination AE")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIXES)


_NOT_DICOM_HINTS = {
    0x16: "a TLS handshake: TLS is served only on NNUNET_NODE_DICOM_TLS_PORT, when set",
    **{
        ord(c): "an HTTP request? the HTTP API has its own port (NNUNET_SERVE_PORT)"
        for c in "GPHDOC"
    },
}
"""What the first byte of a connection that sends no DICOM PDU looks like."""


class UnknownPduFilter(logging.Filter):
    """Makes pynetdicom's ERROR "Unknown PDU type received '0x16'" one WARNING per connection
    that says what the bytes look like. pynetdicom logs the line for every 6 bytes a connection
    sends that are no DICOM PDU (PS3.8 9.3: types 0x01-0x07) until it closes: five ERROR lines
    for one TLS ClientHello sent to the plain DICOM port, more for an HTTP request. It is the
    peer's mistake, not the node's, and so is what pynetdicom logs of that connection after it
    (its peer closing or resetting it mid-"PDU": "Connection closed before the entire PDU was
    received", "[Errno 104] Connection reset by peer"), which is dropped. The association's thread
    (pynetdicom's DUL reader, one per connection) carries the mark of a connection reported."""

    PREFIX = "Unknown PDU type received '0x"

    def filter(self, record: logging.LogRecord) -> bool:
        thread = threading.current_thread()
        if getattr(thread, "_nnunet_node_unknown_pdu", False):
            return False
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        thread._nnunet_node_unknown_pdu = True  # type: ignore[attr-defined]
        try:
            first = int(message[len(self.PREFIX) : len(self.PREFIX) + 2], 16)
        except ValueError:
            return True
        hint = _NOT_DICOM_HINTS.get(first)
        record.msg = (
            "a connection sent bytes that are no DICOM PDU (PS3.8 9.3), first 0x%02X%s: aborted"
        )
        record.args = (first, f", {hint}" if hint else "")
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class RequestSetupFilter(logging.Filter):
    """Drops pynetdicom's ERROR lines for an association the node requested (a dispatch, a
    C-MOVE's sub-operations) that ends before it is established: a peer that closes or resets
    the connection at once (one that expects TLS, say) made three ("Connection closed before
    the entire PDU was received", "[Errno 104] Connection reset by peer" with its traceback,
    "Association Aborted"). The node reports that attempt itself, once, saying what it makes
    of it (pipeline/dispatch.py: "closed the connection without answering (does it expect
    TLS?)"; a C-MOVE's 0xA702). The DUL's records come from the requesting association's DUL
    thread (``.assoc``); pynetdicom.acse logs "Association Aborted" at ERROR only there, in
    the requester's negotiation. A rejection's lines, which give the peer's reason, are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pynetdicom.acse":
            return not (
                record.levelno >= logging.ERROR and record.getMessage() == "Association Aborted"
            )
        assoc = getattr(threading.current_thread(), "assoc", None)
        return (
            not getattr(assoc, "is_requestor", False)
            or getattr(assoc, "is_established", True)
            or getattr(assoc, "is_rejected", False)
        )


class UvicornNameFilter(logging.Filter):
    """Names uvicorn's general logger ``uvicorn``: it is called ``uvicorn.error`` and writes
    every start and stop line there (``INFO uvicorn.error: Application startup complete.``),
    which reads as an error to whoever runs the node or collects its logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return True


class ProbeFilter(logging.Filter):
    """Drops uvicorn's access-log records of health probes (orchestrators poll them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3:
            path = str(args[2]).split("?", 1)[0]
            return path not in PROBE_PATHS
        return True


def make_formatter(fmt: LogFormat) -> logging.Formatter:
    """The formatter of the node's one handler (see the module docstring)."""
    if fmt == "json":
        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Send records of every logger to stderr, one line each, at ``level``, in ``fmt``.

    Called again (tests, a second app in one process), it updates the level and format of the
    handler it installed instead of adding another.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_nnunet_node", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._nnunet_node = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(make_formatter(fmt))
    root.setLevel(level.upper())
    quiet = max(logging.WARNING, root.level) if root.level > logging.DEBUG else root.level
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
    install_library_filters()


def install_library_filters() -> None:
    """The filters :func:`configure_logging` puts on library loggers (idempotent): probes out
    of uvicorn's access log, uvicorn's general logger named ``uvicorn``, and pynetdicom's ERROR
    lines that repeat what the node logs (an outgoing connection or association that failed, a
    refused C-MOVE), and its ERROR lines for a connection that sends no DICOM made one WARNING."""
    install_filter("uvicorn.access", ProbeFilter)
    install_filter("uvicorn.error", UvicornNameFilter)
    install_filter("pynetdicom.transport", ConnectFailureFilter)
    install_filter("pynetdicom.service_class", MoveRefusalFilter)
    install_filter("pynetdicom.dul", UnknownPduFilter)
    install_filter("pynetdicom.dul", RequestSetupFilter)
    install_filter("pynetdicom.acse", RequestSetupFilter)


def install_filter(logger_name: str, kind: type[logging.Filter]) -> None:
    """Add a ``kind`` filter to a logger once (idempotent)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


class LoopFailures:
    """The log of a background loop that retries what failed (a database that went away): the
    first failure of a run of them is logged with its traceback (ERROR), the next ones only as
    a one-line reminder once every ``remind_s`` seconds, and the first pass that works again
    says so (INFO) with how many passes failed. A database that stays down for an hour then
    costs about 60 lines per loop instead of a traceback every second.

    ``what`` names the loop in each line (``"dispatcher pass"``). Thread-safe for one loop
    thread; several threads of one loop share it under its lock."""

    def __init__(self, logger: logging.Logger, what: str, *, remind_s: float = 60.0) -> None:
        self._logger = logger
        self._what = what
        self._remind_s = remind_s
        self._lock = threading.Lock()
        self._failed = 0
        self._reminded_at = 0.0

    def failed(self, exc: BaseException) -> None:
        """Record a failed pass (call from the ``except`` block)."""
        import time

        now = time.monotonic()
        with self._lock:
            self._failed += 1
            first = self._failed == 1
            remind = not first and now - self._reminded_at >= self._remind_s
            if first or remind:
                self._reminded_at = now
            count = self._failed
        if first:
            self._logger.error("%s failed; trying again", self._what, exc_info=exc)
        elif remind:
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            self._logger.error("%s still failing (%d passes so far): %s", self._what, count, reason)

    def succeeded(self) -> None:
        """Record a pass that worked: ends a run of failures (one INFO line)."""
        with self._lock:
            count, self._failed = self._failed, 0
        if count:
            self._logger.info("%s works again after %d failed pass(es)", self._what, count)
