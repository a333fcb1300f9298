"""C-FIND responses as the node writes them (node/transport.py: command sets encoded directly,
a pending response's command and identifier in one write, the reactor of
pipeline/pynetdicom_internals.py) are exactly what pynetdicom's own encoder sends, for every
level and for requesters whose maximum PDU splits an identifier into fragments."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from nnunet_node.core.settings import Settings
from nnunet_node.node.ae import DicomNode
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.storage.archive import Archive
from tests.node.raw_dimse import RawAssociation, command_set
from tests.support.dcmtk import storescu
from tests.support.dimse import NodeFactory


@dataclass
class Nodes:
    ours: DicomNode
    pynetdicom: DicomNode
    """The same archive served by pynetdicom's own reactor and encoder (event_driven=False)."""
    study_uid: str
    series_uid: str
    count: int


@pytest.fixture
def nodes(
    start_node: NodeFactory, settings: Settings, archive: Archive, phantom_series: list[Path]
) -> Iterator[Nodes]:
    ours = start_node()
    storescu(ours.port, phantom_series[0].parent)
    plain = DicomNode(
        settings, archive, RoutingTable.from_spec({}), host="127.0.0.1", port=0, event_driven=False
    )
    plain.start()
    first = pydicom.dcmread(phantom_series[0], stop_before_pixels=True)
    yield Nodes(ours, plain, first.StudyInstanceUID, first.SeriesInstanceUID, len(phantom_series))
    plain.stop()


@dataclass
class Response:
    command: Dataset
    data_set: bytes


def _find(
    port: int, identifier: Dataset, max_pdu: int, syntax: str = ImplicitVRLittleEndian
) -> tuple[list[Response], list[int]]:
    """Every C-FIND-RSP message (command set decoded, data set as received) and the length of
    every P-DATA-TF PDU the node sent, for a requester whose maximum PDU is ``max_pdu`` and
    that proposes one transfer ``syntax``."""
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, [syntax])
    responses: list[Response] = []
    pdu_lengths: list[int] = []

    def on_message(event: Any) -> None:
        message = event.message
        data = message.data_set.getvalue() if message.data_set is not None else b""
        responses.append(Response(message.command_set, data))

    def on_pdu(event: Any) -> None:
        if event.pdu.__class__.__name__ == "P_DATA_TF":
            pdu_lengths.append(len(event.pdu.encode()))

    handlers = [(evt.EVT_DIMSE_RECV, on_message), (evt.EVT_PDU_RECV, on_pdu)]
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="NNUNET_NODE", max_pdu=max_pdu, evt_handlers=handlers
    )
    assert assoc.is_established
    statuses = list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert statuses and statuses[-1][0].Status == 0x0000
    return responses, pdu_lengths


def _identifier(level: str, nodes: Nodes) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.PatientName = "*"
    ds.PatientID = ""
    ds.StudyInstanceUID = nodes.study_uid if level != "STUDY" else ""
    ds.StudyDescription = ""
    if level == "STUDY":
        ds.ModalitiesInStudy = ""
        ds.SOPClassesInStudy = ""
        ds.NumberOfStudyRelatedSeries = None
        ds.NumberOfStudyRelatedInstances = None
    else:
        ds.SeriesInstanceUID = nodes.series_uid if level == "IMAGE" else ""
        ds.Modality = ""
        ds.SeriesNumber = None
        ds.NumberOfSeriesRelatedInstances = None
    if level == "IMAGE":
        ds.SOPInstanceUID = ""
        ds.SOPClassUID = ""
        ds.InstanceNumber = None
    return ds


@pytest.mark.parametrize("max_pdu", [0, 16384, 128])
@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_find_responses_are_what_pynetdicom_would_send(
    nodes: Nodes, level: str, max_pdu: int
) -> None:
    identifier = _identifier(level, nodes)
    ours, our_pdus = _find(nodes.ours.port, identifier, max_pdu)
    theirs, _ = _find(nodes.pynetdicom.port, identifier, max_pdu)
    expected = {"STUDY": 1, "SERIES": 1, "IMAGE": nodes.count}[level]
    assert len(ours) == expected + 1  # the pending responses and the final one
    assert [r.data_set for r in ours] == [r.data_set for r in theirs]
    for mine, pynetdicom_s in zip(ours, theirs, strict=True):
        assert mine.command == pynetdicom_s.command
    assert [r.command.Status for r in ours] == [0xFF00] * expected + [0x0000]
    assert [r.command.CommandDataSetType for r in ours] == [0x0001] * expected + [0x0101]
    if max_pdu:
        # PS3.8 D.1: the Maximum Length is that of a PDU's variable field (its 6-byte header aside)
        assert max(our_pdus) <= max_pdu + 6
    if max_pdu == 128:
        # a command PDU per message, and each identifier in at least two fragments
        assert len(our_pdus) >= len(ours) + 2 * expected


@pytest.mark.parametrize("level", ["STUDY", "IMAGE"])
def test_explicit_vr_identifiers_are_what_pynetdicom_would_send(nodes: Nodes, level: str) -> None:
    """The node encodes each identifier itself (node/identifiers.py), in the negotiated
    transfer syntax: Explicit VR Little Endian too."""
    identifier = _identifier(level, nodes)
    ours, _ = _find(nodes.ours.port, identifier, 16384, ExplicitVRLittleEndian)
    theirs, _ = _find(nodes.pynetdicom.port, identifier, 16384, ExplicitVRLittleEndian)
    assert len(ours) == {"STUDY": 1, "IMAGE": nodes.count}[level] + 1
    assert [r.data_set for r in ours] == [r.data_set for r in theirs]
    found = decode(io.BytesIO(ours[0].data_set), False, True)
    assert found.StudyInstanceUID == nodes.study_uid and found.QueryRetrieveLevel == level


def test_find_returns_the_computed_attributes_asked_for(nodes: Nodes) -> None:
    ours, _ = _find(nodes.ours.port, _identifier("STUDY", nodes), 16384)
    found = decode(io.BytesIO(ours[0].data_set), True, True)
    assert found.StudyInstanceUID == nodes.study_uid
    assert found.ModalitiesInStudy == "CT"
    assert found.SOPClassesInStudy == CTImageStorage
    assert found.NumberOfStudyRelatedSeries == 1
    assert found.NumberOfStudyRelatedInstances == nodes.count
    series, _ = _find(nodes.ours.port, _identifier("SERIES", nodes), 16384)
    found = decode(io.BytesIO(series[0].data_set), True, True)
    assert (found.SeriesInstanceUID, found.Modality) == (nodes.series_uid, "CT")
    assert found.NumberOfSeriesRelatedInstances == nodes.count
    assert "ModalitiesInStudy" not in found  # not asked for at this level: not computed


def _statuses(port: int, identifier: bytes, fragment: int = 16384) -> list[int]:
    association = RawAssociation.open(
        port, StudyRootQueryRetrieveInformationModelFind, ImplicitVRLittleEndian
    )
    try:
        request = command_set(
            [
                (0x0002, b"1.2.840.10008.5.1.4.1.2.2.1\x00"),
                (0x0100, struct.pack("<H", 0x0020)),  # C-FIND-RQ
                (0x0110, struct.pack("<H", 7)),
                (0x0700, struct.pack("<H", 0)),
                (0x0800, struct.pack("<H", 0x0001)),
            ]
        )
        association.send_message(request, identifier, fragment)
        statuses = [association.read_status()]
        while statuses[-1] in (0xFF00, 0xFF01):
            statuses.append(association.read_status())
        return statuses
    finally:
        association.release()


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


@pytest.mark.parametrize(
    ("identifier", "expected"),
    [
        (_implicit(0x00080052, b"FRAME "), [0xA900]),  # no such level
        (_implicit(0x00080052, b"STUDY ")[:-3], [0xA900]),  # truncated: reads as "STU"
        (  # a sequence key of undefined length: pydicom reads it, every study matches
            _implicit(0x00080052, b"STUDY ")
            + struct.pack("<HHI", 0x0008, 0x1110, 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
            [0xFF00, 0x0000],
        ),
    ],
    ids=["bad level", "truncated", "undefined-length sequence"],
)
def test_odd_identifiers_get_pynetdicoms_statuses(
    nodes: Nodes, identifier: bytes, expected: list[int]
) -> None:
    """Identifiers the direct reader declines or refuses are answered as pynetdicom's own
    service class answers them: the same statuses, and always a final one."""
    ours = _statuses(nodes.ours.port, identifier)
    assert ours == _statuses(nodes.pynetdicom.port, identifier)
    assert ours == expected


@pytest.mark.parametrize("fragment", [6, 16384])
def test_a_request_identifier_in_fragments_is_gathered(nodes: Nodes, fragment: int) -> None:
    """The node decodes a C-FIND-RQ itself (pipeline/pynetdicom_internals.py): its identifier's
    fragments, however small, are gathered before the request is served."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = nodes.study_uid
    identifier.SeriesInstanceUID = ""
    data = encode(identifier, True, True)
    assert data is not None
    assert _statuses(nodes.ours.port, data, fragment) == [0xFF00, 0x0000]
    assert _statuses(nodes.pynetdicom.port, data, fragment) == [0xFF00, 0x0000]
