"""The contract between nnunet_node.pipeline.pynetdicom_internals and the installed pynetdicom.

Every private name and shape the module relies on is checked here against pynetdicom itself, so
that a new release that changes one fails here, loudly and by name, rather than slowing down or
breaking the node in some other test (the module never falls back silently). When a check fails:
read the new pynetdicom code, adapt the hook (or move to the public API its docstring names),
then update the check.
"""

from __future__ import annotations

import inspect
import logging
import queue
import re
import threading
from io import BytesIO

import pynetdicom
import pytest
from pynetdicom import AE, _config, _handlers, evt
from pynetdicom import fsm as pynetdicom_fsm
from pynetdicom._globals import MODE_ACCEPTOR, MODE_REQUESTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

from nnunet_node.pipeline import pynetdicom_internals as internals
from tests.node.raw_dimse import store_request


def _source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


def test_the_pinned_release() -> None:
    major, minor = (int(part) for part in pynetdicom.__version__.split(".")[:2])
    assert (major, minor) == (3, 0), f"pynetdicom {pynetdicom.__version__}: re-check every hook"


def test_socket_and_association_factories() -> None:
    # RequestingAE overrides AE._create_socket, which associate() calls before connecting
    assert list(inspect.signature(AE._create_socket).parameters) == [
        "self",
        "assoc",
        "address",
        "tls_args",
    ]
    assert "self._create_socket(assoc, local_address, tls_args)" in _source(AE.associate)
    # AcceptingHandler repeats RequestHandler._create_association less its deepcopy
    original = _source(RequestHandler._create_association)
    for line in (
        "Association(self.ae, MODE_ACCEPTOR)",
        "assoc._server = self.server",
        "AssociationSocket(assoc, client_socket=self.request)",
        "assoc.acceptor.maximum_length = self.ae.maximum_pdu_size",
        "assoc.acceptor.ae_title = self.server.ae_title",
        "assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid",
        "assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)",
        "assoc.requestor.address_info = self.remote",
        "for event in self.server._handlers:",
    ):
        assert line in original, f"RequestHandler._create_association changed: {line!r}"
    assert original.count("assoc.") == 12, "RequestHandler._create_association sets more now"
    assert "assoc = self._create_association()" in _source(RequestHandler.handle)
    assert MODE_ACCEPTOR != MODE_REQUESTOR


def test_negotiation_only_reads_the_supported_contexts() -> None:
    from pynetdicom import presentation

    source = _source(presentation.negotiate_as_acceptor)
    assert "ac_context.transfer_syntax" in source
    assert "ac_context.transfer_syntax =" not in source and "ac_context._" not in source


def test_negotiation_is_one_method_we_can_wrap() -> None:
    """check_before_negotiation wraps ACSE._negotiate_as_acceptor: it must still be a method of
    no arguments that the acceptor side calls through ``self`` (so the instance attribute wins)."""
    from pynetdicom.acse import ACSE

    assert list(inspect.signature(ACSE._negotiate_as_acceptor).parameters) == ["self"]
    assert "self._negotiate_as_acceptor()" in _source(ACSE.negotiate_association)
    assert callable(ACSE.send_reject)


def test_dul_queues_state_and_socket() -> None:
    dul_source = _source(DULServiceProvider)
    for name in (
        "self.to_provider_queue",
        "self.to_user_queue",
        "self._run_loop_delay",
        "self.event_queue",
        "self.socket.ready",
        "time.sleep(self._run_loop_delay)",
        "self.to_provider_queue.queue[0]",  # peeked: our queue keeps .queue
        "self.socket.recv(6)",
        "self.socket.recv(pdu_length)",
    ):
        assert name in dul_source, f"DULServiceProvider no longer has {name!r}"
    assert "dul.to_provider_queue.get(False)" in _source(pynetdicom_fsm.DT_1)
    assert "dul._send(P_DATA_TF(primitive))" in _source(pynetdicom_fsm.DT_1)
    assert "self.socket.send(pdu.encode())" in _source(DULServiceProvider._send)
    assert "Sta6" in _source(pynetdicom_fsm)  # the data transfer state's name
    socket_source = _source(AssociationSocket)
    for name in ("def ready(self)", "def send(self, bytestream", "def recv(self, nr_bytes"):
        assert name in socket_source, f"AssociationSocket.{name} changed"
    assert isinstance(AssociationSocket.ready, property)
    assert "self._is_connected" in socket_source and "self.event_queue" in socket_source


def test_dimse_provider_and_messages() -> None:
    dimse_source = _source(DIMSEServiceProvider)
    for name in (
        "def get_msg(self, block: bool = False)",
        "self.msg_queue.get(block=block, timeout=self.dimse_timeout)",
        "def receive_primitive(self, primitive",
        "def send_msg(self, primitive",
        "self.message.message_to_primitive()",
        "self.msg_queue.put((context_id, cast(DimseServiceType, d_primitive)))",
        "self.dul.send_pdu(pdata)",
        "def maximum_pdu_size(self)",
    ):
        assert name in dimse_source, f"DIMSEServiceProvider changed: {name!r}"
    message = C_STORE_RQ()
    for name in ("_data_set_file", "_data_set_path", "data_set", "command_set", "context_id"):
        assert hasattr(message, name), f"DIMSEMessage.{name} is gone"
    encode = _source(DIMSEMessage.encode_msg)
    assert "self._data_set_path" in encode and "f.read(max_pdu_length - 6)" in encode
    assert 'getattr(primitive, "_dataset_path", None)' in _source(DIMSEMessage.primitive_to_message)
    to_primitive = _source(DIMSEMessage.message_to_primitive)
    assert "primitive._dataset_path = self._data_set_path" in to_primitive
    assert "primitive._dataset_file = self._data_set_file" in to_primitive
    request = C_STORE()
    assert request.is_valid_request is False  # nothing set: what we answer 0xC000
    assert _config.STORE_SEND_CHUNKED_DATASET is False  # process-wide: not used


def test_association_internals() -> None:
    source = _source(Association)
    for name in (
        "self._reactor_checkpoint",
        "self._is_paused",
        "def _check_received_status(self",
        "def _handle_no_response(self)",
        "def _serve_request(self, msg",
        "if not msg.is_valid_request:",
        "self._serve_request(msg, cast(int, context_id))",
        "context_id, msg = self.dimse.get_msg(block=False)",
        "self.acse.is_release_requested()",
    ):
        assert name in source, f"Association changed: {name!r}"
    ae = AE()
    assoc = Association(ae, MODE_ACCEPTOR)
    assert isinstance(assoc._reactor_checkpoint, threading.Event)
    assert isinstance(assoc.dimse.msg_queue, queue.Queue)
    assert isinstance(assoc.dul.to_user_queue, queue.Queue)
    assert isinstance(assoc.dul.to_provider_queue, queue.Queue)
    assert callable(assoc.run)
    # the standard log handlers are bound by default (so unbinding them does something)
    bound = {handler for event in (evt.EVT_PDU_SENT,) for handler in assoc.get_handlers(event)}
    assert any(_handlers.standard_pdu_sent_handler in entry for entry in bound)


def test_the_reactor_we_replace() -> None:
    """_serve_until_ended does what Association._run_reactor does, less its 1 ms sleep."""
    source = _source(Association._run_reactor)
    for step in (
        "time.sleep(0.001)",  # what the replacement exists to remove
        "self._reactor_checkpoint.wait()",
        "context_id, msg = self.dimse.get_msg(block=False)",
        "self._serve_request(msg, cast(int, context_id))",
        "self.is_established and self.acse.is_release_requested()",
        "self.acse.send_release(is_response=True)",
        "self.is_released = True",
        "evt.trigger(self, evt.EVT_RELEASED, {})",
        "if self.acse.is_aborted():",
        "self.dul.receive_pdu(wait=False)",
        "evt.trigger(self, evt.EVT_ABORTED, {})",
        "if not self.dul.is_alive():",
        "if self.dul.idle_timer_expired():",
        'if self.network_timeout_response == "A-RELEASE":',
        "self.kill()",
    ):
        assert step in source, f"Association._run_reactor changed: {step!r}"
    assert source.count("self.kill()") == 4, "Association._run_reactor ends in new ways"
    assert "self._run_reactor()" in _source(Association.run_reactor)
    assert "while self.dul.is_alive() and not self.dul.stop_dul():" in _source(Association.kill)
    stop = _source(DULServiceProvider.stop_dul)
    assert 'self.state_machine.current_state == "Sta1"' in stop
    assert "self._kill_thread = True" in stop and "while self.is_alive():" in stop
    assert "if self._kill_thread:" in _source(DULServiceProvider.run_reactor)
    assert hasattr(Association(AE(), MODE_ACCEPTOR), "network_timeout_response")


def test_what_driving_the_dul_inline_relies_on() -> None:
    """_drive_inline and _pump do, in the association's thread, what the DUL thread does."""
    loop = _source(DULServiceProvider.run_reactor)
    for step in (
        "if self.artim_timer.expired:",
        'self.event_queue.put("Evt18")',
        "if self._process_recv_primitive():",
        "elif self._is_transport_event():",
        "self._idle_timer.restart()",
        "event = self.event_queue.get(block=False)",
        "self.state_machine.do_action(event)",
        "self._idle_timer.start()",
    ):
        assert step in loop, f"DULServiceProvider.run_reactor changed: {step!r}"
    transport = _source(DULServiceProvider._is_transport_event)
    assert "self.socket.ready" in transport and "self._read_pdu_data()" in transport
    assert "self.to_provider_queue.queue[0]" in _source(DULServiceProvider._process_recv_primitive)
    receive = _source(DULServiceProvider.receive_pdu)
    assert "self.to_user_queue.get(block=wait, timeout=timeout)" in receive
    assert "self.to_user_queue.queue[0]" in _source(DULServiceProvider.peek_next_pdu)
    assert "dul.kill_dul()" in _source(pynetdicom_fsm)  # how the state machine ends the DUL
    # an A-ABORT request where PS3.8 has no action for it becomes an ARTIM expiry (AA-2)
    table = pynetdicom_fsm.TRANSITION_TABLE
    assert [state for state in ("Sta1", "Sta2", "Sta13") if ("Evt15", state) in table] == []
    assert table[("Evt18", "Sta2")] == table[("Evt18", "Sta13")] == table[("Evt15", "Sta4")]
    assert table[("Evt15", "Sta4")] == "AA-2"
    assert "self._kill_thread = True" in _source(DULServiceProvider.kill_dul)
    reactor = _source(Association.run_reactor)
    for step in (
        "if not self._started_dul:",
        "self.dul.start()",
        "self._dul_ready.wait()",
        "primitive = self.dul.receive_pdu(wait=True, timeout=self.acse_timeout)",
        "self._server.shutdown_request(sock.socket)",
    ):
        assert step in reactor, f"Association.run_reactor changed: {step!r}"
    assoc = Association(AE(), MODE_ACCEPTOR)
    dul = assoc.dul
    for name in ("artim_timer", "_idle_timer", "event_queue", "state_machine", "_kill_thread"):
        assert hasattr(dul, name), f"DULServiceProvider.{name} is gone"
    assert isinstance(assoc._dul_ready, threading.Event)
    assert assoc._started_dul is False
    assert "self.socket.recv(6)" in _source(DULServiceProvider._read_pdu_data)
    # the request handler's local address, resolved once per server and copied
    assert isinstance(RequestHandler.local, property)


def test_the_server_hands_each_connection_to_a_thread() -> None:
    """NodeServer.process_request (node/ae.py) calls finish_request itself for plain TCP."""
    import socketserver

    from pynetdicom.transport import ThreadedAssociationServer

    assert ThreadedAssociationServer.process_request is socketserver.ThreadingMixIn.process_request
    assert "self.finish_request(request, client_address)" in _source(
        ThreadedAssociationServer.process_request_thread
    )
    assert "assoc.start()" in _source(RequestHandler.handle)


def test_identifier_logging_switch() -> None:
    from pynetdicom import service_class

    assert isinstance(_config.LOG_REQUEST_IDENTIFIERS, bool)
    find = _source(service_class.QueryRetrieveServiceClass._c_find_scp)
    assert "if _config.LOG_REQUEST_IDENTIFIERS:" in find
    assert "pretty_dataset(identifier)" in find


def test_the_server_collects_garbage_between_requests() -> None:
    """NodeServer.service_actions (node/ae.py) drops this forced collection."""
    from pynetdicom.transport import AssociationServer

    assert "gc.collect()" in _source(AssociationServer.service_actions)


def test_store_response_fields_decoded_directly() -> None:
    """decode_store_responses sets a C-STORE-RSP's UIDs past their validating setters and hands
    the primitive to the waiting sender on the DIMSE queue, as pynetdicom's decoder does."""
    response = C_STORE()
    response._affected_sop_class_uid = "1.2.3"
    response._affected_sop_instance_uid = "1.2.3.4"
    response._context_id = 5
    assert response.AffectedSOPClassUID == "1.2.3"
    assert response.AffectedSOPInstanceUID == "1.2.3.4"
    assert "self.msg_queue.put((context_id" in _source(DIMSEServiceProvider.receive_primitive)
    assert "self.message = None" in _source(DIMSEServiceProvider.receive_primitive)
    assert "primitive._context_id = self.context_id" in _source(DIMSEMessage.message_to_primitive)


def test_what_the_sender_and_the_reactor_rely_on() -> None:
    """pynetdicom's reactor drops a response it takes (leave_responses_to_senders puts it
    back); _status_of answers for _check_received_status when the optional elements are absent."""
    assoc = Association(AE(), MODE_REQUESTOR)
    assert callable(assoc.send_c_store) and assoc.is_requestor
    serve = _source(Association._serve_request)
    assert 'LOGGER.warning(f"Received unexpected {msg.msg_type} service message")' in serve
    assert C_STORE.STATUS_OPTIONAL_KEYWORDS == ("OffendingElement", "ErrorComment")
    checked = _source(Association._check_received_status)
    assert "status.Status = rsp.Status" in checked


def test_retrieve_services_ask_for_a_count_first() -> None:
    """Why ``screen_requests`` exists: a C-GET handler's first yield is taken as the count and
    an exception there is answered by pynetdicom (0xC413 with a logged traceback); the screen
    goes through ``_serve_request`` (checked above) before that."""
    from pynetdicom.service_class import QueryRetrieveServiceClass

    get_scp = _source(QueryRetrieveServiceClass._get_scp)
    assert "nr_suboperations = int(next(generator))" in get_scp
    move_scp = _source(QueryRetrieveServiceClass._move_scp)
    assert "destination: DestinationType = next(generator)" in move_scp
    assert "def _serve_request(self, msg" in _source(Association)


def test_a_failed_move_association_is_answered_a801_through_send_msg() -> None:
    """What ``on_move_association_failed`` catches: when the association with a destination the
    handler yielded is not established, pynetdicom's C-MOVE SCP sends one final 0xA801 through
    the requesting association's ``dimse.send_msg`` (a ``C_MOVE`` primitive with
    ``MessageIDBeingRespondedTo``), the same status as for no destination at all."""
    from pynetdicom.dimse_primitives import C_MOVE
    from pynetdicom.service_class import QueryRetrieveServiceClass

    move_scp = _source(QueryRetrieveServiceClass._move_scp)
    failed = move_scp.split("if not store_assoc.is_established:")[1].split("return")[0]
    assert "rsp.Status = 0xA801" in failed and "self.dimse.send_msg(rsp, cx_id)" in failed
    assert "rsp.MessageIDBeingRespondedTo = req.MessageID" in move_scp
    assert internals.MOVE_DESTINATION_UNKNOWN == 0xA801
    response = C_MOVE()
    response.ErrorComment = "x" * 64
    response.NumberOfFailedSuboperations = 1
    assert "def send_msg(self, primitive" in _source(DIMSEServiceProvider)


@pytest.mark.parametrize(
    "name",
    [
        "standard_dimse_recv_handler",
        "standard_dimse_sent_handler",
        "standard_pdu_recv_handler",
        "standard_pdu_sent_handler",
    ],
)
def test_standard_log_handlers(name: str) -> None:
    assert callable(getattr(_handlers, name))


def test_module_names_what_it_uses() -> None:
    """The one module: no other module of the package imports pynetdicom's private parts."""
    import pathlib

    root = pathlib.Path(internals.__file__).resolve().parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "pynetdicom_internals.py" or ".venv" in path.parts:
            continue
        if "tests" in path.parts or "bench" in path.parts:
            continue
        text = path.read_text()
        if "pynetdicom._" in text or "from pynetdicom import _" in text:
            offenders.append(str(path.relative_to(root)))
        # a private attribute of pynetdicom's objects (ACSE, DUL, DIMSE, the association)
        if re.search(r"\b(acse|dul|dimse)\._[a-z]|\bassoc\._(?!node_)[a-z]", text):
            offenders.append(f"{path.relative_to(root)} (private attribute)")
    assert not offenders, offenders


def test_what_serving_c_find_directly_replaces() -> None:
    """serve_find_requests answers a C-FIND as pynetdicom's service class would: it relies on
    _serve_request's context table, release flag, pause and per-request C-CANCEL table, and
    repeats _c_find_scp's statuses (0xC311 handler failed, 0xC312 no identifier)."""
    from pynetdicom.service_class import QueryRetrieveServiceClass

    serve = _source(Association._serve_request)
    for name in (
        "if self._sent_release:",
        "context = self._accepted_cx[context_id]",
        "self.dimse.cancel_req = {}",
        "self._is_paused = True",
        "service_class.SCP(msg, context)",
    ):
        assert name in serve, f"Association._serve_request changed: {name!r}"
    find_scp = _source(QueryRetrieveServiceClass._c_find_scp)
    for name in (
        "ctx.error_status = 0xC311",
        "rsp.Status = 0xC312",
        '"_is_cancelled": self.is_cancelled',
        "rsp.Status = 0x0000",
    ):
        assert name in find_scp, f"QueryRetrieveServiceClass._c_find_scp changed: {name!r}"
    cancelled = _source(QueryRetrieveServiceClass.is_cancelled)
    assert "del self.dimse.cancel_req[msg_id]" in cancelled
    assoc = Association(AE(), MODE_ACCEPTOR)
    assert assoc._accepted_cx == {} and assoc._sent_release is False
    assert assoc.dimse.cancel_req == {}


def test_c_find_requests_decoded_directly_are_pynetdicoms() -> None:
    """decode_find_requests replaces DIMSEMessage for whole C-FIND-RQ command sets: it relies
    on receive_primitive making a message only when none is in progress and triggering
    EVT_DIMSE_RECV for it, and makes the primitive pynetdicom's message_to_primitive makes."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_FIND_RQ
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.dsutils import encode

    receive = _source(DIMSEServiceProvider.receive_primitive)
    for name in (
        "if self.message is None:",
        "evt.trigger(self.assoc, evt.EVT_DIMSE_RECV",
        "self.msg_queue.put((context_id, cast(DimseServiceType, d_primitive)))",
        "self.message = None",
    ):
        assert name in receive, f"DIMSEServiceProvider.receive_primitive changed: {name!r}"
    sent = C_FIND()
    sent.MessageID, sent.Priority = 513, 2
    sent.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    sent.Identifier = BytesIO(b"\x08\x00\x52\x00\x00\x00\x00\x00")  # QueryRetrieveLevel
    message = C_FIND_RQ()
    message.primitive_to_message(sent)
    command = encode(message.command_set, True, True)
    assert command is not None
    ours = internals._find_request(command)
    assert ours is not None and ours.is_valid_request is False  # the identifier comes next
    theirs = message.message_to_primitive()
    for keyword in ("MessageID", "Priority", "AffectedSOPClassUID"):
        assert getattr(ours, keyword) == getattr(theirs, keyword), keyword
    assert isinstance(ours.AffectedSOPClassUID, type(theirs.AffectedSOPClassUID))
    # anything but a C-FIND-RQ of those elements is left to pynetdicom
    other = C_FIND_RQ()
    other.primitive_to_message(sent)
    other.command_set.CommandField = 0x0021  # C-MOVE-RQ
    assert internals._find_request(encode(other.command_set, True, True) or b"") is None


@pytest.mark.parametrize("bad", [b"1.2.3.\xe9", b"1.2." + b"9" * 80, b"1.2.abc", b"1.2\\3"])
def test_command_uids_are_judged_raw_and_refused_requests_are_invalid(
    bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # pynetdicom decodes a command set into raw elements (DIMSEMessage.decode_msg) and reads
    # their values only in message_to_primitive: refuse_invalid_command_uids runs between the
    # two, reads them raw (no pydicom warning: filterwarnings = error) and empties the bad one,
    # which leaves a request pynetdicom calls invalid (answer_invalid_store_requests answers it)
    caplog.set_level(logging.WARNING)
    assert "self.command_set = decode(self.encoded_command_set, True, True)" in _source(
        DIMSEMessage.decode_msg
    )
    ct = b"1.2.840.10008.5.1.4.1.1.2\x00"
    message = C_STORE_RQ()
    message.command_set = decode(BytesIO(store_request(ct, bad, message_id=7)), True, True)
    message.context_id = 1
    reason = internals.refuse_invalid_command_uids(message.command_set)
    assert reason is not None and reason.startswith("Affected SOP Instance UID ")
    primitive = message.message_to_primitive()
    assert primitive.MessageID == 7
    assert primitive.is_valid_request is False
    assert not caplog.records, [r.getMessage()[:100] for r in caplog.records]
    good = decode(BytesIO(store_request(ct, b"1.2.3.4\x00", message_id=8)), True, True)
    assert internals.refuse_invalid_command_uids(good) is None
