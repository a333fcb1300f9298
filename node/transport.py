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

The C-STORE path, per accepted association (bench/bench_cstore.py measures each):

- **Streaming to disk.** pynetdicom gathers a C-STORE dataset in memory and hands it over once
  complete. Here, as soon as a C-STORE-RQ's command set is decoded, the association's
  ``store_sink`` (the archive's :class:`storage.archive.IncomingFile`, given the Part 10 head)
  takes the dataset's fragments as they arrive, through the hook pynetdicom has for its own
  chunked mode (``DIMSEMessage._data_set_file``), so the file is written, and its writeback
  started, while the rest is still on the wire. P-DATA with several PDVs are fed in one PDV at
  a time so that the sink is in place before the first dataset fragment.
- **Responses encoded directly.** A plain C-STORE-RSP (no Error Comment, no Offending Element)
  is a fixed group of seven elements; it is encoded here (Implicit VR Little Endian, PS3.7 6.3.1)
  instead of through pydicom's element machinery (~1 ms per response here), and queued as one
  P-DATA. tests/node/test_transport.py checks the bytes against pynetdicom's encoder.
- **No discarded log text.** pynetdicom's standard handlers format every PDU and DIMSE message
  into debug lines (copying a received dataset to see whether it is empty). When the
  ``pynetdicom`` logger would drop them (below INFO is off, the node's default, core/logging.py),
  they are unbound; turn that logger to INFO or DEBUG and they stay.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from nnunet_node.node.retrieve import send_stored_files
from nnunet_node.pipeline.dispatch import NodeAE

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


StoreSink = Callable[[Any, str, str, str], Any]
"""``(assoc, sop_class_uid, sop_instance_uid, transfer_syntax_uid)`` -> a sink for the dataset
about to arrive, or None to let pynetdicom gather it in memory as usual. The sink has what
pynetdicom writes fragments with (``write``, ``file.flush``, ``close``, ``name``) and ``discard``
(an abandoned transfer), ``read_ahead`` (called after each fragment but the last) and
``complete`` (called after the last): :class:`storage.archive.IncomingFile`."""

_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _element(element: int, value: bytes) -> bytes:
    """One command element, Implicit VR Little Endian (PS3.5 7.1.3), group 0000."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _ui(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def encode_store_response(
    sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int
) -> bytes:
    """The command set of a C-STORE-RSP without Error Comment or Offending Element
    (PS3.7 9.3.1.2), as pynetdicom encodes it."""
    body = b"".join(
        (
            _element(0x0002, _ui(sop_class_uid)),  # Affected SOP Class UID
            _element(0x0100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
            _element(0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
            _element(0x0800, struct.pack("<H", 0x0101)),  # Command Data Set Type: none
            _element(0x0900, struct.pack("<H", status)),  # Status
            _element(0x1000, _ui(sop_instance_uid)),  # Affected SOP Instance UID
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _fast_store_responses(assoc: Any) -> None:
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.AffectedSOPClassUID
            and primitive.AffectedSOPInstanceUID
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_store_response(
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                int(primitive.MessageIDBeingRespondedTo),
                int(primitive.Status),
            )
            max_pdu = dimse.maximum_pdu_size
            if not max_pdu or len(command) + 6 <= max_pdu:
                pdata = P_DATA()
                # pynetdicom's setter wants [ID, PDV] lists (its annotation says tuples)
                pdata.presentation_data_value_list = [
                    [context_id, b"\x03" + command]  # type: ignore[list-item]
                ]
                dimse.dul.send_pdu(pdata)
                return
        send(primitive, context_id)

    dimse.send_msg = send_msg


def _stream_store_datasets(assoc: Any, open_sink: StoreSink) -> None:
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
        try:
            transfer_syntax = assoc._accepted_cx[message.context_id].transfer_syntax[0]
            sink = open_sink(
                assoc,
                str(command.AffectedSOPClassUID),
                str(command.AffectedSOPInstanceUID),
                str(transfer_syntax),
            )
        except Exception:  # the dataset is then gathered in memory, and handled there
            LOGGER.warning("C-STORE: cannot stream to disk; gathering in memory", exc_info=True)
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


def _discard_unfinished(assoc: Any) -> None:
    """At the end of an association: delete what was being received and never handled."""
    sinks = [getattr(assoc.dimse.message, "_data_set_file", None)]
    sinks += [getattr(item[1], "_dataset_file", None) for item in list(assoc.dimse.msg_queue.queue)]
    for sink in sinks:
        if sink is not None and hasattr(sink, "discard"):
            with contextlib.suppress(OSError):
                sink.discard()


def make_event_driven(assoc: Any, *, store_sink: StoreSink | None = None) -> None:
    """Turn an accepted, not yet started association into the event-driven form above;
    with ``store_sink``, C-STORE datasets stream into it."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        for event, handler in _STANDARD_LOG_HANDLERS:
            assoc.unbind(event, handler)
    _fast_store_responses(assoc)
    if store_sink is not None:
        _stream_store_datasets(assoc, store_sink)

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
            _discard_unfinished(assoc)
            for end in (wake_r, wake_w):
                end.close()

    assoc.run = run


class EventDrivenRequestHandler(RequestHandler):
    """The server's per-connection handler: pynetdicom's, with :func:`make_event_driven` (unless
    the AE says ``event_driven=False``), sending stored files as they are (node/retrieve.py)."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        if getattr(self.ae, "event_driven", True):
            make_event_driven(assoc, store_sink=getattr(self.ae, "store_sink", None))
        send_stored_files(assoc)
        return assoc


class ServerAE(NodeAE):
    """The node's AE: accepted associations are event driven, and stream C-STORE datasets into
    ``store_sink`` when one is set (``event_driven=False`` keeps pynetdicom's polling and
    in-memory datasets, for comparison in bench/bench_cstore.py)."""

    def __init__(self, *args: Any, event_driven: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.event_driven = event_driven
        self.store_sink: StoreSink | None = None

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("request_handler", EventDrivenRequestHandler)
        return super().make_server(*args, **kwargs)

    def associate(self, *args: Any, **kwargs: Any) -> Any:
        """Request an association (C-MOVE sub-operations use it) that sends the stored files
        the handlers yield from disk (node/retrieve.py)."""
        assoc = super().associate(*args, **kwargs)
        send_stored_files(assoc)
        return assoc
