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
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core import metrics
from nnunet_node.core.clock import as_utc, utcnow
from nnunet_node.core.errors import Conflict, NotFound, SendError
from nnunet_node.core.logging import ConnectFailureFilter, install_filter
from nnunet_node.core.tls import client_context
from nnunet_node.pipeline.pynetdicom_internals import RequestingAE
from nnunet_node.pipeline.routing import Destination, RoutingTable
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.models import Dispatch, DispatchStatus, Instance, Job, JobArtifact

LOGGER = logging.getLogger(__name__)
# Every association the node requests reports its own failure (a dispatch attempt's one WARNING,
# a C-MOVE's 0xA801): pynetdicom's two ERROR lines for a refused connection are dropped.
install_filter("pynetdicom.transport", ConnectFailureFilter)

DICOM_ARTIFACT_KINDS = ("dicom_segmentation", "dicom_struct", "dicom_fractional_segmentation")
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
    Storage SCU (PS3.4 B.2), with the presentation contexts of :func:`storage_contexts`.

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
    metas = []
    for path in paths:
        meta = read_file_meta_info(path)
        metas.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
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
    try:
        for message_id, path in enumerate(paths, start=1):
            try:
                status = assoc.send_c_store(path, msg_id=message_id % 65536)
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
        self._sessions = session_factory
        self._routing = routing
        self._archive_dir = archive_dir
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
        """JobService ``on_done`` hook: one pending dispatch per destination of the job's rule."""
        with unit_of_work(self._sessions) as session:
            job = session.get(Job, job_id)
            if job is None or not job.route_name:
                return
            route = self._routing.route(job.route_name)
            if route is None or not route.destinations:
                return
            existing = set(
                session.scalars(select(Dispatch.destination).where(Dispatch.job_id == job_id))
            )
            now = utcnow()
            for name in route.destinations:
                if name not in existing:
                    session.add(
                        Dispatch(
                            job_id=job_id,
                            destination=name,
                            status=DispatchStatus.PENDING,
                            attempts=[],
                            next_attempt_at=now,
                        )
                    )
                    LOGGER.info("job %s: results to be sent to %s", job_id, name)
        self._wake.set()

    def retry(self, dispatch_id: int) -> Dispatch:
        """Send a dispatch again now (its attempt history is kept); a sent one is a conflict."""
        with unit_of_work(self._sessions) as session:
            dispatch = session.get(Dispatch, dispatch_id)
            if dispatch is None:
                raise NotFound(f"dispatch {dispatch_id} does not exist")
            if dispatch.status == DispatchStatus.SENT:
                raise Conflict(f"dispatch {dispatch_id} was sent already")
            dispatch.status = DispatchStatus.PENDING
            dispatch.next_attempt_at = utcnow()
            # A marker: the retried dispatch gets a fresh round of max_attempts.
            dispatch.attempts = [
                *(dispatch.attempts or []),
                {"at": utcnow().isoformat(), "ok": None, "retry": True},
            ]
        LOGGER.info("dispatch %s: retry requested", dispatch_id)
        self._wake.set()
        return dispatch

    # --- sending ---------------------------------------------------------------------------
    def run_due(self) -> int:
        """Attempt every dispatch that is due now; returns how many were attempted."""
        done = 0
        while not self._stop.is_set():
            claimed = self._claim_one()
            if claimed is None:
                return done
            self._attempt(*claimed)
            done += 1
        return done

    def _claim_one(self) -> tuple[int, Destination | None, list[Path]] | None:
        now = utcnow()
        with unit_of_work(self._sessions) as session:
            candidate = session.scalars(
                select(Dispatch)
                .where(Dispatch.status == DispatchStatus.PENDING, Dispatch.next_attempt_at <= now)
                .order_by(Dispatch.next_attempt_at)
                .limit(1)
            ).first()
            if candidate is None:
                return None
            # A lease, so that a second process sharing the database does not send it too.
            claimed = session.execute(
                update(Dispatch)
                .where(
                    Dispatch.id == candidate.id,
                    Dispatch.status == DispatchStatus.PENDING,
                    Dispatch.next_attempt_at == candidate.next_attempt_at,
                )
                .values(next_attempt_at=now + timedelta(seconds=CLAIM_LEASE_S))
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None  # another process took it
            destination = self._routing.destinations.get(candidate.destination)
            files = self._result_files(session, candidate.job_id)
            return candidate.id, destination, files

    def _result_files(self, session: Session, job_id: str) -> list[Path]:
        """The job's DICOM results: its output files, or their archived copies."""
        files: list[Path] = []
        artifacts = session.scalars(
            select(JobArtifact)
            .where(JobArtifact.job_id == job_id, JobArtifact.kind.in_(DICOM_ARTIFACT_KINDS))
            .order_by(JobArtifact.id)
        )
        for artifact in artifacts:
            path = Path(artifact.path)
            if not path.is_file() and artifact.sop_instance_uid:
                archived = session.scalars(
                    select(Instance.path).where(
                        Instance.sop_instance_uid == artifact.sop_instance_uid
                    )
                ).first()
                if archived:
                    path = self._archive_dir / archived
            if path.is_file() and path not in files:
                files.append(path)
        return files

    def _attempt(
        self, dispatch_id: int, destination: Destination | None, files: list[Path]
    ) -> None:
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
        with unit_of_work(self._sessions) as session:
            dispatch = session.get(Dispatch, dispatch_id)
            if dispatch is None:
                return
            attempts = [
                *(dispatch.attempts or []),
                {"at": started.isoformat(), "ok": error is None, "error": error, "sent": sent},
            ]
            dispatch.attempts = attempts
            failures = sum(1 for a in attempts if a.get("ok") is False)
            if error is None:
                dispatch.status = DispatchStatus.SENT
                dispatch.next_attempt_at = None
                LOGGER.info("dispatch %s: %d file(s) sent to %s", dispatch_id, sent, destination)
                return
            limit = destination.max_attempts if destination else 1
            # Count attempts since the last manual retry too: a retried dispatch gets a new round.
            round_failures = _failures_this_round(attempts)
            if destination is None or not files or round_failures >= limit:
                dispatch.status = DispatchStatus.FAILED
                dispatch.next_attempt_at = None
                LOGGER.warning(
                    "dispatch %s to %s: failed after %d attempt(s): %s",
                    dispatch_id,
                    destination.name if destination else dispatch.destination,
                    failures,
                    error,
                )
            else:
                delay = min(
                    destination.retry_delay_s * 2 ** (round_failures - 1), MAX_RETRY_DELAY_S
                )
                dispatch.next_attempt_at = utcnow() + timedelta(seconds=delay)
                LOGGER.warning(
                    "dispatch %s to %s: attempt %d of %d failed: %s; next in %.0f s",
                    dispatch_id,
                    destination.name,
                    round_failures,
                    limit,
                    error,
                    delay,
                )

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
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:
                LOGGER.exception("dispatcher pass failed; trying again")
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        """Sleep until the next due dispatch (at most ``poll_s``)."""
        with self._sessions() as session:
            due = session.scalars(
                select(Dispatch.next_attempt_at)
                .where(Dispatch.status == DispatchStatus.PENDING)
                .order_by(Dispatch.next_attempt_at)
                .limit(1)
            ).first()
        if due is None:
            return self._poll_s
        wait = ((as_utc(due) or utcnow()) - utcnow()).total_seconds()
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
