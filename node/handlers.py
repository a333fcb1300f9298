"""Event handlers of the node's AE: thin adapters from a pynetdicom event to the archive and back.

Each handler does one thing and raises the node's exceptions; :func:`node.status.dimse_service`
turns them into statuses. C-STORE never decodes the dataset: its bytes stream into an archive
temporary file while they arrive (:meth:`NodeHandlers.open_store_sink`, node/transport.py), and the
handler files it (:meth:`Archive.ingest_incoming`); a dataset that could not stream (pynetdicom
gathered it in memory) goes to :meth:`Archive.ingest` as a Part 10 file. Success is answered only
once the file and its index rows are committed (PS3.4 B.2.3).
"""

from __future__ import annotations

import io
import logging
import os
import ssl
from collections.abc import Iterator
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from sqlalchemy import Engine

from nnunet_node.core.errors import InvalidRequest
from nnunet_node.node.contexts import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    prefer_requested_syntaxes,
)
from nnunet_node.node.identifiers import encode_identifier, read_find_identifier
from nnunet_node.node.status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH,
    PENDING,
    SUCCESS,
    dimse_service,
    refused_before_handler,
)
from nnunet_node.pipeline.dispatch import NODELAY_HANDLERS, set_tcp_nodelay, storage_contexts
from nnunet_node.pipeline.pynetdicom_internals import (
    cancel_requested,
    incoming_file,
    on_move_association_failed,
)
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.pipeline.stored_send import StoredInstance
from nnunet_node.storage import query
from nnunet_node.storage.archive import Archive, IncomingFile
from nnunet_node.storage.part10 import part10_head

LOGGER = logging.getLogger(__name__)

# PS3.4 C.6.1.1 / C.6.2.1: the unique key of each level, per information model.
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
LEVELS = {"PATIENT": ("PATIENT", "STUDY", "SERIES", "IMAGE"), "STUDY": ("STUDY", "SERIES", "IMAGE")}


REFUSED_SUB_OPERATIONS = 0xA702
"""C-MOVE: Refused: Out of Resources - Unable to perform sub-operations (PS3.4 C.4.2.1.5)."""


class _AssociationFailure:
    """What became of a C-MOVE's association with its destination, from its events: for the
    log line when it could not be established."""

    def __init__(self) -> None:
        self.connected = False
        self.ended: str | None = None
        self.handlers = [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_ABORTED, self._aborted),
        ]

    def _opened(self, _: evt.Event) -> None:
        self.connected = True

    def _rejected(self, _: evt.Event) -> None:
        self.ended = "association rejected"

    def _aborted(self, _: evt.Event) -> None:
        self.ended = "association aborted"

    def reason(self) -> str:
        """Why there is no association, in a few words (for the Error Comment and the log)."""
        if not self.connected:
            return "no connection"
        return self.ended or "the association was not accepted"


def _refuse_sub_operations(
    response: C_MOVE, context: Any, refs: list[query.InstanceRef], comment: str
) -> None:
    """Make ``response`` the final C-MOVE-RSP of a request none of whose sub-operations could be
    performed (PS3.4 C.4.2.3.1: the association with the destination could not be made):
    0xA702 Refused: Out of Resources - Unable to perform sub-operations, every one failed, an
    Error Comment (LO: 64 characters at most, PS3.7 C.4), and the Failed SOP Instance UID List
    as the Identifier (PS3.4 C.4.2.1.4.2), encoded in ``context``'s transfer syntax."""
    response.Status = REFUSED_SUB_OPERATIONS
    response.NumberOfRemainingSuboperations = None
    response.NumberOfFailedSuboperations = len(refs)
    response.NumberOfWarningSuboperations = 0
    response.NumberOfCompletedSuboperations = 0
    response.ErrorComment = comment[:64]  # type: ignore[assignment]
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = [ref.sop_instance_uid for ref in refs]
    syntax = context.transfer_syntax[0]
    encoded = encode(failed, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    response.Identifier = io.BytesIO(encoded or b"")


def called_ae_title(assoc: Any) -> str:
    """The AE title the peer called (A-ASSOCIATE-RQ), which may differ from ours."""
    primitive = getattr(assoc.requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", None) or assoc.acceptor.ae_title
    return str(called).strip()


def retrieve_level(identifier: Dataset, model: str) -> str:
    """The Query/Retrieve Level of a request, checked against the information model."""
    return checked_level(identifier.get("QueryRetrieveLevel", ""), model)


def checked_level(value: Any, model: str) -> str:
    """A Query/Retrieve Level value as sent, checked against the information model; raises
    :class:`InvalidRequest` (0xA900) for one the model does not have."""
    level = str(value or "").strip().upper()
    if level not in LEVELS[model]:
        raise InvalidRequest(
            f"QueryRetrieveLevel {level!r} is not one of {LEVELS[model]} "
            f"({model.title()} Root information model)"
        )
    return level


def retrieve_uids(identifier: Dataset, level: str) -> list[str]:
    """The unique keys a C-MOVE/C-GET names at ``level`` (a list of UIDs is allowed, C.4.2.2.1)."""
    keyword = UNIQUE_KEYS[level]
    value = identifier.get(keyword)
    if value is None or value == "":
        raise InvalidRequest(f"{keyword} is required to retrieve at the {level} level")
    values = value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
    uids = [str(v).strip() for v in values if str(v).strip()]
    if not uids or any("*" in u or "?" in u for u in uids):
        raise InvalidRequest(f"{keyword}: a retrieve names exact values, not {value!r}")
    return uids


def _single(identifier: Dataset, keyword: str) -> str | None:
    value = identifier.get(keyword)
    text = str(value).strip() if isinstance(value, str) else ""
    return text or None


# Keys of an identifier that are not attributes to match (PS3.4 C.4.1.1.3.1).
_NOT_MATCHED = {"QueryRetrieveLevel", "SpecificCharacterSet"}


def query_keys(identifier: Dataset) -> tuple[list[str], dict[str, str]]:
    """The identifier's keys (to return) and its matching keys (keyword -> query value, an
    empty value meaning universal matching, PS3.4 C.2.2.2.3); private and sequence elements are
    returned empty and not matched on."""
    keys: list[str] = []
    matching: dict[str, str] = {}
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _NOT_MATCHED:
            continue
        keys.append(keyword)
        if element.VR == "SQ":
            continue
        value = element.value
        if value is None:
            matching[keyword] = ""
        elif isinstance(value, list | tuple | pydicom.multival.MultiValue):
            matching[keyword] = "\\".join(str(v) for v in value)
        else:
            matching[keyword] = str(value)
    return keys, matching


def _announce_sub_operations(event: evt.Event, count: int) -> Any:
    """An ``EVT_CONN_OPEN`` handler for a C-MOVE's association to its destination: as soon as
    the connection is made, and before the association is negotiated on it, tell the requester
    with a Pending C-MOVE-RSP how many sub-operations will follow (Number of Remaining
    Sub-operations, none completed yet; PS3.4 C.4.2.1.6, PS3.7 9.3.4.2).

    A requester that is also the destination has to accept that association while it waits for
    responses to its C-MOVE: dcmtk's movescu looks for an incoming association only between
    waits of up to a second on the C-MOVE's own association, so without a response there it
    notices the node's association up to a second late. A failure to send is logged and the
    C-MOVE goes on (the sub-operations' own Pending responses follow)."""
    request = event.request
    context_id = event.context.context_id
    requester = event.assoc

    def announce(_: evt.Event) -> None:
        if count <= 0 or not requester.is_established:
            return
        response = C_MOVE()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.Status = PENDING
        response.NumberOfRemainingSuboperations = count
        response.NumberOfCompletedSuboperations = 0
        response.NumberOfFailedSuboperations = 0
        response.NumberOfWarningSuboperations = 0
        try:
            requester.dimse.send_msg(response, context_id)
        except Exception as exc:  # the C-MOVE itself still runs and answers
            LOGGER.warning("C-MOVE: the first Pending response could not be sent: %s", exc)

    return announce


class NodeHandlers:
    """The handlers bound to the node's server; one instance per AE."""

    def __init__(
        self,
        archive: Archive,
        routing: RoutingTable,
        *,
        max_pdu: int,
        tls_client: ssl.SSLContext | None = None,
    ) -> None:
        self.archive = archive
        self.routing = routing
        self.max_pdu = max_pdu
        self.tls_client = tls_client
        """Context of C-MOVE sub-associations to peers declared with ``tls: true``."""
        self._reads: Engine = archive.read_sessions.kw["bind"]
        """The read-only engine C-FIND queries on (a pooled connection each, no ORM session)."""

    def bindings(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_REQUESTED, prefer_requested_syntaxes),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    def on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        LOGGER.warning(
            "association from %r at %s rejected (calling AE title not allowed, or too many)",
            requestor.ae_title,
            requestor.address,
        )

    @dimse_service("C-ECHO")
    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def open_store_sink(
        self, assoc: Any, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
    ) -> IncomingFile:
        """Where a C-STORE dataset streams to (node/transport.py): an archive temporary file
        that starts with the Part 10 head the dataset will need. Raises ValueError for UIDs
        that cannot head a file (the dataset is then gathered in memory and refused there)."""
        head = part10_head(
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax_uid,
            source_ae_title=str(assoc.requestor.ae_title),
            implementation_class_uid=str(assoc.acceptor.implementation_class_uid),
            implementation_version_name=str(assoc.acceptor.implementation_version_name or ""),
        )
        return self.archive.open_incoming(head)

    @dimse_service("C-STORE")
    def on_store(self, event: evt.Event) -> int:
        origin = {
            "source": "dimse",
            "calling_ae": str(event.assoc.requestor.ae_title),
            "called_ae": called_ae_title(event.assoc),
        }
        incoming = incoming_file(event.request)
        if isinstance(incoming, IncomingFile):
            self.archive.ingest_incoming(incoming, **origin)
        else:
            self.archive.ingest(event.encoded_dataset(), **origin)
        return SUCCESS

    @dimse_service("C-FIND")
    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """pynetdicom's EVT_C_FIND handler: each match as a Dataset (pynetdicom encodes it).
        The node's own associations use :meth:`find_encoded` instead."""
        for row, keys, level, charset in self._matches(event):
            if row is None:
                yield CANCEL, None
                return
            # In the requester's character set where it can hold the values, else UTF-8.
            response = query.to_dataset(row, keys, requested_charset=charset)
            response.QueryRetrieveLevel = level  # PS3.4 C.4.1.1.3.2
            yield PENDING, response

    @dimse_service("C-FIND")
    def find_encoded(self, event: evt.Event) -> Iterator[tuple[int, bytes | None]]:
        """:meth:`on_find` with each identifier encoded here in the context's transfer syntax
        (node/identifiers.py; pydicom's encoder where that one declines): the same bytes,
        without a Dataset per match (pipeline/pynetdicom_internals.serve_find_requests sends
        them)."""
        syntax = event.context.transfer_syntax
        implicit, little, deflated = (
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        )
        direct = little and not deflated
        for row, keys, level, charset in self._matches(event, read_directly=direct):
            if row is None:
                yield CANCEL, None
                return
            data = None
            if direct:
                data = encode_identifier(
                    row, keys, level, requested_charset=charset, implicit_vr=implicit
                )
            if data is None:
                response = query.to_dataset(row, keys, requested_charset=charset)
                response.QueryRetrieveLevel = level  # PS3.4 C.4.1.1.3.2
                data = encode(response, implicit, little, deflated)  # None: 0xC312
            yield PENDING, data

    def _matches(
        self, event: evt.Event, *, read_directly: bool = False
    ) -> Iterator[tuple[query.Row | None, list[str], str, Any]]:
        """The matches of a C-FIND request: (row, requested keys, level, requested Specific
        Character Set) each, and a row of None when the requester cancelled (C-CANCEL,
        PS3.7 9.3.2.3). Streamed: each match is answered as it is read (a query matching a
        million instances neither waits for nor holds them all); only the computed attributes
        asked for are counted. ``read_directly``: the identifier is read without pydicom where
        node/identifiers.py can (plain ASCII values in a little-endian syntax)."""
        model = FIND_MODELS[str(event.request.AffectedSOPClassUID)]
        found = None
        if read_directly:
            syntax = event.context.transfer_syntax
            if syntax.is_little_endian and not syntax.is_deflated:
                encoded = getattr(event.request, "Identifier", None)
                data = encoded.getvalue() if encoded is not None else b""
                found = read_find_identifier(data, implicit_vr=syntax.is_implicit_VR)
        if found is not None:
            level = checked_level(found.level, model)
            keys, matching, charset = found.keys, found.matching, found.charset
        else:
            identifier = event.identifier
            level = retrieve_level(identifier, model)
            keys, matching = query_keys(identifier)
            charset = identifier.get("SpecificCharacterSet")
        rows = query.iter_find(self._reads, level, matching, include=keys)
        try:
            for row in rows:
                if cancel_requested(event):
                    yield None, keys, level, charset
                    return
                yield row, keys, level, charset
        finally:
            rows.close()

    def _refs(self, identifier: Dataset, model: str) -> list[query.InstanceRef]:
        level = retrieve_level(identifier, model)
        uids = retrieve_uids(identifier, level)
        narrow: dict[str, str | None] = {}
        if level in ("SERIES", "IMAGE"):
            narrow["study_uid"] = _single(identifier, "StudyInstanceUID")
        if level == "IMAGE":
            narrow["series_uid"] = _single(identifier, "SeriesInstanceUID")
        with self.archive.read_sessions() as session:
            return query.instance_refs(session, level, uids, **narrow)

    def screen_request(self, assoc: Any, request: Any, context_id: int) -> Any:
        """The request screen of the node's associations (node/transport.py): a C-GET or C-MOVE
        whose identifier cannot be decoded, names no Query/Retrieve Level of its information
        model, or lacks the unique key of its level (PS3.4 C.4.2.2.1, C.4.3.2.1) is answered
        0xA900 Identifier does not match SOP Class, with an Error Comment and the Offending
        Element (PS3.4 C.4.2.1.5, C.4.3.1.4), before pynetdicom asks the handler for a count
        (it would log a traceback and answer 0xC5xx/0xC4xx). Returns that response, or None to
        serve the request."""
        response: C_GET | C_MOVE
        if type(request) is C_GET:
            service, models, response = "C-GET", GET_MODELS, C_GET()
        elif type(request) is C_MOVE:
            service, models, response = "C-MOVE", MOVE_MODELS, C_MOVE()
        else:
            return None
        model = models.get(str(request.AffectedSOPClassUID))
        if model is None:
            return None  # not a Query/Retrieve SOP Class of ours: pynetdicom refuses it
        offending: int | None = tag_for_keyword("QueryRetrieveLevel")
        try:
            context = next(cx for cx in assoc.accepted_contexts if cx.context_id == context_id)
            syntax = context.transfer_syntax[0]
            identifier = decode(
                request.Identifier,
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                syntax.is_deflated,
            )
            level = retrieve_level(identifier, model)
            offending = tag_for_keyword(UNIQUE_KEYS[level])
            retrieve_uids(identifier, level)
        except InvalidRequest as exc:
            reason = str(exc)
        except Exception as exc:  # whatever the decoder raises
            offending = None
            reason = f"the identifier cannot be decoded ({type(exc).__name__})"
        else:
            return None
        finally:
            if request.Identifier is not None:
                request.Identifier.seek(0)
        refused_before_handler(service, IDENTIFIER_DOES_NOT_MATCH, reason, assoc)
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.Status = IDENTIFIER_DOES_NOT_MATCH
        response.ErrorComment = reason[:64]  # type: ignore[assignment]  # LO (PS3.7 E.1)
        if offending is not None:
            response.OffendingElement = [offending]  # type: ignore[assignment]
        return response

    @dimse_service("C-MOVE")
    def on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = self.routing.destination_by_ae(str(event.move_destination))
        if destination is None:
            LOGGER.warning(
                "C-MOVE to %r refused (0xA801): not a declared peer with a port (the spec's "
                "destinations, and its peers given a port)",
                event.move_destination,
            )
            yield None, None  # pynetdicom answers 0xA801 Move destination unknown
            return
        model = MOVE_MODELS[str(event.request.AffectedSOPClassUID)]
        refs = self._refs(event.identifier, model)
        contexts = storage_contexts((r.sop_class_uid, r.transfer_syntax_uid) for r in refs)
        announce = _announce_sub_operations(event, len(refs))
        failure = _AssociationFailure()
        association: dict[str, Any] = {
            "contexts": contexts,
            "evt_handlers": [*NODELAY_HANDLERS, (evt.EVT_CONN_OPEN, announce), *failure.handlers],
            "max_pdu": self.max_pdu,
        }
        if destination.tls and self.tls_client is not None:
            association["tls_args"] = (self.tls_client, destination.host)
        where = f"{destination.ae_title} ({destination.host}:{destination.port})"

        def refuse(response: C_MOVE, context: Any) -> None:
            reason = f"no association with {where}: {failure.reason()}"
            _refuse_sub_operations(response, context, refs, reason)
            LOGGER.warning(
                "C-MOVE refused 0x%04X: %s; its %d sub-operation(s) failed",
                REFUSED_SUB_OPERATIONS,
                reason,
                len(refs),
            )

        on_move_association_failed(event, refuse)
        yield destination.host, destination.port, association
        yield len(refs)
        yield from self._sub_operations(event, refs, str(event.assoc.requestor.ae_title).strip())

    @dimse_service("C-GET")
    def on_get(self, event: evt.Event) -> Iterator[Any]:
        model = GET_MODELS[str(event.request.AffectedSOPClassUID)]
        refs = self._refs(event.identifier, model)
        yield len(refs)
        yield from self._sub_operations(event, refs)

    def _sub_operations(
        self, event: evt.Event, refs: list[query.InstanceRef], move_originator: str | None = None
    ) -> Iterator[Any]:
        """One C-STORE sub-operation per file (PS3.4 C.4.2.3, C.4.3.3), sent from the file as
        stored (pipeline/stored_send.py); ``move_originator`` is the AE title that asked for a
        C-MOVE."""
        root = f"{self.archive.root}{os.sep}"  # a str join: Path's costs ~20 us per instance
        for ref in refs:
            if cancel_requested(event):
                yield CANCEL, None
                return
            yield (
                PENDING,
                StoredInstance(
                    root + ref.path,
                    ref.sop_class_uid,
                    ref.sop_instance_uid,
                    ref.transfer_syntax_uid,
                    move_originator_aet=move_originator,
                ),
            )
