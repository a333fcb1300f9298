"""Event-driven associations for the node's SCP: no 1 ms polling between DIMSE messages.

pynetdicom 3.0.4 runs each accepted association as two polling loops: the DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever a pass found nothing to do, and the association thread
sleeps 1 ms before each look at the DIMSE message queue. Per C-STORE that is a wait after the
dataset arrives and another before the response leaves; on a busy 2-core machine each "1 ms"
sleep lasts several. Here, per accepted association (nothing global is patched):

- the DUL's "anything to read?" check (``AssociationSocket.ready``) waits in ``select`` on the
  socket *and* on a wake-up pipe that every primitive queued for sending writes to, so the DUL
  thread sleeps until there is something to do and ``_run_loop_delay`` can be 0;
- the association thread's non-blocking look at the message queue waits up to 20 ms for a
  message instead of returning at once, so a message is served as soon as it is complete.

Release, abort and the ARTIM timer are still noticed, at most one wait (20-50 ms) later.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
from typing import Any

from pynetdicom.transport import AssociationSocket, RequestHandler

from pipeline.dispatch import NodeAE

LOGGER = logging.getLogger(__name__)

DUL_WAIT_S = 0.05
"""Longest the DUL thread waits for data or a primitive before its timers are checked again."""
MESSAGE_WAIT_S = 0.02
"""Longest the association thread waits for a DIMSE message before checking release/abort."""


class _WakingQueue(queue.Queue[Any]):
    """The DUL's outgoing-primitive queue: each ``put`` also wakes the DUL thread."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with contextlib.suppress(OSError):
            self._wake.send(b"\0")


class _WaitingSocket(AssociationSocket):
    """``ready`` blocks until the peer sent data or a primitive was queued (or a short timeout)."""

    _wake_r: socket.socket
    _wake_w: socket.socket

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            return False
        timeout = 0.0 if not self.event_queue.empty() else DUL_WAIT_S
        try:
            readable, _, _ = select.select([self.socket, self._wake_r], [], [], timeout)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # Transport connection closed (PS3.8 9.2)
            return False
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        return self.socket in readable


def make_event_driven(assoc: Any) -> None:
    """Turn an accepted, not yet started association into the event-driven form above."""
    dul = assoc.dul
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    dul.to_provider_queue = _WakingQueue(wake_w)
    dul._run_loop_delay = 0
    sock = dul.socket
    sock.__class__ = _WaitingSocket
    sock._wake_r = wake_r
    sock._wake_w = wake_w

    dimse = assoc.dimse
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if block:
            return blocking_get(block=True)
        try:
            return dimse.msg_queue.get(block=True, timeout=MESSAGE_WAIT_S)
        except queue.Empty:
            return None, None

    dimse.get_msg = get_msg

    association_run = assoc.run

    def run() -> None:
        try:
            association_run()
        finally:  # the acceptor's thread ends with the association: close the wake-up pipe
            for end in (wake_r, wake_w):
                end.close()

    assoc.run = run


class EventDrivenRequestHandler(RequestHandler):
    """The server's per-connection handler: pynetdicom's, with :func:`make_event_driven`."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        make_event_driven(assoc)
        return assoc


class ServerAE(NodeAE):
    """The node's AE: accepted associations are event driven (``event_driven=False`` keeps
    pynetdicom's polling, for comparison in bench/bench_cstore.py)."""

    def __init__(self, *args: Any, event_driven: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.event_driven = event_driven

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        if self.event_driven:
            kwargs.setdefault("request_handler", EventDrivenRequestHandler)
        return super().make_server(*args, **kwargs)
