"""The life of an accepted association whose DUL runs in the association's own thread
(pipeline/pynetdicom_internals._drive_inline): requests, cancels, releases, aborts and dropped
connections are all noticed by that one thread, and the node's shutdown still aborts it."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from nnunet_node.node.ae import DicomNode
from tests.node.raw_dimse import RawAssociation, command_set
from tests.support.dcmtk import dcmtk
from tests.support.dimse import NodeFactory


@pytest.fixture
def node_with_series(start_node: NodeFactory, phantom_series: list[Path]) -> DicomNode:
    node = start_node()
    series = str(phantom_series[0].parent)
    result = dcmtk("storescu", "+sd", "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port), series)
    assert result.returncode == 0, result.stdout
    return node


def _wait_for(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _requester() -> AE:
    ae = AE(ae_title="REQUESTER")
    ae.add_requested_context(Verification)
    return ae


def test_an_accepted_association_is_served_by_one_thread(start_node: NodeFactory) -> None:
    node = start_node()
    assoc = _requester().associate("127.0.0.1", node.port, ae_title="NNUNET_NODE")
    assert assoc.is_established
    try:
        assert _wait_for(lambda: len(node.active_associations()) == 1)
        (served,) = node.active_associations()
        assert served.dul.ident is None  # its DUL never got a thread of its own
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
    assert _wait_for(lambda: not node.active_associations())


def test_an_association_that_may_store_keeps_a_dul_thread(
    start_node: NodeFactory, phantom_series: list[Path]
) -> None:
    """C-STORE is faster with the DUL reading beside the handler (node/transport.py)."""
    node = start_node()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NNUNET_NODE")
    assert assoc.is_established
    try:
        assert _wait_for(lambda: len(node.active_associations()) == 1)
        (served,) = node.active_associations()
        assert _wait_for(lambda: served.dul.ident is not None)
        assert assoc.send_c_store(phantom_series[0]).Status == 0x0000
    finally:
        assoc.release()
    assert _wait_for(lambda: not node.active_associations())


def test_a_peer_abort_or_a_dropped_connection_ends_the_association(
    start_node: NodeFactory,
) -> None:
    node = start_node()
    assoc = _requester().associate("127.0.0.1", node.port, ae_title="NNUNET_NODE")
    assert assoc.is_established
    assoc.abort()
    assert _wait_for(lambda: not node.active_associations())
    raw = RawAssociation.open(node.port, Verification, ImplicitVRLittleEndian)
    assert _wait_for(lambda: len(node.active_associations()) == 1)
    raw.sock.close()  # no A-RELEASE, no A-ABORT: the transport just goes
    assert _wait_for(lambda: not node.active_associations())
    assert _requester().associate("127.0.0.1", node.port).send_c_echo().Status == 0x0000


def test_stopping_the_node_aborts_an_open_association(start_node: NodeFactory) -> None:
    node = start_node()
    assoc = _requester().associate("127.0.0.1", node.port, ae_title="NNUNET_NODE")
    assert assoc.is_established
    started = time.monotonic()
    node.stop()
    assert time.monotonic() - started < 5
    assert _wait_for(lambda: assoc.is_aborted)


def _pdu(control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, 1, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def test_a_cancel_sent_behind_the_find_stops_it(node_with_series: DicomNode) -> None:
    """C-CANCEL-RQ (PS3.7 9.3.2.3) written right behind the C-FIND-RQ: the node reads it while
    it answers, and ends with Cancel (0xFE00) before sending every match."""
    first = pydicom.dcmread(sorted(node_with_series.handlers.archive.root.rglob("*.dcm"))[0])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = first.StudyInstanceUID
    identifier.SeriesInstanceUID = first.SeriesInstanceUID
    identifier.SOPInstanceUID = ""
    sop_class = str(StudyRootQueryRetrieveInformationModelFind)
    find = command_set(
        [
            (0x0002, sop_class.encode() + (b"\x00" if len(sop_class) % 2 else b"")),
            (0x0100, struct.pack("<H", 0x0020)),  # C-FIND-RQ
            (0x0110, struct.pack("<H", 7)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0001)),
        ]
    )
    cancel = command_set(
        [
            (0x0100, struct.pack("<H", 0x0FFF)),  # C-CANCEL-RQ
            (0x0120, struct.pack("<H", 7)),
            (0x0800, struct.pack("<H", 0x0101)),
        ]
    )
    data = encode(identifier, True, True)
    assert data is not None
    raw = RawAssociation.open(node_with_series.port, sop_class, ImplicitVRLittleEndian)
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw.sock.sendall(_pdu(0x03, find) + _pdu(0x02, data) + _pdu(0x03, cancel))
    statuses = [raw.read_status()]
    while statuses[-1] in (0xFF00, 0xFF01):
        statuses.append(raw.read_status())
    raw.release()
    assert statuses[-1] == 0xFE00
    assert len(statuses) - 1 < 12  # the series holds 12 matches
