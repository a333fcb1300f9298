"""Dispatch: send a routed job's DICOM results to the rule's destinations by C-STORE.

Every destination of a job is a :class:`~storage.models.Dispatch` row: ``pending`` until it is sent
or has failed ``max_attempts`` times (``failed``); each attempt is appended to ``attempts`` and the
next one waits ``retry_delay_s`` doubled per failure (``next_attempt_at``). State lives in the
database, so a restart resumes where it stopped, and a failed dispatch can be retried by hand
(:meth:`Dispatcher.retry`). A job stays ``done`` whatever happens to its dispatches.

The C-STORE SCU here (:func:`send_files`) is also what the node uses for its own outgoing
associations; it sets ``TCP_NODELAY`` (:func:`set_tcp_nodelay`), which pynetdicom never does:
without it every small DIMSE message waits ~40 ms for Nagle's algorithm on loopback.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core import metrics
from nnunet_node.core.clock import utcnow
from nnunet_node.core.errors import SendError
from nnunet_node.core.logging import ConnectFailureFilter, LoopFailures, install_filter
from nnunet_node.core.tls import client_context
from nnunet_node.pipeline.pynetdicom_internals import RequestingAE
from nnunet_node.pipeline.routing import Destination, RoutingTable
from nnunet_node.pipeline.stored_send import StoredInstance, send_stored_files
from nnunet_node.storage.dispatches import (
    ClaimedDispatch,
    Decision,
    DispatchStore,
)
from nnunet_node.storage.jobs import DispatchRecord, JobStore
from nnunet_node.storage.models import DispatchStatus

LOGGER = logging.getLogger(__name__)
# Every association the node requests reports its own failure (a dispatch attempt's one WARNING,
# a C-MOVE's 0xA801): pynetdicom's two ERROR lines for a refused connection are dropped.
install_filter("pynetdicom.transport", ConnectFailureFilter)

MAX_RETRY_DELAY_S = 600.0
CLAIM_LEASE_S = 300.0
"""A claimed dispatch is not picked again (by this or another process) for this long."""
DEFAULT_MAX_PDU = 131072


# --- the C-STORE SCU ----------------------------------------------------------------------


def set_tcp_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: turn off Nagle's algorithm on the association's socket.

    Bound on every association the node makes or accepts (both roles): DIMSE sends a command and
    its dataset as separate small writes, and a peer with delayed ACKs holds each for ~40 ms.
    """
    wrapper = event.assoc.dul.socket
    raw = getattr(wrapper, "socket", None)
    if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]


class _RequestorSocket(AssociationSocket):
    """pynetdicom's socket for associations we request, closed when the connection fails
    (pynetdicom 3.0.4 shuts it down and drops it unclosed: a leaked descriptor per failed try)."""

    def connect(self, primitive: Any) -> None:
        raw = self.socket
        super().connect(primitive)
        if self.socket is None and raw is not None:
            raw.close()


class NodeAE(RequestingAE):
    """The AE for every association the node requests or accepts (C-STORE SCU, C-MOVE
    sub-operations, the SCP): outgoing sockets are closed on failure; bind
    :data:`NODELAY_HANDLERS` (or :func:`set_tcp_nodelay`) for ``TCP_NODELAY``."""

    def make_socket(self, assoc: Any, address: Any) -> AssociationSocket:
        return _RequestorSocket(assoc, address=address)


def storage_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """The presentation contexts to send files of these ``(SOP Class UID, Transfer Syntax UID)``.

    One context per SOP class and stored transfer syntax, so that the peer can accept each file
    in the syntax it is stored in and it goes out as it is (an abstract syntax may be proposed in
    several contexts, PS3.8 9.3.2.2; the acceptor picks one syntax per context), plus one per SOP
    class with the uncompressed syntaxes a sender can convert to. Past the 128 contexts an
    association carries (PS3.8 9.3.2.2), one context per SOP class lists them all, the stored
    syntaxes first. Raises SendError for more than 128 SOP classes.
    """
    by_class: dict[str, list[str]] = {}
    for sop_class, syntax in pairs:
        syntaxes = by_class.setdefault(sop_class, [])
        if syntax and syntax not in syntaxes:
            syntaxes.append(syntax)
    fallback: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    contexts = [
        build_context(sop_class, [syntax])
        for sop_class, syntaxes in by_class.items()
        for syntax in syntaxes
    ]
    contexts += [build_context(sop_class, fallback) for sop_class in by_class]
    if len(contexts) <= 128:
        return contexts
    contexts = [
        build_context(sop_class, syntaxes + [ts for ts in fallback if ts not in syntaxes])
        for sop_class, syntaxes in by_class.items()
    ]
    if len(contexts) > 128:
        raise SendError(f"{len(contexts)} SOP classes to send: one association carries 128")
    return contexts


@dataclass
class SendReport:
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    """``"<SOP Instance UID>: <reason>"`` for each instance the peer refused."""


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeout_s: float = 30.0,
    max_pdu: int = DEFAULT_MAX_PDU,
    tls_context: ssl.SSLContext | None = None,
) -> SendReport:
    """C-STORE ``paths`` (DICOM Part 10 files) to ``destination`` over one association, as a
    Storage SCU (PS3.4 B.2), with the presentation contexts of :func:`storage_contexts`. Each
    file's data set goes out as stored when the peer accepted its transfer syntax, converted
    only otherwise (``pipeline/stored_send.py``).

    A destination declared with ``tls: true`` is reached over TLS (PS3.15 B.1) with
    ``tls_context`` (core/tls.py ``client_context``: the peer's certificate is verified and must
    name ``destination.host``); without a context one with the system's CAs is made.

    ``timeout_s`` bounds the association and each response (seconds); ``max_pdu`` is in bytes.
    Raises :class:`SendError` when the association cannot be made, a response does not come, or
    any instance gets a failure status (warnings count as sent, PS3.4 B.2.3).
    """
    report = SendReport()
    if not paths:
        return report
    if destination.port is None:
        raise SendError(f"{destination.name}: no port to send to")
    tls_args = None
    if destination.tls:
        tls_args = (tls_context or client_context(), destination.host)
    instances = []
    for path in paths:
        meta = read_file_meta_info(path)
        instances.append(
            StoredInstance(
                path,
                str(meta.MediaStorageSOPClassUID),
                str(meta.MediaStorageSOPInstanceUID),
                str(meta.TransferSyntaxUID),
            )
        )
    metas = [(i.sop_class_uid, i.transfer_syntax_uid) for i in instances]
    ae = NodeAE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=storage_contexts(metas),
        ae_title=destination.ae_title,
        max_pdu=max_pdu,
        evt_handlers=NODELAY_HANDLERS,
        tls_args=tls_args,
    )
    if not assoc.is_established:
        sock = getattr(assoc.dul, "socket", None)
        raw = getattr(sock, "socket", None)
        connected = raw is not None
        if raw is not None:  # pynetdicom leaves a connection the peer dropped open
            raw.close()
            sock.socket = None  # type: ignore[union-attr]
        if assoc.is_rejected:
            reason = "rejected the association"
        elif tls_args is not None:
            reason = "could not be reached over TLS (down, or the TLS handshake failed)"
        elif connected:
            reason = "closed the connection without answering (does it expect TLS?)"
        else:
            reason = "could not be reached (nothing listens there)"
        raise SendError(f"{where} {reason}")
    send_stored_files(assoc)
    try:
        for message_id, (path, instance) in enumerate(zip(paths, instances, strict=True), 1):
            try:
                status = assoc.send_c_store(instance, msg_id=message_id % 65536)
            except (ValueError, AttributeError) as exc:  # no accepted context for this file
                report.failed.append(f"{path.name}: {exc}")
                continue
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{where}: no response to C-STORE (aborted or timed out)")
            if code == 0x0000 or (code & 0xF000) == 0xB000:  # success or warning (PS3.4 B.2.3)
                report.sent += 1
            else:
                report.failed.append(f"{path.name}: status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    if report.failed:
        raise SendError(f"{where} refused {len(report.failed)} instance(s): {report.failed[:3]}")
    return report


# --- dispatch state -------------------------------------------------------------------------


Sender = Callable[[Destination, Sequence[Path]], SendReport]


class Dispatcher:
    """Creates a job's dispatches when it is done, and sends the due ones in a thread."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        routing: RoutingTable,
        *,
        calling_ae: str,
        archive_dir: Path,
        poll_s: float = 1.0,
        sender: Sender | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._jobs = JobStore(session_factory)
        self._store = DispatchStore(session_factory, archive_dir)
        self._routing = routing
        self._poll_s = poll_s
        self._sender: Sender = sender or (
            lambda dest, paths: send_files(
                dest, paths, calling_ae=calling_ae, tls_context=tls_context
            )
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- hooks and commands ----------------------------------------------------------------
    def on_job_done(self, job_id: str) -> None:
        """The job service's done hook: one pending dispatch per destination of the job's rule."""
        job = self._jobs.find(job_id)
        if job is None or not job.route_name:
            return
        route = self._routing.route(job.route_name)
        if route is None or not route.destinations:
            return
        for name in self._store.add_for_job(job_id, route.destinations):
            LOGGER.info("job %s: results to be sent to %s", job_id, name)
        self._wake.set()

    def retry(self, dispatch_id: int) -> DispatchRecord:
        """Send a dispatch again now (its attempt history is kept); a sent one is a conflict."""
        # A marker: the retried dispatch gets a fresh round of max_attempts.
        record = self._store.retry(
            dispatch_id, {"at": utcnow().isoformat(), "ok": None, "retry": True}
        )
        LOGGER.info("dispatch %s: retry requested", dispatch_id)
        self._wake.set()
        return record

    # --- sending ---------------------------------------------------------------------------
    def run_due(self) -> int:
        """Attempt every dispatch that is due now; returns how many were attempted."""
        done = 0
        while not self._stop.is_set():
            claimed = self._store.claim_due(lease_s=CLAIM_LEASE_S)
            if claimed is None:
                return done
            self._attempt(claimed)
            done += 1
        return done

    def _attempt(self, claimed: ClaimedDispatch) -> None:
        dispatch_id, files = claimed.id, claimed.files
        destination = self._routing.destinations.get(claimed.destination)
        started = utcnow()
        error: str | None = None
        sent = 0
        if destination is None:
            error = "destination no longer in the spec"
        elif not files:
            error = "the job has no DICOM results to send"
        else:
            try:
                sent = self._sender(destination, files).sent
            except Exception as exc:  # every failure is recorded, none stops the thread
                error = str(exc) or type(exc).__name__
        metrics.DISPATCHES.labels(
            destination.name if destination is not None else "unknown",
            "sent" if error is None else "failed",
        ).inc()

        def decide(attempts: list[dict[str, Any]]) -> Decision:
            if error is None:
                LOGGER.info("dispatch %s: %d file(s) sent to %s", dispatch_id, sent, destination)
                return DispatchStatus.SENT, None
            limit = destination.max_attempts if destination else 1
            # Count attempts since the last manual retry too: a retried dispatch gets a new round.
            round_failures = _failures_this_round(attempts)
            if destination is None or not files or round_failures >= limit:
                failures = sum(1 for a in attempts if a.get("ok") is False)
                LOGGER.warning(
                    "dispatch %s to %s: failed after %d attempt(s): %s",
                    dispatch_id,
                    destination.name if destination else claimed.destination,
                    failures,
                    error,
                )
                return DispatchStatus.FAILED, None
            delay = min(destination.retry_delay_s * 2 ** (round_failures - 1), MAX_RETRY_DELAY_S)
            LOGGER.warning(
                "dispatch %s to %s: attempt %d of %d failed: %s; next in %.0f s",
                dispatch_id,
                destination.name,
                round_failures,
                limit,
                error,
                delay,
            )
            return DispatchStatus.PENDING, utcnow() + timedelta(seconds=delay)

        attempt = {"at": started.isoformat(), "ok": error is None, "error": error, "sent": sent}
        self._store.record_attempt(dispatch_id, attempt, decide)

    # --- thread ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        failures = LoopFailures(LOGGER, "dispatcher pass")
        while not self._stop.is_set():
            # The database may be away: whatever fails is retried after poll_s, and the thread
            # never ends but on stop() (its wait, a query too, once ended it for good).
            wait = self._poll_s
            try:
                self.run_due()
                wait = self._next_wait()
            except Exception as exc:
                failures.failed(exc)
            else:
                failures.succeeded()
            self._wake.wait(wait)
            self._wake.clear()

    def _next_wait(self) -> float:
        """Sleep until the next due dispatch (at most ``poll_s``)."""
        due = self._store.next_due()
        if due is None:
            return self._poll_s
        wait = (due - utcnow()).total_seconds()
        return max(0.01, min(self._poll_s, wait))


def _failures_this_round(attempts: list[dict[str, Any]]) -> int:
    """Failures since the last ``retry`` marker (or since the start)."""
    count = 0
    for attempt in reversed(attempts):
        if attempt.get("retry"):
            break
        if attempt.get("ok") is False:
            count += 1
    return count
