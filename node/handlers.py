"""Event handlers of the node's AE: thin adapters from a pynetdicom event to the archive and back.

Each handler does one thing and raises the node's exceptions; :func:`node.status.dimse_service`
turns them into statuses. C-STORE never decodes the dataset: the bytes pynetdicom received
(``event.encoded_dataset()``, a Part 10 file) go straight to :meth:`Archive.ingest`, and success is
answered only once the file and its index rows are committed (PS3.4 B.2.3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import evt

from core.errors import InvalidRequest
from node.contexts import FIND_MODELS, GET_MODELS, MOVE_MODELS
from node.status import CANCEL, PENDING, SUCCESS, dimse_service
from pipeline.dispatch import NODELAY_HANDLERS, set_tcp_nodelay, storage_contexts
from pipeline.routing import RoutingTable
from storage.archive import Archive

LOGGER = logging.getLogger(__name__)

# PS3.4 C.6.1.1 / C.6.2.1: the unique key of each level, per information model.
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
LEVELS = {"PATIENT": ("PATIENT", "STUDY", "SERIES", "IMAGE"), "STUDY": ("STUDY", "SERIES", "IMAGE")}


def called_ae_title(assoc: Any) -> str:
    """The AE title the peer called (A-ASSOCIATE-RQ), which may differ from ours."""
    primitive = getattr(assoc.requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", None) or assoc.acceptor.ae_title
    return str(called).strip()


def retrieve_level(identifier: Dataset, model: str) -> str:
    """The Query/Retrieve Level of a request, checked against the information model."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
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


class NodeHandlers:
    """The handlers bound to the node's server; one instance per AE."""

    def __init__(self, archive: Archive, routing: RoutingTable, *, max_pdu: int) -> None:
        self.archive = archive
        self.routing = routing
        self.max_pdu = max_pdu

    def bindings(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
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

    @dimse_service("C-STORE")
    def on_store(self, event: evt.Event) -> int:
        self.archive.ingest(
            event.encoded_dataset(),
            source="dimse",
            calling_ae=str(event.assoc.requestor.ae_title),
            called_ae=called_ae_title(event.assoc),
        )
        return SUCCESS

    @dimse_service("C-FIND")
    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        model = FIND_MODELS[str(event.request.AffectedSOPClassUID)]
        identifier = event.identifier
        level = retrieve_level(identifier, model)
        from storage import query  # TEMP until storage/query.py lands

        with self.archive.session_factory() as session:
            matches = query.find_for_cfind(session, level, identifier)
        for dataset in matches:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, dataset

    def _files(self, identifier: Dataset, model: str) -> list[Path]:
        level = retrieve_level(identifier, model)
        uids = retrieve_uids(identifier, level)
        from storage import query  # TEMP until storage/query.py lands

        with self.archive.session_factory() as session:
            return [Path(p) for p in query.instance_paths(session, level, uids, self.archive.root)]

    @dimse_service("C-MOVE")
    def on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = self.routing.destination_by_ae(str(event.move_destination))
        if destination is None:
            LOGGER.warning(
                "C-MOVE to %r refused: not one of the spec's destinations", event.move_destination
            )
            yield None, None  # pynetdicom answers 0xA801 Move destination unknown
            return
        model = MOVE_MODELS[str(event.request.AffectedSOPClassUID)]
        files = self._files(event.identifier, model)
        metas = [read_file_meta_info(path) for path in files]
        contexts = storage_contexts(
            (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas
        )
        yield (
            destination.host,
            destination.port,
            {"contexts": contexts, "evt_handlers": NODELAY_HANDLERS, "max_pdu": self.max_pdu},
        )
        yield len(files)
        yield from self._sub_operations(event, files)

    @dimse_service("C-GET")
    def on_get(self, event: evt.Event) -> Iterator[Any]:
        model = GET_MODELS[str(event.request.AffectedSOPClassUID)]
        files = self._files(event.identifier, model)
        yield len(files)
        yield from self._sub_operations(event, files)

    @staticmethod
    def _sub_operations(event: evt.Event, files: list[Path]) -> Iterator[Any]:
        for path in files:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, pydicom.dcmread(path)
