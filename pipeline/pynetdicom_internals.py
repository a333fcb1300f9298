"""Every use of pynetdicom's private internals in the node, in one place (pynetdicom 3.0.x).

pynetdicom has no public API for what the node needs on its hot paths (streaming a received
dataset to disk, sending a stored file without decoding it, associations that wait on events
instead of polling), so the node reaches into its internals here and nowhere else.
``tests/pipeline/test_pynetdicom_internals.py`` checks every name and shape used below against
the installed pynetdicom and fails loudly when a release changes one; nothing here falls back
silently. ``pyproject.toml`` pins pynetdicom below 3.1 so that such a release is a deliberate
upgrade. Each hook says which public API would replace it.

Hooks (the "Public replacement" line of each docstring names what would retire it):

- :class:`RequestingAE` overrides ``AE._create_socket`` (the socket of an association we
  request) and :class:`AcceptingHandler` overrides ``RequestHandler._create_association`` (the
  association of a connection we accepted): the places where a socket or an association can be
  changed before it starts.
- :func:`make_event_driven`: the DUL's primitive queue (``DULServiceProvider.to_provider_queue``),
  its poll delay (``_run_loop_delay``), its socket's class (``AssociationSocket.ready``, ``send``,
  ``recv``), ``stop_dul``, and the DIMSE queue look-up (``DIMSEServiceProvider.get_msg``,
  ``msg_queue``).
- An accepted association drives its DUL in its own thread (:func:`_drive_inline`, one turn of
  the DUL's loop in :func:`_pump`: ``_process_recv_primitive``, ``_is_transport_event``,
  ``event_queue``, ``state_machine``, ``artim_timer``, ``_idle_timer``, ``_kill_thread``,
  ``fsm.TRANSITION_TABLE`` to drop an A-ABORT request the state machine has no action for), the
  DUL thread never started (``Association._started_dul`` / ``_dul_ready``), and its reactor is
  :func:`_serve_until_ended` (``Association._run_reactor``); :func:`cancel_requested` reads a
  C-CANCEL while a handler runs.
- :func:`check_before_negotiation`: the acceptor's negotiation (``ACSE._negotiate_as_acceptor``)
  wrapped so that the calling AE is checked first (node/access.py).
- The server's per-connection handler caches its local address (``RequestHandler.local``).
- pynetdicom's request identifier logging (``_config.LOG_REQUEST_IDENTIFIERS``).
- P-DATA written straight to the socket (:func:`send_pdata_direct`) while the state machine is
  in Sta6 (``StateMachine.current_state``), bypassing the DUL thread.
- C-STORE streaming: ``DIMSEServiceProvider.message`` / ``receive_primitive`` and the chunked
  receive mode's ``DIMSEMessage._data_set_file`` / ``_data_set_path``; the command set's UIDs
  judged on its raw elements before pynetdicom reads them (:func:`refuse_invalid_command_uids`).
- Sending a file as stored: the chunked send mode's ``C_STORE._dataset_path`` and the reactor
  pause (``Association._reactor_checkpoint`` / ``_is_paused``), ``_check_received_status``;
  its C-STORE-RSP decoded directly (:func:`decode_store_responses`).
- Requests refused before the service class runs (:func:`screen_requests`):
  ``Association._serve_request``.
- A C-MOVE whose destination could not be associated with (:func:`on_move_association_failed`):
  the final 0xA801 that ``QueryRetrieveServiceClass._move_scp`` sends then, caught in the
  requesting association's ``DIMSEServiceProvider.send_msg``.
- C-FIND answered with identifiers the node encodes (:func:`serve_find_requests`):
  ``Association._serve_request``, ``_accepted_cx``, ``_sent_release``, ``_is_paused``,
  ``DIMSEServiceProvider.cancel_req``; its requests decoded directly
  (:func:`decode_find_requests`): ``DIMSEServiceProvider.receive_primitive``, ``message``,
  ``msg_queue``.
- The standard log handlers of ``pynetdicom._handlers``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_FIND, C_MOVE, C_STORE
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from nnunet_node.core.errors import shown_value
from nnunet_node.storage.headers import is_valid_uid

LOGGER = logging.getLogger(__name__)

DUL_WAIT_S = 0.05
"""Longest the DUL thread waits for data or a primitive before its timers are checked again."""
MESSAGE_WAIT_S = 0.02
"""Longest the association thread waits for a DIMSE message before checking release/abort."""
UNLIMITED_PDV = 1 << 20
"""Fragment size when the peer set no maximum PDU length (0: unlimited, PS3.8 D.1)."""


# --- where sockets and associations can be changed before they start -----------------------


class RequestingAE(AE):
    """An AE whose requested associations get their socket from :meth:`make_socket`.

    Hook: ``AE._create_socket(assoc, address, tls_args)``, called by ``AE.associate`` before
    the connection is made. Public replacement: a socket factory argument to ``associate``.
    """

    def make_socket(self, assoc: Any, address: Any) -> AssociationSocket:
        """The socket for ``assoc`` (not yet connected); pynetdicom's by default."""
        return AssociationSocket(assoc, address=address)

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> AssociationSocket:
        sock = self.make_socket(assoc, address)
        sock.tls_args = tls_args
        return sock


class AcceptingHandler(RequestHandler):
    """The server's per-connection handler: pynetdicom's, except that every association shares
    the server's supported presentation contexts instead of deep-copying all of them (about
    150 storage SOP classes in 13 transfer syntaxes: ~10 ms of CPU per association, more than
    a whole C-ECHO); negotiation only reads them. Each accepted association then goes, before
    it starts, to the AE's ``on_accepted(assoc)`` when it has one.

    Hook: ``RequestHandler._create_association`` (what it does is repeated here, less the
    copy; ``Association._server``, ``AssociationServer._handlers``). Public replacement: an
    association factory on the server, or ``EVT_CONN_OPEN`` firing before the thread starts.
    """

    def _create_association(self) -> Any:
        assoc = Association(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        server: Any = self.server
        local = getattr(server, "_node_local_address", None)
        if local is None:  # resolved once per server (getaddrinfo), not per association
            local = server._node_local_address = self.local
        acceptor.address_info = copy.copy(local)
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        registered: dict[Any, Any] = self.server._handlers
        for event, handlers in registered.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])
        on_accepted = getattr(self.ae, "on_accepted", None)
        if on_accepted is not None:
            on_accepted(assoc)
        return assoc


def check_before_negotiation(assoc: Any, check: Callable[[], bool]) -> None:
    """Call ``check()`` on an accepted association once its A-ASSOCIATE-RQ is in and before its
    presentation contexts are negotiated (PS3.8 7.1.1: the acceptor may reject on the calling AE
    title). ``check`` may narrow ``assoc.acceptor.supported_contexts``; when it returns False it
    has rejected the association itself (``assoc.acse.send_reject``, ``assoc.kill``) and nothing
    is negotiated.

    Hook: ``ACSE._negotiate_as_acceptor`` (wrapped). Public replacement: an intervention event
    fired per association before negotiation (pynetdicom's ``AE.require_calling_aet`` only
    compares a fixed list of titles and cannot narrow the contexts per peer).
    """
    acse = assoc.acse
    negotiate = acse._negotiate_as_acceptor

    def checked() -> None:
        if check():
            negotiate()

    acse._negotiate_as_acceptor = checked


# --- event-driven associations --------------------------------------------------------------


class EventDrivenSocket(AssociationSocket):
    """The association's socket: ``ready`` blocks until the peer sent data or a primitive was
    queued (or :data:`DUL_WAIT_S`); every write holds one lock, so the DUL thread and
    :func:`send_pdata_direct` never interleave PDUs; ``recv`` reads a PDU in one piece.

    Hooks: ``AssociationSocket.ready`` (polled by the DUL, ``socket``, ``event_queue``,
    ``_is_connected``), ``send`` and ``recv`` (called by the DUL with whole PDUs). Public
    replacement: a selector-based DUL in pynetdicom.
    """

    _wake_r: socket.socket
    _wake_w: socket.socket
    _send_lock: threading.Lock
    _wait_s: float = DUL_WAIT_S
    """How long ``ready`` waits (an inline DUL's caller sets its own, :func:`_pump`)."""

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            with contextlib.suppress(OSError, ValueError):  # nothing to read: wait for a primitive
                if select.select([self._wake_r], [], [], self._wait_s)[0]:
                    self._wake_r.recv(4096)
            return False
        # A TLS socket may hold decrypted bytes that select() cannot see (pynetdicom #528).
        pending = getattr(self.socket, "pending", None)
        buffered = bool(pending and pending())
        timeout = 0.0 if buffered or not self.event_queue.empty() else self._wait_s
        try:
            readable, _, _ = select.select([self.socket, self._wake_r], [], [], timeout)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # Transport connection closed (PS3.8 9.2)
            return False
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        return buffered or self.socket in readable

    def send(self, bytestream: bytes) -> None:
        with self._send_lock:
            super().send(bytestream)

    def send_whole(self, data: bytes | bytearray) -> bool:
        """Write ``data`` (whole PDUs) under the write lock; False, and Evt17 queued for the
        state machine, when the connection failed (as ``AssociationSocket.send`` does)."""
        with self._send_lock:
            raw = self.socket
            try:
                if raw is None:
                    raise OSError("the association's socket is closed")
                raw.sendall(data)
            except (OSError, TimeoutError):
                self.event_queue.put("Evt17")
                return False
        return True

    def send_gather(self, buffers: list[Any]) -> bool:
        """Write ``buffers`` (whole PDUs, in pieces) with as few ``sendmsg`` calls as the
        kernel allows, under the write lock; False, and Evt17 queued, when the connection
        failed."""
        with self._send_lock:
            raw = self.socket
            try:
                if raw is None:
                    raise OSError("the association's socket is closed")
                _sendmsg_all(raw, buffers)
            except (OSError, TimeoutError):
                self.event_queue.put("Evt17")
                return False
        return True

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer when the peer closes), filling one buffer in place rather
        than pynetdicom's 4 KiB pieces appended one by one."""
        raw = self.socket
        assert raw is not None
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            while got < nr_bytes:
                n = raw.recv_into(view[got:], nr_bytes - got)
                if not n:
                    break
                got += n
        if got < nr_bytes:
            del buffer[got:]
        return buffer


_IOV_MAX = 512
"""Buffers per ``sendmsg`` call (Linux allows 1024)."""


def _sendmsg_all(raw: socket.socket, buffers: list[Any]) -> None:
    """``sendall`` for a gathered write: every byte of ``buffers`` (bytes or memoryviews), in
    order, however many calls that takes. Raises OSError as ``sendmsg`` does."""
    views = [memoryview(b).cast("B") for b in buffers]
    start = 0
    while start < len(views):
        sent = raw.sendmsg(views[start : start + _IOV_MAX])
        while start < len(views) and sent >= len(views[start]):
            sent -= len(views[start])
            start += 1
        if sent:
            views[start] = views[start][sent:]


class _WakingQueue(queue.Queue[Any]):
    """The DUL's outgoing-primitive queue: a P-DATA goes straight to the socket when it can
    (:func:`send_pdata_direct`), anything else is queued and wakes the DUL thread. With an
    inline DUL (``flush`` set), what the association's own thread queues is sent at once."""

    def __init__(self, assoc: Any, wake: socket.socket) -> None:
        super().__init__()
        self._assoc = assoc
        self._wake = wake
        self.flush: Callable[[], None] | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if type(item) is P_DATA and send_pdata_direct(self._assoc, item):
            return
        super().put(item, block, timeout)
        if self.flush is not None and threading.current_thread() is self._assoc:
            self.flush()
            return
        with contextlib.suppress(OSError):
            self._wake.send(b"\0")


_WAKE = tuple([None, None])
"""Put on the DIMSE message queue to wake the association thread (compared by identity)."""


class _NotifyingQueue(queue.Queue[Any]):
    """The DUL's queue of primitives for the association (A-RELEASE, A-ABORT...): each ``put``
    also wakes the association thread waiting on the DIMSE message queue, so a release is
    answered at once rather than after MESSAGE_WAIT_S."""

    def __init__(self, messages: queue.Queue[Any]) -> None:
        super().__init__()
        self._messages = messages

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._messages.put(_WAKE)


def _event_driven_class(cls: type[AssociationSocket]) -> type[AssociationSocket]:
    if issubclass(cls, EventDrivenSocket):
        return cls
    if cls is AssociationSocket:
        return EventDrivenSocket
    return type(f"EventDriven{cls.__name__}", (EventDrivenSocket, cls), {})


def make_event_driven(
    assoc: Any,
    sock: AssociationSocket | None = None,
    *,
    keep_thread: Callable[[Any], bool] | None = None,
) -> Callable[[], None]:
    """Make ``assoc`` (accepted or requested, not yet started) wait on events instead of
    polling: the DUL sleeps in ``select`` on the socket and on a wake-up pipe that every
    queued primitive writes to (so ``_run_loop_delay`` is 0), and P-DATA are written by the
    thread that sends them (:func:`send_pdata_direct`). A requested association keeps its DUL
    thread; an accepted one has none: its own thread drives the DUL (:func:`_drive_inline`),
    unless ``keep_thread(assoc)`` says, once negotiation is over, that this association is
    better served with one (the DUL thread then starts: reading the next PDUs, and finishing
    what a received data set's sink does on its last fragment, overlap the handler's work).
    ``sock`` is the association's socket when it is not yet set on it (a requested one, from
    :meth:`RequestingAE.make_socket`). Returns what closes the wake-up pipe once the
    association has ended."""
    dul = assoc.dul
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    dul.to_provider_queue = _WakingQueue(assoc, wake_w)
    dul._run_loop_delay = 0
    target: Any = sock if sock is not None else dul.socket
    target.__class__ = _event_driven_class(type(target))
    target._wake_r = wake_r
    target._wake_w = wake_w
    target._send_lock = threading.Lock()

    def stop_dul() -> bool:
        """``DULServiceProvider.stop_dul`` without its busy wait: once the state machine is
        idle (Sta1) the DUL thread is woken from ``select`` and joined."""
        if dul.state_machine.current_state != "Sta1":
            return False
        dul._kill_thread = True
        if threading.current_thread() is not dul:
            with contextlib.suppress(OSError):
                wake_w.send(b"\0")
            dul.join()
        return True

    if not assoc.is_acceptor:
        dul.stop_dul = stop_dul
        done = threading.Event()
    else:
        dimse = assoc.dimse

        def threaded_get_msg(block: bool = False) -> Any:
            """The next DIMSE message from the DUL thread; without ``block``, (None, None) as
            soon as the DUL handed the association a primitive (release, abort) or after
            MESSAGE_WAIT_S."""
            if not block:
                try:
                    item = dimse.msg_queue.get(block=True, timeout=MESSAGE_WAIT_S)
                except queue.Empty:
                    return None, None
                return (None, None) if item is _WAKE else item
            timeout = dimse.dimse_timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = dimse.msg_queue.get(block=True, timeout=remaining)
                except queue.Empty:
                    return None, None
                if item is not _WAKE:
                    return item

        done = _drive_inline(assoc, target)

        def hand_over() -> None:
            """From here on the DUL runs in a thread of its own, as pynetdicom runs it."""
            inline = dul.to_user_queue
            threaded = _NotifyingQueue(dimse.msg_queue)
            for item in list(inline.queue):
                queue.Queue.put(threaded, item)
            dul.to_user_queue = threaded
            dul.to_provider_queue.flush = None
            del dul.is_alive  # the thread's own again
            dul.stop_dul = stop_dul
            dimse.get_msg = threaded_get_msg
            dul.start()

        def run_reactor() -> None:
            if keep_thread is not None and not dul._kill_thread and keep_thread(assoc):
                hand_over()
                _serve_until_ended(assoc)
            else:
                _serve_until_ended(assoc, inline=True)

        assoc._run_reactor = run_reactor

    def close() -> None:
        done.set()
        for end in (wake_r, wake_w):
            end.close()

    return close


def _pump(dul: Any, sock: EventDrivenSocket, timeout: float) -> bool:
    """One turn of the DUL, as ``DULServiceProvider.run_reactor`` makes in each pass, in the
    calling thread: a queued primitive becomes its event, or else a PDU that arrives within
    ``timeout`` is read and decoded into one; then the state machine acts on every queued event
    (PS3.8 9.2). Returns False once the DUL has ended (``_kill_thread``: the connection closed,
    or was aborted)."""
    if dul._kill_thread:
        return False
    if dul.artim_timer.expired:
        dul.event_queue.put("Evt18")  # ARTIM timer expired (PS3.8 9.2)
    sock._wait_s = timeout
    try:
        if not dul._process_recv_primitive() and dul._is_transport_event():
            dul._idle_timer.restart()
    finally:
        sock._wait_s = DUL_WAIT_S
    while not dul._kill_thread:
        try:
            event = dul.event_queue.get(block=False)
        except queue.Empty:
            break
        if event == "Evt15" and (event, state := dul.state_machine.current_state) not in (
            TRANSITION_TABLE
        ):
            # an A-ABORT asked for (the node stopping) where PS3.8 Table 9-10 has no action:
            # Sta2 (no A-ASSOCIATE-RQ yet) and Sta13 (an A-ASSOCIATE-RJ or A-RELEASE-RP sent,
            # awaiting the close), where no A-ABORT PDU may be sent; close the connection as
            # an expired ARTIM timer does there (AA-2, the action of Sta4 + Evt15). pynetdicom
            # raised InvalidEventError in this thread, seen as a reject was being sent
            if state == "Sta1":
                continue
            LOGGER.debug("A-ABORT request in %s: the connection is closed", state)
            event = "Evt18"
        dul.state_machine.do_action(event)
    return not dul._kill_thread


class _PumpedQueue(queue.Queue[Any]):
    """An inline DUL's queue of primitives for the association (A-ASSOCIATE, A-RELEASE,
    A-ABORT...): a blocking ``get`` drives the DUL in the calling thread until an item arrives;
    each ``put`` also wakes a look at the DIMSE queue (as :class:`_NotifyingQueue`)."""

    def __init__(self, messages: queue.Queue[Any], pump: Callable[[float], bool]) -> None:
        super().__init__()
        self._messages = messages
        self._pump = pump

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._messages.put(_WAKE)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with contextlib.suppress(queue.Empty):
                return super().get(block=False)
            remaining = DUL_WAIT_S if deadline is None else deadline - time.monotonic()
            if not block or remaining <= 0 or not self._pump(min(remaining, DUL_WAIT_S)):
                return super().get(block=False)  # queue.Empty when nothing came


def _drive_inline(assoc: Any, sock: EventDrivenSocket) -> threading.Event:
    """Run an accepted association's DUL in the association's own thread instead of a thread
    of its own: whenever that thread waits for a primitive (``dul.receive_pdu``) or a DIMSE
    message (``dimse.get_msg``) it reads, decodes and acts on PDUs itself (:func:`_pump`), and
    what it queues for the peer is sent at once. A request then reaches its handler, and the
    A-ASSOCIATE-AC and A-RELEASE-RP their peer, without a hand-over between threads (each one
    costs 0.1-1 ms of scheduling, more on a busy machine), and the association starts one
    thread instead of two. Other threads (an abort at shutdown) queue their primitives and
    wake it. Returns the event that says the association's thread has finished with the DUL.

    Hooks: ``Association._started_dul`` / ``_dul_ready`` (the DUL thread is never started),
    ``DULServiceProvider.to_user_queue``, ``to_provider_queue``, ``event_queue``,
    ``state_machine`` and ``fsm.TRANSITION_TABLE``, ``artim_timer``, ``_idle_timer``,
    ``_kill_thread``, ``_process_recv_primitive``, ``_is_transport_event``, ``is_alive``
    and ``stop_dul`` (called by ``Association.kill``), ``DIMSEServiceProvider.get_msg`` /
    ``msg_queue``, and :func:`_serve_until_ended` as the reactor. Public replacement: a DUL
    that can be driven by its caller (a selector-based transport in pynetdicom)."""
    dul, dimse = assoc.dul, assoc.dimse
    done = threading.Event()

    def pump(timeout: float) -> bool:
        return _pump(dul, sock, timeout)

    def flush() -> None:
        while dul.to_provider_queue.qsize() and pump(0.0):
            pass

    dul.to_user_queue = _PumpedQueue(dimse.msg_queue, pump)
    dul.to_provider_queue.flush = flush
    assoc._started_dul = True  # Association.run_reactor must not start the DUL thread
    assoc._dul_ready.set()
    dul.is_alive = lambda: not done.is_set()

    def stop_dul() -> bool:
        """``DULServiceProvider.stop_dul``: True once the state machine is idle (Sta1); the
        association's own thread drives it there meanwhile, any other waits for it."""
        if dul.state_machine.current_state != "Sta1" and not done.is_set():
            if threading.current_thread() is not assoc:
                return False
            pump(DUL_WAIT_S)
            if dul.state_machine.current_state != "Sta1":
                return False
        dul._kill_thread = True
        return True

    dul.stop_dul = stop_dul

    def get_msg(block: bool = False) -> Any:
        """The next DIMSE message, driving the DUL until one is decoded; without ``block``,
        (None, None) as soon as the DUL handed the association a primitive (release, abort)
        or after MESSAGE_WAIT_S; with it, after the DIMSE timeout or once the DUL ended."""
        timeout = MESSAGE_WAIT_S if not block else dimse.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = dimse.msg_queue.get(block=False)
            except queue.Empty:
                item = None
            if item is _WAKE:
                if not block:
                    return None, None
                continue
            if item is not None:
                return item
            remaining = DUL_WAIT_S if deadline is None else deadline - time.monotonic()
            if remaining <= 0 or not pump(min(remaining, DUL_WAIT_S)):
                if dimse.msg_queue.qsize():
                    continue
                return None, None

    dimse.get_msg = get_msg
    return done


def cancel_requested(event: Any) -> bool:
    """``event.is_cancelled`` (a C-CANCEL for the request being served, PS3.7 9.3.2.3) after
    reading what the peer sent meanwhile: an accepted association's thread, busy in the
    handler, is also the one that reads (:func:`_drive_inline`). Hook: the DUL driven inline.
    Public replacement: none needed with a DUL thread."""
    assoc = event.assoc
    dul = assoc.dul
    if threading.current_thread() is assoc and isinstance(dul.socket, EventDrivenSocket):
        _pump(dul, dul.socket, 0.0)
    return bool(event.is_cancelled)


_ASSOC_LOGGER = logging.getLogger("pynetdicom.assoc")


def _serve_until_ended(assoc: Any, *, inline: bool = False) -> None:
    """An accepted association's reactor (replaces ``Association._run_reactor``): serve each
    DIMSE request as soon as the DUL has decoded it, and end on the peer's A-RELEASE-RQ (answered
    at once, PS3.8 7.2), an A-ABORT / A-P-ABORT, a DUL that stopped, or the network idle timeout.
    pynetdicom's reactor sleeps 1 ms before every look at its queues, so a request or a release
    arriving just after the previous one waited for that sleep; this one blocks on the DIMSE
    queue, which the DUL's primitives wake (:class:`_NotifyingQueue`). ``_reactor_checkpoint``
    still pauses it (C-GET and C-MOVE sub-operations exchange messages outside it). With the
    DUL driven ``inline`` (:func:`_drive_inline`) its end is also the DUL's.

    Hooks: ``Association._run_reactor``, ``_kill``, ``_reactor_checkpoint``, ``_is_paused``,
    ``_serve_request``, ``acse.is_release_requested`` / ``is_aborted``, ``dul.is_alive``,
    ``dul.idle_timer_expired``. Public replacement: an event-driven reactor in pynetdicom."""
    dimse, acse, dul = assoc.dimse, assoc.acse, assoc.dul
    if inline:
        dul._idle_timer.restart()  # the DUL thread would have started it
    while not assoc._kill:
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        context_id, message = dimse.get_msg(block=False)
        if message is not None:
            assoc._serve_request(message, context_id)
        if assoc.is_established and acse.is_release_requested():
            acse.send_release(is_response=True)
            _ASSOC_LOGGER.info("Association Released")
            assoc.is_released, assoc.is_established = True, False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            break
        if acse.is_aborted():
            _ASSOC_LOGGER.info("Association Aborted")
            dul.receive_pdu(wait=False)  # takes the abort primitive (EVT_ACSE_RECV fires)
            assoc.is_aborted, assoc.is_established = True, False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            break
        if not dul.is_alive() or (inline and dul._kill_thread):
            break
        if dul.idle_timer_expired():
            _ASSOC_LOGGER.error("Network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True  # release() waits for the reactor to pause
                assoc.release()
            else:
                assoc.abort()
            break
    else:
        # killed from elsewhere (an abort), whose thread waits for the DUL to end (Sta1)
        deadline = time.monotonic() + 1.0
        while inline and dul.state_machine.current_state != "Sta1" and time.monotonic() < deadline:
            if not _pump(dul, dul.socket, DUL_WAIT_S):
                break
        return
    assoc.kill()


def after_run(assoc: Any, finish: Callable[[], None]) -> None:
    """Call ``finish`` in the association's thread once its run ends (normally or not).
    Hook: ``Association.run``. Public replacement: an event fired when the thread ends
    (``EVT_RELEASED``/``EVT_ABORTED`` do not fire when the connection just drops)."""
    run = assoc.run

    def run_then_finish() -> None:
        try:
            run()
        finally:
            finish()

    assoc.run = run_then_finish


def _direct_ok(assoc: Any) -> EventDrivenSocket | None:
    """The socket to write P-DATA to from this thread, or None to queue them for the DUL:
    only over plain TCP, in Sta6 (data transfer, PS3.8 9.2), with nothing queued before them, and
    with no handler bound to the send notifications that the DUL thread would have fired."""
    dul = assoc.dul
    sock = dul.socket
    if (
        not isinstance(sock, EventDrivenSocket)
        # A TLS connection is one OpenSSL object, not to be written by one thread while the
        # DUL thread reads it: its P-DATA go through the DUL thread.
        or isinstance(sock.socket, ssl.SSLSocket)
        or dul.state_machine.current_state != "Sta6"
        or not dul.to_provider_queue.empty()
        or assoc.get_handlers(evt.EVT_PDU_SENT)
        or assoc.get_handlers(evt.EVT_DATA_SENT)
    ):
        return None
    return sock


def send_pdata_direct(assoc: Any, primitive: Any) -> bool:
    """Write the P-DATA-TF PDU of ``primitive`` (PS3.8 9.3.5) to the socket now, from the
    calling thread; False when it must go through the DUL instead (:func:`_direct_ok`).
    The DUL thread never originates P-DATA, so writing them here keeps their order; the
    socket's lock keeps them whole beside the DUL's own PDUs. Hook: the DUL's state machine
    and queue. Public replacement: none (the DUL owns the socket)."""
    sock = _direct_ok(assoc)
    if sock is None:
        return False
    pdvs = primitive.presentation_data_value_list
    body = b"".join(struct.pack(">IB", len(data) + 1, cx) + data for cx, data in pdvs)
    sock.send_whole(struct.pack(">BBI", 0x04, 0x00, len(body)) + body)
    return True


def _pdv_pdus(context_id: int, control: int, data: bytes, fragment: int) -> Iterator[bytes]:
    """``data`` as P-DATA-TF PDUs of one PDV each, at most ``fragment`` bytes of data per PDV;
    ``control`` is the Message Control Header of the last fragment (PS3.8 E.2)."""
    for start in range(0, max(len(data), 1), fragment):
        chunk = data[start : start + fragment]
        last = start + fragment >= len(data)
        header = (control if last else control & 0x01).to_bytes(1, "little")
        yield struct.pack(">BBIIB", 0x04, 0x00, len(chunk) + 6, len(chunk) + 2, context_id) + (
            header + chunk
        )


SEND_BATCH = 4 << 20
"""Most bytes of a data set read and written in one gathered write."""

DataSetOffset = int | Callable[[BinaryIO], int]
"""Where a file's data set starts: a byte offset, or what finds it in the open file."""


def send_message_from_file(
    assoc: Any, context_id: int, command: bytes, path: Path | str, offset: DataSetOffset
) -> bool:
    """Write one DIMSE message whose command set is ``command`` (encoded) and whose data set is
    the bytes of ``path`` from ``offset`` to the end, as P-DATA-TF PDUs of one PDV each, sized
    for the peer (PS3.8 9.3.5, E.2), from the calling thread: the file is read in batches of up
    to :data:`SEND_BATCH` bytes and each batch goes out with its PDU headers in one gathered
    write (``sendmsg``), the command's PDUs with the first. False when it must go through the
    DUL instead (nothing is sent then). Raises OSError when the file cannot be read or changed
    while it was sent, ValueError from an ``offset`` callable."""
    sock = _direct_ok(assoc)
    if sock is None:
        return False
    max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
    fragment = max_pdu - 6 if max_pdu else UNLIMITED_PDV
    with open(path, "rb", buffering=0) as fh:
        start = offset if isinstance(offset, int) else offset(fh)
        remaining = os.fstat(fh.fileno()).st_size - start
        fh.seek(start)
        pieces: list[Any] = list(_pdv_pdus(context_id, 0x03, command, fragment))
        batch_size = max(fragment, SEND_BATCH - SEND_BATCH % fragment)
        while True:
            size = min(batch_size, remaining)
            remaining -= size
            batch = bytearray(size)
            view = memoryview(batch)
            got = 0
            while got < size:
                n = fh.readinto(view[got:])
                if not n:
                    raise OSError(f"{path} changed while it was being sent")
                got += n
            for at in range(0, max(size, 1), fragment):
                n = min(fragment, size - at)
                last = not remaining and at + n >= size
                pieces.append(
                    struct.pack(">BBIIBB", 0x04, 0x00, n + 6, n + 2, context_id, 2 if last else 0)
                )
                pieces.append(view[at : at + n])
            if not sock.send_gather(pieces) or not remaining:
                return True  # on failure the state machine has Evt17; the caller sees no answer
            pieces = []


# --- command sets encoded directly ----------------------------------------------------------


def _element(element: int, value: bytes) -> bytes:
    """One command element, Implicit VR Little Endian (PS3.5 7.1.3), group 0000."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _ui(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def _ae(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b" " if len(data) % 2 else data


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set from ``(element, encoded value)`` pairs in ascending order, with its
    Command Group Length (0000,0000) (PS3.7 6.3, E.1)."""
    body = b"".join(_element(element, value) for element, value in elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_store_request(
    sop_class_uid: str,
    sop_instance_uid: str,
    message_id: int,
    priority: int,
    move_originator_aet: str | None = None,
    move_originator_id: int | None = None,
) -> bytes:
    """The command set of a C-STORE-RQ with a data set (PS3.7 9.3.1.1), as pynetdicom encodes
    it. Raises UnicodeEncodeError for a value that is not ASCII."""
    elements = [
        (0x0002, _ui(sop_class_uid)),  # Affected SOP Class UID
        (0x0100, _us(0x0001)),  # Command Field: C-STORE-RQ
        (0x0110, _us(message_id)),  # Message ID
        (0x0700, _us(priority)),  # Priority
        (0x0800, _us(0x0001)),  # Command Data Set Type: present
        (0x1000, _ui(sop_instance_uid)),  # Affected SOP Instance UID
    ]
    if move_originator_aet:
        elements.append((0x1030, _ae(move_originator_aet)))
    if move_originator_id is not None:
        elements.append((0x1031, _us(move_originator_id)))
    return command_set(elements)


# --- sending a stored file as it is ---------------------------------------------------------


def send_c_store_from_file(
    assoc: Any,
    context_id: int,
    path: Path | str,
    offset: DataSetOffset,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    message_id: int,
    priority: int = 2,
    move_originator_aet: str | None = None,
    move_originator_id: int | None = None,
) -> Dataset:
    """Send a C-STORE-RQ whose data set is the bytes of ``path`` from ``offset`` to the end
    (already encoded in the transfer syntax of presentation context ``context_id``; ``offset``
    may be what finds it in the open file, :data:`DataSetOffset`), and wait for
    the C-STORE-RSP; returns the status dataset as ``Association.send_c_store`` does (empty when
    no response came: DIMSE timeout or abort).

    The message is written by :func:`send_message_from_file` on event-driven associations,
    else through pynetdicom's chunked-send mode (``C_STORE._dataset_path = (path, offset)``,
    read fragment by fragment by ``DIMSEMessage.encode_msg``). The association's reactor is
    paused while request and response are exchanged (``_reactor_checkpoint`` / ``_is_paused``,
    as ``send_c_store`` does); a requestor's stays paused between sub-operations (its release
    resumes it), which saves a reactor turn (~1 ms) per instance.

    Public replacement: ``Association.send_c_store(path)`` with
    ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET``, a process-wide switch that also turns
    off conversion for every other sender, so not used.
    """
    checkpoint = assoc._reactor_checkpoint
    if checkpoint.is_set():
        checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
    try:
        command = encode_store_request(
            sop_class_uid,
            sop_instance_uid,
            message_id,
            priority,
            move_originator_aet,
            move_originator_id,
        )
        if not send_message_from_file(assoc, context_id, command, path, offset):
            request = C_STORE()
            request.MessageID = message_id
            request.Priority = priority
            request.AffectedSOPClassUID = sop_class_uid
            request.AffectedSOPInstanceUID = sop_instance_uid
            request.MoveOriginatorApplicationEntityTitle = move_originator_aet
            request.MoveOriginatorMessageID = move_originator_id
            if not isinstance(offset, int):
                with open(path, "rb") as fh:
                    offset = offset(fh)
            request._dataset_path = (Path(path), offset)
            assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        if assoc.is_acceptor:
            checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return Dataset()
    return _status_of(assoc, response)


_STATUSES: dict[int, Dataset] = {}
"""One status dataset per status value of a bare C-STORE-RSP, made once (shared: read only)."""


def _status_of(assoc: Any, response: Any) -> Dataset:
    """What ``Association._check_received_status`` returns for ``response`` (a Dataset with its
    Status and optional status elements); for a response with nothing but a Status, a shared
    one made once per value (~40 us per sub-operation less)."""
    status = response.Status
    if (
        type(response) is C_STORE
        and response.is_valid_response
        and response.ErrorComment is None
        and response.OffendingElement is None
    ):
        shared = _STATUSES.get(status)
        if shared is None:
            shared = Dataset()
            shared.Status = status
            _STATUSES[status] = shared
        return shared
    checked: Dataset = assoc._check_received_status(response)
    return checked


# --- C-STORE responses decoded directly -----------------------------------------------------

_STORE_RSP_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000})
"""The command elements of a C-STORE-RSP without optional status elements (PS3.7 9.3.1.2)."""


def _uid(value: bytes) -> UID:
    return UID(value.rstrip(b"\x00 ").decode("ascii"), validation_mode=config.IGNORE)


def decode_store_response(command: bytes) -> C_STORE | None:
    """The C-STORE-RSP primitive of a command set (Implicit VR Little Endian, PS3.7 6.3.1, E.1)
    that carries Message ID Being Responded To, Status, no data set and at most the Affected SOP
    Class and Instance UIDs, as pynetdicom's decoder would make it; None for anything else (an
    Error Comment, another command, a malformed one: pynetdicom decodes those)."""
    values: dict[int, bytes] = {}
    at, end = 0, len(command)
    while at < end:
        if at + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", command, at)
        at += 8
        if group != 0 or element not in _STORE_RSP_ELEMENTS or at + length > end:
            return None
        values[element] = command[at : at + length]
        at += length
    try:
        if (
            values[0x0100] != b"\x01\x80"  # Command Field: C-STORE-RSP
            or values[0x0800] != b"\x01\x01"  # Command Data Set Type: none
            or len(values[0x0120]) != 2
            or len(values[0x0900]) != 2
        ):
            return None
        response = C_STORE()
        response.MessageIDBeingRespondedTo = struct.unpack("<H", values[0x0120])[0]
        response.Status = struct.unpack("<H", values[0x0900])[0]
        # set past pynetdicom's UID validation (the slow part of its decoder); read as is
        if 0x0002 in values:
            response._affected_sop_class_uid = _uid(values[0x0002])
        if 0x1000 in values:
            response._affected_sop_instance_uid = _uid(values[0x1000])
    except (KeyError, UnicodeDecodeError):
        return None
    return response


def decode_store_responses(assoc: Any) -> None:
    """Decode each C-STORE-RSP that arrives whole in one P-DATA with :func:`decode_store_response`
    and queue it for the waiting sender at once, instead of through pynetdicom's decoder
    (pydicom's element machinery and UID validation, ~0.2 ms on the wait between two C-STORE
    sub-operations); anything else, or any message while a handler is bound to
    ``EVT_DIMSE_RECV``, goes to pynetdicom as before.

    Hooks: ``DIMSEServiceProvider.receive_primitive``, ``message``, ``msg_queue``, the
    primitive's ``_affected_sop_class_uid`` / ``_affected_sop_instance_uid``. Public
    replacement: a faster command set decoder in pynetdicom."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        items = primitive.presentation_data_value_list
        if len(items) == 1 and dimse.message is None:
            context_id, data = items[0]
            if data[:1] == b"\x03" and not assoc.get_handlers(evt.EVT_DIMSE_RECV):
                response = decode_store_response(bytes(data[1:]))
                if response is not None:
                    response._context_id = context_id
                    dimse.msg_queue.put((context_id, response))
                    return
        receive(primitive)

    dimse.receive_primitive = receive_primitive


# --- responses the requestor's reactor must not take ----------------------------------------


def leave_responses_to_senders(assoc: Any) -> None:
    """On an association the node requested, put a C-STORE-RSP that pynetdicom's reactor took
    off the DIMSE queue back on it for the sender waiting for it, instead of dropping it
    ("Received unexpected C-STORE service message") and leaving the sender to time out.

    A sender pauses the reactor by clearing ``_reactor_checkpoint`` and waiting for
    ``_is_paused``; when the previous send had just resumed it, ``_is_paused`` may still be True
    from before while the reactor is about to run one more turn, in which it takes whatever
    message is queued: with responses decoded as quickly as :func:`decode_store_responses`
    does, sometimes the sender's own response.

    Hook: ``Association._serve_request``, ``dimse.msg_queue``. Public replacement: a reactor
    that does not race its own senders (pynetdicom issue to file).
    """
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if type(msg) is C_STORE and not msg.is_valid_request and msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request


# --- C-STORE datasets streamed to disk as they arrive ---------------------------------------

StoreSink = Callable[[Any, str, str, str], Any]
"""``(assoc, sop_class_uid, sop_instance_uid, transfer_syntax_uid)`` -> a sink for the dataset
about to arrive, or None to let pynetdicom gather it in memory as usual. The sink has what
pynetdicom writes fragments with (``write``, ``file.flush``, ``close``, ``name``) and
``discard`` (an abandoned transfer), ``read_ahead`` (called after each fragment but the last)
and ``complete`` (called after the last): :class:`storage.incoming.IncomingFile`."""


_COMMAND_UIDS = (
    (0x00000002, "Affected SOP Class UID"),
    (0x00001000, "Affected SOP Instance UID"),
)
"""The UIDs of a C-STORE-RQ's command set (PS3.7 9.3.1.1), with their names for the log."""


def refuse_invalid_command_uids(command: Dataset) -> str | None:
    """Why a C-STORE-RQ's command set cannot be served, judged on its raw UID values before
    pydicom or pynetdicom read them; None when its UIDs are valid (or absent: pynetdicom's own
    check finds those). Each invalid UID (PS3.5 9.1: non-ASCII bytes, other characters than
    digits and dots, more than 64 characters, empty) is emptied in ``command``, which makes
    the request one :func:`answer_invalid_store_requests` answers (emptied, not deleted:
    pynetdicom's standard log handlers, bound when its logger is verbose, read the element);
    the value is quoted with
    :func:`core.errors.shown_value` (escaped, cut short).

    Reading such a value through pydicom logs and warns "Invalid value for VR UI" with the raw
    bytes, pynetdicom adds "Non-conformant ... value" (twice), and takes the first of several
    backslash-separated values: an operator would see those lines before the node's refusal,
    and a UID with a backslash would even be stored under its first value. Judged here, the
    node's refusal is the one line."""
    problems = []
    for tag, name in _COMMAND_UIDS:
        element = command.get_item(tag)  # the raw element: its value not converted, not checked
        if element is None:
            continue
        value = element.value
        if isinstance(value, bytes):
            text = value.decode("latin-1")
        elif isinstance(value, list | tuple):
            text = "\\".join(str(v) for v in value)
        else:
            text = "" if value is None else str(value)
        text = text.rstrip("\x00 ")  # UI is padded with NUL (PS3.5 6.2); tolerate a space
        if not is_valid_uid(text):
            problems.append(f"{name} {shown_value(text)} is not a valid UID (PS3.5 9.1)")
            command[tag] = DataElement(tag, "UI", "")  # replaced, never read
    return "; ".join(problems) or None


class RefusedDataSet:
    """The sink of a C-STORE request refused as soon as its command set was read
    (:func:`refuse_invalid_command_uids`): its data set's fragments are read off the wire and
    dropped, neither written nor gathered in memory; :attr:`reason` is what the refusal's log
    line says. It has the parts of a file object pynetdicom's chunked reception writes with."""

    name = os.devnull

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @property
    def file(self) -> RefusedDataSet:
        return self

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)

    def flush(self) -> None:
        """Nothing is kept."""

    def close(self) -> None:
        """Nothing is kept."""

    def discard(self) -> None:
        """Nothing is kept."""


def stream_store_datasets(assoc: Any, open_sink: StoreSink | None) -> None:
    """As soon as a C-STORE-RQ's command set is decoded, judge its UIDs
    (:func:`refuse_invalid_command_uids`: a refused request's data set is dropped as it arrives,
    :class:`RefusedDataSet`) and hand its data set's fragments to the sink ``open_sink`` gives,
    as they arrive (``open_sink`` None: pynetdicom gathers them in memory); P-DATA with several
    PDVs are fed one PDV at a time so that the sink is in place before the first data set
    fragment.

    Hooks: ``DIMSEServiceProvider.receive_primitive`` and ``message``, the chunked receive
    mode's ``DIMSEMessage._data_set_file`` / ``_data_set_path`` (pynetdicom sets them only with
    ``_config.STORE_RECV_CHUNKED_DATASET``, process-wide), the command set's raw elements
    (``Dataset.get_item``). Public replacement: a per-association "data set sink" callback
    given the command set before its values are read.
    """
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def attach() -> None:
        """Give a C-STORE-RQ whose command set just completed its sink, before any data."""
        message = dimse.message
        if (
            type(message) is not C_STORE_RQ
            or message._data_set_file is not None
            or message.data_set is None
            or message.data_set.tell() != 0
        ):
            return
        command = message.command_set
        refusal = refuse_invalid_command_uids(command)
        if refusal is not None:
            refused: Any = RefusedDataSet(refusal)  # has what pynetdicom uses of its file
            message._data_set_file = refused
            return
        if open_sink is None:
            return
        try:
            transfer_syntax = next(
                cx.transfer_syntax[0]
                for cx in assoc.accepted_contexts
                if cx.context_id == message.context_id
            )
            sink = open_sink(
                assoc,
                str(command.AffectedSOPClassUID),
                str(command.AffectedSOPInstanceUID),
                str(transfer_syntax),
            )
        except (ValueError, StopIteration, AttributeError) as exc:
            # the dataset is then gathered in memory, and refused or filed there
            LOGGER.info("C-STORE: not streamed to disk (%s); gathering in memory", exc)
            return
        if sink is not None:
            message._data_set_file = sink
            message._data_set_path = Path(sink.name)

    def feed(primitive: Any, item: Any) -> None:
        sink = getattr(dimse.message, "_data_set_file", None)
        receive(primitive)
        control = item[1][0]  # the Message Control Header (PS3.8 E.2)
        if control & 1:  # a command fragment: once complete, a dataset may follow
            attach()
        elif sink is not None and hasattr(sink, "read_ahead"):  # ours, not pynetdicom's own
            if control & 2:  # the last fragment of the dataset
                sink.complete()  # flush now, while the handler reads and indexes
            else:
                sink.read_ahead()  # the header, while the next fragment is on the wire

    def receive_primitive(primitive: Any) -> None:
        items = primitive.presentation_data_value_list
        if len(items) == 1:
            feed(primitive, items[0])
            return
        if not items:
            receive(primitive)
            return
        for item in items:
            single = P_DATA()
            single.presentation_data_value_list = [item]
            feed(single, item)

    dimse.receive_primitive = receive_primitive


def unfinished_sinks(assoc: Any) -> list[Any]:
    """The sinks of data sets still being received or never handled when ``assoc`` ends.
    Hooks: ``DIMSEServiceProvider.message`` / ``msg_queue`` and the primitives'
    ``_dataset_file``."""
    sinks = [getattr(assoc.dimse.message, "_data_set_file", None)]
    sinks += [getattr(item[1], "_dataset_file", None) for item in list(assoc.dimse.msg_queue.queue)]
    return [sink for sink in sinks if sink is not None]


def incoming_file(request: Any) -> Any:
    """The sink a C-STORE request's data set was streamed into (None: gathered in memory).
    Hook: the primitive's ``_dataset_file``."""
    return getattr(request, "_dataset_file", None)


# --- requests pynetdicom would drop unanswered ----------------------------------------------


StoreRefusalLog = Callable[[Any, int, str], None]
"""``(assoc, status, reason)``: logs (and counts) a C-STORE request answered ``status``."""


def answer_invalid_store_requests(assoc: Any, status: int, log_refusal: StoreRefusalLog) -> None:
    """Answer a C-STORE-RQ that lacks a required parameter (an empty Affected SOP Instance
    UID, say), or whose command set's UIDs were refused (:func:`refuse_invalid_command_uids`),
    with ``status`` instead of dropping it: pynetdicom logs "Received unexpected C-STORE service
    message" and sends nothing, so the requester waits for ever (PS3.7 9.1.1: every request
    gets a response). What was streamed of its data set is deleted; ``log_refusal`` gives the
    one log line, with the refused UID's reason where there is one. The response carries no
    Affected SOP Instance UID (it is optional in a C-STORE-RSP, PS3.7 9.3.1.2, and the
    request's may not be a UID at all).

    Hook: ``Association._serve_request`` (and the primitive's ``_dataset_file``). Public
    replacement: pynetdicom answering such requests itself, or an event for them.
    """
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if type(msg) is not C_STORE or msg.is_valid_request or msg.MessageID is None:
            serve(msg, context_id)
            return
        sink = getattr(msg, "_dataset_file", None)
        if sink is not None and hasattr(sink, "discard"):
            with contextlib.suppress(OSError):
                sink.discard()
        reason = (
            sink.reason
            if isinstance(sink, RefusedDataSet)
            else "the request lacks a required parameter (SOP Class UID, SOP Instance UID, "
            "Priority or data set)"
        )
        log_refusal(assoc, status, reason)
        response = C_STORE()
        response.MessageIDBeingRespondedTo = msg.MessageID
        response.Status = status
        assoc.dimse.send_msg(response, context_id)

    assoc._serve_request = serve_request


# --- requests refused before pynetdicom's service class ------------------------------------

RequestScreen = Callable[[Any, Any, int], Any]
"""``(assoc, request, context_id)`` -> the response primitive that refuses the request, or None
to serve it as usual."""


def screen_requests(assoc: Any, screen: RequestScreen) -> None:
    """Give every valid DIMSE request to ``screen`` before pynetdicom's service class runs it;
    a response ``screen`` returns is sent instead (a final one: the request is not served).

    pynetdicom asks a C-GET handler for the number of sub-operations (a C-MOVE handler for its
    destination, then that number) before it takes any status from it, so a handler that finds
    the identifier unusable can only raise: pynetdicom then logs a traceback and answers its own
    0xC4xx/0xC5xx, and yielding 0 then a status reports Success. The screen answers such
    requests with the status and Error Comment PS3.4 gives (0xA900, C.4.2.1.5, C.4.3.1.4).

    Hook: ``Association._serve_request``. Public replacement: an intervention event before the
    service class (or a handler yield that ends a C-GET/C-MOVE with a status before its count).
    """
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        response = screen(assoc, msg, context_id) if msg.is_valid_request else None
        if response is None:
            serve(msg, context_id)
            return
        assoc.dimse.send_msg(response, context_id)

    assoc._serve_request = serve_request


# --- a C-MOVE whose destination cannot be reached ------------------------------------------

MOVE_DESTINATION_UNKNOWN = 0xA801
"""The status pynetdicom's C-MOVE SCP answers both for a destination the handler did not name and
for one it could not associate with (PS3.4 C.4.2.1.5)."""
PENDING_STATUSES = (0xFF00, 0xFF01)


def on_move_association_failed(event: Any, refuse: Callable[[Any, Any], None]) -> None:
    """Call ``refuse(response, context)`` on the final C-MOVE-RSP of ``event``'s request if it
    is the 0xA801 pynetdicom sends when it cannot establish the association with the destination
    the handler yielded, before it is sent: ``refuse`` sets the status PS3.4 C.4.2.3.1 asks for
    (the destination is known; the sub-operations could not be performed), the counts, the Error
    Comment and the Identifier (``context`` is the request's accepted presentation context, for
    encoding it). Call it from the C-MOVE handler just before it yields a destination it knows;
    a handler that yields no destination (``None, None``) keeps pynetdicom's 0xA801. The hook
    removes itself with the request's final response.

    Hook: the requesting association's ``DIMSEServiceProvider.send_msg`` (the response is a
    ``C_MOVE`` primitive; ``QueryRetrieveServiceClass._move_scp`` sends 0xA801 when
    ``store_assoc.is_established`` is false). Public replacement: a status the C-MOVE handler
    can give for a failed association with its destination.
    """
    assoc = event.assoc
    dimse = assoc.dimse
    send = dimse.send_msg
    message_id = event.request.MessageID

    def send_msg(primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_MOVE
            and primitive.MessageIDBeingRespondedTo == message_id
            and primitive.Status not in PENDING_STATUSES
        ):
            dimse.send_msg = send  # the request's final response: unhook
            if primitive.Status == MOVE_DESTINATION_UNKNOWN:
                context = next(cx for cx in assoc.accepted_contexts if cx.context_id == context_id)
                refuse(primitive, context)
        send(primitive, context_id)

    dimse.send_msg = send_msg


# --- C-FIND answered with identifiers encoded by the node ---------------------------------------

FindResponses = Callable[[Any], Iterator[tuple[int | Dataset, bytes | None]]]
"""Given a C-FIND request's ``evt.Event`` (``request``, ``context``, ``identifier``,
``is_cancelled``, ``assoc``): each response's status and, for a pending one, its identifier
already encoded in the context's transfer syntax; a final status may be a Dataset of Status and
Error Comment, as pynetdicom's handlers yield it."""

_PENDING = (0xFF00, 0xFF01)
_UNABLE_TO_PROCESS_HANDLER = 0xC311  # pynetdicom's: the handler raised
_UNABLE_TO_ENCODE = 0xC312  # pynetdicom's: a pending response without an identifier


def serve_find_requests(assoc: Any, sop_classes: Collection[str], find: FindResponses) -> None:
    """Answer the C-FIND requests of ``sop_classes`` on ``assoc`` with ``find``, whose pending
    responses carry identifiers it encoded itself, instead of pynetdicom's service class (which
    encodes each identifier it is given as a Dataset through pydicom, ~0.2 ms per response).

    What pynetdicom's ``_c_find_scp`` does around its handler is done the same: the C-CANCELs
    kept for the request are cleared before and after it (``dimse.cancel_req``), the reactor is
    paused meanwhile (``_is_paused``), each pending response goes out as it is yielded, the first
    response that is not pending (0xFF00/0xFF01) ends the request, a pending one without an
    identifier is answered 0xC312, an exception in ``find`` 0xC311 (logged), and a final Success
    follows when ``find`` ends; nothing more is sent once the association is gone. Other
    requests, and C-FIND requests during release, go to pynetdicom as before.

    Hook: ``Association._serve_request``, ``_accepted_cx``, ``_sent_release``, ``_is_paused``,
    ``DIMSEServiceProvider.cancel_req``. Public replacement: a C-FIND handler that may yield an
    encoded identifier (bytes) instead of a Dataset."""
    serve = assoc._serve_request
    classes = frozenset(sop_classes)

    def serve_request(msg: Any, context_id: int) -> None:
        context = assoc._accepted_cx.get(context_id)
        if (
            type(msg) is not C_FIND
            or context is None
            or assoc._sent_release
            or not msg.is_valid_request
            or str(msg.AffectedSOPClassUID) not in classes
        ):
            serve(msg, context_id)
            return
        dimse = assoc.dimse
        dimse.cancel_req = {}
        assoc._is_paused = True
        try:
            _answer_find(assoc, msg, context, find)
        finally:
            assoc._is_paused = False
            dimse.cancel_req = {}

    assoc._serve_request = serve_request


_FIND_RQ_ELEMENTS = {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800}
"""The command elements of a C-FIND-RQ (PS3.7 9.3.2.1): group length, Affected SOP Class UID,
Command Field, Message ID, Priority, Command Data Set Type."""


def _find_request(command: bytes) -> Any:
    """A C_FIND primitive (without its Identifier) from an Implicit VR Little Endian command
    set (PS3.7 6.3.1), or None for anything but a C-FIND-RQ of those elements alone."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset < len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        if group != 0 or element not in _FIND_RQ_ELEMENTS or element in fields:
            return None
        fields[element] = command[offset + 8 : offset + 8 + length]
        offset += 8 + length
    if offset != len(command) or not fields.keys() >= _FIND_RQ_ELEMENTS:
        return None
    (field,), (data_set_type,) = (
        struct.unpack("<H", fields[0x0100]),
        struct.unpack("<H", fields[0x0800]),
    )
    if field != 0x0020 or data_set_type == 0x0101 or len(fields[0x0110]) != 2:
        return None
    request = C_FIND()
    request.MessageID = struct.unpack("<H", fields[0x0110])[0]
    request.AffectedSOPClassUID = fields[0x0002].decode("ascii").rstrip("\x00 ")
    request.Priority = struct.unpack("<H", fields[0x0700])[0]
    return request


def decode_find_requests(assoc: Any) -> None:
    """Decode each C-FIND-RQ that arrives whole as the usual first PDVs (its command set in one
    fragment) directly into the C_FIND primitive pynetdicom would make, instead of through
    ``DIMSEMessage`` and pydicom (~0.3 ms a request on a fresh association thread): the
    command set's elements are read here, the identifier's fragments gathered as they come,
    and the primitive queued for the reactor once the last one is in. Anything else (another
    message, a fragmented or unusual command set, a value pynetdicom's primitive refuses, or
    EVT_DIMSE_RECV handlers that want the message) goes to pynetdicom untouched; a request
    whose identifier never completes is dropped as pynetdicom's would be.

    Hook: ``DIMSEServiceProvider.receive_primitive``, ``message`` (None between messages),
    ``msg_queue``. Public replacement: a faster command set decoder in pynetdicom."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive
    gathering: list[Any] = []  # [context ID, C_FIND, identifier fragments] while they arrive

    def receive_primitive(primitive: Any) -> None:
        items = primitive.presentation_data_value_list
        if not gathering:
            if (
                dimse.message is not None
                or not items
                or items[0][1][0] & 0x03 != 0x03  # not a whole command set
                or assoc.get_handlers(evt.EVT_DIMSE_RECV)
            ):
                receive(primitive)
                return
            try:
                request = _find_request(items[0][1][1:])
            except (struct.error, UnicodeDecodeError, ValueError, TypeError):
                request = None
            if request is None:
                receive(primitive)
                return
            gathering[:] = [items[0][0], request, []]
            items = items[1:]
        context_id, request, fragments = gathering
        for item_context, data in items:
            if data[0] & 0x01 or item_context != context_id:  # not its identifier: start over
                gathering.clear()
                receive(primitive)
                return
            fragments.append(data[1:])
            if data[0] & 0x02:
                request.Identifier = BytesIO(b"".join(fragments))
                gathering.clear()
                dimse.msg_queue.put((context_id, request))
                return

    dimse.receive_primitive = receive_primitive


def _answer_find(assoc: Any, request: Any, context: Any, find: FindResponses) -> None:
    dimse = assoc.dimse
    context_id = context.context_id
    response = C_FIND()
    response.MessageID = request.MessageID
    response.MessageIDBeingRespondedTo = request.MessageID
    response.AffectedSOPClassUID = request.AffectedSOPClassUID

    def is_cancelled(message_id: int) -> bool:  # as QueryRetrieveServiceClass.is_cancelled
        return dimse.cancel_req.pop(message_id, None) is not None

    event = evt.Event(
        assoc,
        evt.EVT_C_FIND,
        {"request": request, "context": context.as_tuple, "_is_cancelled": is_cancelled},
    )
    try:
        for status, identifier in find(event):
            if not assoc.is_established:
                return
            if isinstance(status, Dataset):  # a final status with its Error Comment
                response.ErrorComment = status.get("ErrorComment")
                status = status.Status
            pending = status in _PENDING
            if pending and not identifier:
                status, pending = _UNABLE_TO_ENCODE, False
            response.Status = status
            response.Identifier = BytesIO(identifier) if pending and identifier else None
            dimse.send_msg(response, context_id)
            if not pending:
                return
    except Exception:
        LOGGER.exception("C-FIND: the handler failed")
        if assoc.is_established:
            response.Status, response.Identifier = _UNABLE_TO_PROCESS_HANDLER, None
            dimse.send_msg(response, context_id)
        return
    if assoc.is_established:
        response.Status, response.Identifier = 0x0000, None
        dimse.send_msg(response, context_id)


# --- responses encoded directly -------------------------------------------------------------


def send_responses_directly(assoc: Any, encode: Callable[[Any], bytes | None]) -> None:
    """Send each DIMSE response ``encode`` can encode (its command set) built here rather than
    through pydicom's element machinery (~0.3 ms per response): the command set as one P-DATA,
    followed by the primitive's ``Identifier`` (an encoded C-FIND identifier) in fragments that
    fit the peer's maximum PDU (PS3.8 E.2). Over plain TCP in Sta6 all of it is one write
    (:func:`_direct_ok`); otherwise each PDU goes through the DUL in order.
    Hook: ``DIMSEServiceProvider.send_msg``, ``maximum_pdu_size``, ``dul.send_pdu``. Public
    replacement: a faster command set encoder in pynetdicom."""
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        command = None
        if not assoc.get_handlers(evt.EVT_DIMSE_SENT):
            command = encode(primitive)
        max_pdu = int(dimse.maximum_pdu_size or 0)
        if command is None or (max_pdu and len(command) + 6 > max_pdu):
            send(primitive, context_id)
            return
        identifier = getattr(primitive, "Identifier", None)
        data = identifier.getvalue() if identifier is not None else b""
        if not data:
            pdata = P_DATA()
            # pynetdicom's setter wants [ID, PDV] lists (its annotation says tuples)
            pdata.presentation_data_value_list = [
                [context_id, b"\x03" + command]  # type: ignore[list-item]
            ]
            dimse.dul.send_pdu(pdata)
            return
        fragment = max_pdu - 6 if max_pdu else UNLIMITED_PDV
        pdus = [*_pdv_pdus(context_id, 0x03, command, fragment)]
        pdus += _pdv_pdus(context_id, 0x02, data, fragment)
        sock = _direct_ok(assoc)
        if sock is not None:
            sock.send_whole(b"".join(pdus))
            return
        for pdu in pdus:  # one PDV each: (length, context ID, control + data) after the header
            pdata = P_DATA()
            pdata.presentation_data_value_list = [
                [context_id, pdu[11:]]  # type: ignore[list-item]
            ]
            dimse.dul.send_pdu(pdata)

    dimse.send_msg = send_msg


def log_request_identifiers(enabled: bool) -> None:
    """Whether pynetdicom decodes a second time, and logs line by line at INFO, the identifier of
    every C-FIND request it serves (~0.3 ms each, for nothing when its logger drops INFO).
    Hook: ``pynetdicom._config.LOG_REQUEST_IDENTIFIERS``, a process-wide switch that only governs
    this logging. Public replacement: the same switch, public, or the lines built lazily."""
    _config.LOG_REQUEST_IDENTIFIERS = enabled


# --- log handlers ---------------------------------------------------------------------------

_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def unbind_standard_log_handlers(assoc: Any) -> None:
    """Unbind pynetdicom's standard handlers that format every PDU and DIMSE message into
    debug lines. Hook: ``pynetdicom._handlers``. Public replacement: the handlers exported, or
    bound only when the ``pynetdicom`` logger is at DEBUG."""
    for event, handler in _STANDARD_LOG_HANDLERS:
        assoc.unbind(event, handler)
