"""The node's associations: event driven, C-STORE streamed to disk, responses encoded directly.

pynetdicom 3.0.4 runs each association as two polling loops (the DUL thread sleeps 1 ms whenever
a pass found nothing to do; the association thread sleeps 1 ms before each look at the DIMSE
message queue), sends every P-DATA through the DUL thread, and encodes every command set through
pydicom's element machinery. Per accepted association, and per association the node requests
for C-MOVE sub-operations (nothing global is patched; the pynetdicom internals used live in
:mod:`nnunet_node.pipeline.pynetdicom_internals`):

- **Event driven, one thread.** An accepted association has no DUL thread (unless it may
  receive C-STOREs, :func:`receives_c_store`): its own thread reads and decodes the PDUs
  whenever it waits for a primitive or a DIMSE message, and sends what it queues at once, so a
  request reaches its handler, and the A-ASSOCIATE-AC and A-RELEASE-RP their peer, without a
  hand-over between threads (0.1-1 ms each, more on a busy machine). Other associations keep
  pynetdicom's DUL thread, which waits in ``select`` on the socket and on a wake-up pipe.
  P-DATA are written to the socket by the thread that sends them.
- **Streaming to disk.** As soon as a C-STORE-RQ's command set is decoded, the association's
  ``store_sink`` (the archive's :class:`storage.incoming.IncomingFile`, given the Part 10 head)
  takes the dataset's fragments as they arrive, so the file is written, and its writeback
  started, while the rest is still on the wire.
- **Responses encoded directly.** C-FIND requests are answered by the node's ``find_service``
  with identifiers it encodes from the index rows (node/identifiers.py), not through a pydicom
  Dataset per match. C-STORE, C-ECHO, C-FIND (pending ones with their
  identifier too), C-GET and C-MOVE responses have a fixed command set; it is encoded here
  (Implicit VR Little Endian, PS3.7 6.3.1, 9.3, E.1) instead of through pydicom (~0.3 ms each),
  as pynetdicom would encode it (tests/node/test_transport.py compares the bytes), and a C-FIND
  response goes out as one write: its command and identifier PDUs together. A UID that cannot
  be encoded (a requester sent non-ASCII bytes) is left out of the response: PS3.7 makes the
  Affected SOP Class and Instance UIDs of a response optional, and a status must always go
  back.
- **Stored files sent as they are** for C-GET and C-MOVE (pipeline/stored_send.py).
- **No discarded log text.** pynetdicom's standard handlers format every PDU and DIMSE message
  into debug lines. When the ``pynetdicom`` logger would drop them (below INFO is off, the
  node's default, core/logging.py), they are unbound; turn that logger to INFO or DEBUG and
  they stay.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from typing import Any

from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from nnunet_node.node.contexts import FIND_MODELS, QUERY_RETRIEVE
from nnunet_node.node.status import CANNOT_UNDERSTAND, refused_before_handler
from nnunet_node.pipeline.dispatch import NodeAE
from nnunet_node.pipeline.pynetdicom_internals import (
    AcceptingHandler,
    FindResponses,
    RequestScreen,
    StoreSink,
    after_run,
    answer_invalid_store_requests,
    command_set,
    decode_find_requests,
    log_request_identifiers,
    make_event_driven,
    screen_requests,
    send_responses_directly,
    serve_find_requests,
    stream_store_datasets,
    unbind_standard_log_handlers,
    unfinished_sinks,
)
from nnunet_node.pipeline.stored_send import send_stored_files

LOGGER = logging.getLogger(__name__)

__all__ = ["RequestScreen", "ServerAE", "StoreSink", "encode_response", "encode_store_response"]

# Command Field of each response (PS3.7 E.1).
_RESPONSE_FIELDS = {C_STORE: 0x8001, C_ECHO: 0x8030, C_FIND: 0x8020, C_GET: 0x8010, C_MOVE: 0x8021}
_SUB_OPERATION_COUNTS = (
    (0x1020, "NumberOfRemainingSuboperations"),
    (0x1021, "NumberOfCompletedSuboperations"),
    (0x1022, "NumberOfFailedSuboperations"),
    (0x1023, "NumberOfWarningSuboperations"),
)


def _uid_or_none(value: Any) -> bytes | None:
    """A UID value padded to even length, or None when absent or not ASCII."""
    if not value:
        return None
    try:
        data = str(value).encode("ascii")
    except UnicodeEncodeError:
        return None
    return data + b"\x00" if len(data) % 2 else data


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_response(primitive: Any) -> bytes | None:
    """The command set of a DIMSE-C response without Error Comment or Offending Element
    (PS3.7 9.3: C-STORE, C-ECHO, C-FIND, C-GET, C-MOVE), as pynetdicom encodes it; None for
    anything else (pynetdicom encodes those). A C-FIND response may carry its Identifier (an
    encoded data set, PS3.7 9.3.2.2): its Command Data Set Type then says one follows, and the
    caller sends the identifier's bytes after the command set."""
    field = _RESPONSE_FIELDS.get(type(primitive))
    identifier = getattr(primitive, "Identifier", None)
    if (
        field is None
        or primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or getattr(primitive, "ErrorComment", None) is not None
        or getattr(primitive, "OffendingElement", None) is not None
        or (identifier is not None and type(primitive) is not C_FIND)
    ):
        return None
    has_data_set = identifier is not None and bool(identifier.getvalue())
    elements: list[tuple[int, bytes]] = []
    sop_class = _uid_or_none(primitive.AffectedSOPClassUID)
    if sop_class is not None:
        elements.append((0x0002, sop_class))
    elements += [
        (0x0100, _us(field)),  # Command Field
        (0x0120, _us(int(primitive.MessageIDBeingRespondedTo))),
        (0x0800, _us(0x0001 if has_data_set else 0x0101)),  # Command Data Set Type
        (0x0900, _us(int(primitive.Status))),
    ]
    sop_instance = _uid_or_none(getattr(primitive, "AffectedSOPInstanceUID", None))
    if sop_instance is not None:
        elements.append((0x1000, sop_instance))
    for element, keyword in _SUB_OPERATION_COUNTS:
        count = getattr(primitive, keyword, None)
        if count is not None:
            elements.append((element, _us(int(count))))
    return command_set(elements)


def encode_store_response(
    sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int
) -> bytes:
    """The command set of a C-STORE-RSP without Error Comment or Offending Element
    (PS3.7 9.3.1.2), as pynetdicom encodes it."""
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class_uid
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Status = status
    command = encode_response(primitive)
    assert command is not None
    return command


_NOT_STORAGE = frozenset({str(Verification), *(str(uid) for uid in QUERY_RETRIEVE)})


def receives_c_store(assoc: Any) -> bool:
    """Whether the peer may send C-STORE requests on ``assoc``: it has a storage context the
    node accepted as SCP (PS3.4 B.2; not one where the node is SCU only, as for C-GET's
    sub-operations). Such an association keeps a DUL thread: reading the next PDUs, and the
    fsync a finished data set's file starts, then overlap the handler's commit of the index
    rows (bench/bench_cstore.py: about half the rate without)."""
    return any(
        cx.as_scp and str(cx.abstract_syntax) not in _NOT_STORAGE for cx in assoc.accepted_contexts
    )


def _log_store_refusal(assoc: Any, status: int, reason: str) -> None:
    """The one log line (and count) of a C-STORE request refused before its handler."""
    refused_before_handler("C-STORE", status, reason, assoc)


def _discard_unfinished(assoc: Any) -> None:
    """At the end of an association: delete what was being received and never handled."""
    for sink in unfinished_sinks(assoc):
        if hasattr(sink, "discard"):
            with contextlib.suppress(OSError):
                sink.discard()


class ServerAE(NodeAE):
    """The node's AE: accepted associations and those it requests for C-MOVE are event driven
    and send stored files as they are; accepted ones stream C-STORE datasets into ``store_sink``
    when one is set (``event_driven=False`` keeps pynetdicom's polling and in-memory datasets,
    for comparison in bench/bench_cstore.py)."""

    def __init__(self, *args: Any, event_driven: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.event_driven = event_driven
        self.store_sink: StoreSink | None = None
        self.request_screen: RequestScreen | None = None
        """Refuses requests before pynetdicom's service class runs (a C-GET or C-MOVE whose
        identifier cannot be served)."""
        self.find_service: FindResponses | None = None
        """Answers C-FIND requests of the Query/Retrieve Find SOP Classes on event-driven
        associations with identifiers it encodes itself (pynetdicom's service class encodes
        each one through pydicom); None: pynetdicom's EVT_C_FIND handler answers."""

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("request_handler", AcceptingHandler)
        return super().make_server(*args, **kwargs)

    def _fast(self, assoc: Any) -> None:
        verbose = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
        log_request_identifiers(verbose)
        if not verbose:
            unbind_standard_log_handlers(assoc)
        send_responses_directly(assoc, encode_response)

    def on_accepted(self, assoc: Any) -> None:
        """Called for each accepted association before it starts (AcceptingHandler)."""
        if self.event_driven:
            self._fast(assoc)
            stream_store_datasets(assoc, self.store_sink)
            answer_invalid_store_requests(assoc, CANNOT_UNDERSTAND, _log_store_refusal)
            if self.find_service is not None:
                serve_find_requests(assoc, FIND_MODELS, self.find_service)
                decode_find_requests(assoc)
            close = make_event_driven(assoc, keep_thread=receives_c_store)

            def finish() -> None:
                _discard_unfinished(assoc)
                close()

            after_run(assoc, finish)
        if self.request_screen is not None:
            screen_requests(assoc, self.request_screen)
        send_stored_files(assoc)

    def make_socket(self, assoc: Any, address: Any) -> Any:
        """The socket of an association the node requests (C-MOVE sub-operations), made event
        driven before the association starts."""
        sock = super().make_socket(assoc, address)
        if self.event_driven:
            if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
                unbind_standard_log_handlers(assoc)
            close = make_event_driven(assoc, sock)
            after_run(assoc, close)  # the thread runs once the association is established
            assoc._node_close_wake = close
        return sock

    def associate(self, *args: Any, **kwargs: Any) -> Any:
        """Request an association (C-MOVE sub-operations use it) that sends the stored files
        the handlers yield from disk (pipeline/stored_send.py)."""
        assoc = super().associate(*args, **kwargs)
        close = getattr(assoc, "_node_close_wake", None)
        if close is not None and not assoc.is_established:
            close()  # no thread ran, none will
        send_stored_files(assoc)
        return assoc
