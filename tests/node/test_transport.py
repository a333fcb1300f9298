"""The node's C-STORE path (node/transport.py): datasets stream into the archive, responses are
encoded directly, abandoned transfers leave nothing behind."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core import dicomscan
from nnunet_node.node.transport import encode_store_response
from nnunet_node.pipeline.dispatch import NODELAY_HANDLERS
from nnunet_node.pipeline.pynetdicom_internals import decode_store_response
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.models import Instance
from tests.support.dcmtk import dcmtk
from tests.support.dimse import NodeFactory

UIDS = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3"),  # odd lengths: padded with a NUL
    ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.826.0.1.3680043.8.498.12345678901234567890123456"),
    (CTImageStorage, generate_uid()),
]


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA701, 0xC000, 0xC001, 0xB000])
@pytest.mark.parametrize(("sop_class", "sop_instance"), UIDS)
def test_store_response_is_encoded_as_pynetdicom_encodes_it(
    status: int, sop_class: str, sop_instance: str
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 16382))
    ((_, expected),) = pdata.presentation_data_value_list

    ours = encode_store_response(sop_class, sop_instance, 7, status)
    assert b"\x03" + ours == expected
    command = decode(io.BytesIO(ours), True, True)
    assert (command.CommandField, command.Status) == (0x8001, status)
    assert command.AffectedSOPInstanceUID == sop_instance


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xB000, 0xC000])
@pytest.mark.parametrize(("sop_class", "sop_instance"), [*UIDS, (None, None)])
def test_store_response_is_decoded_as_pynetdicom_decodes_it(
    status: int, sop_class: str | None, sop_instance: str | None
) -> None:
    """decode_store_response (the C-STORE-RSP of a sub-operation, pipeline/pynetdicom_internals)
    gives the primitive pynetdicom's own decoder gives, from what a peer sends."""
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 65535
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(3, 16382))
    ((_, data),) = pdata.presentation_data_value_list
    theirs = DIMSEMessage()
    assert theirs.decode_msg(pdata)
    expected = theirs.message_to_primitive()

    ours = decode_store_response(bytes(data[1:]))
    assert ours is not None
    for keyword in ("MessageIDBeingRespondedTo", "Status", "AffectedSOPClassUID"):
        assert getattr(ours, keyword) == getattr(expected, keyword), keyword
    assert ours.AffectedSOPInstanceUID == expected.AffectedSOPInstanceUID
    assert ours.is_valid_response


def test_store_response_with_an_error_comment_is_left_to_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.Status = 0xC000
    primitive.ErrorComment = "no room"
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 16382))
    ((_, data),) = pdata.presentation_data_value_list
    assert decode_store_response(bytes(data[1:])) is None
    rq = C_STORE_RQ()  # a request is not a response
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.3"
    request.Priority = 2
    request.DataSet = io.BytesIO(b"")
    rq.primitive_to_message(request)
    pdatas = list(rq.encode_msg(1, 16382))
    assert decode_store_response(bytes(pdatas[0].presentation_data_value_list[0][1][1:])) is None
    assert decode_store_response(b"\x00\x00\x00") is None  # cut short


def _dataset_bytes(part10: bytes) -> bytes:
    start, _ = dicomscan._file_meta(part10)
    return part10[start:]


def test_storescu_instance_is_stored_as_sent_with_our_file_meta(
    start_node: NodeFactory, archive: Archive, phantom_series: list[Path]
) -> None:
    node = start_node()
    source = phantom_series[0]
    peer = ("-aet", "SCANNER", "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port))
    result = dcmtk("storescu", *peer, str(source))
    assert result.returncode == 0, result.stdout
    sent = pydicom.dcmread(source, stop_before_pixels=True)
    stored_path = (
        archive.root / sent.StudyInstanceUID / sent.SeriesInstanceUID / f"{sent.SOPInstanceUID}.dcm"
    )
    stored = stored_path.read_bytes()
    # The dataset is byte for byte what the scanner sent: never decoded, never re-encoded.
    assert _dataset_bytes(stored) == _dataset_bytes(source.read_bytes())
    meta = pydicom.dcmread(stored_path, stop_before_pixels=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == sent.SOPClassUID
    assert meta.SourceApplicationEntityTitle == "SCANNER"
    assert meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID


def _associate(port: int, calling: str) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="NNUNET_NODE", evt_handlers=NODELAY_HANDLERS)
    assert assoc.is_established
    return assoc


def _incoming_with_data(archive: Archive) -> list[Path]:
    return [p for p in archive.incoming.iterdir() if p.stat().st_size > 0]


def _fds_under(folder: Path) -> list[Path]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
        if folder in target.parents:
            found.append(target)
    return found


def test_an_aborted_transfer_leaves_no_file_no_row_and_no_open_file(
    start_node: NodeFactory, archive: Archive, sessions: sessionmaker[Session]
) -> None:
    node = start_node()
    assoc = _associate(node.port, "ABORTER")
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = generate_uid()
    request.Priority = 2
    request.DataSet = io.BytesIO(b"\x08\x00\x16\x00UI\x1a\x00" + b"1" * 26 + b"\x00" * 200_000)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16382))
    assert len(fragments) > 4
    for pdata in fragments[:3]:  # the command and the first dataset fragments, then nothing
        assoc.dul.send_pdu(pdata)
    deadline = time.monotonic() + 10
    while not _incoming_with_data(archive) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _incoming_with_data(archive), "the node did not stream the first fragments to disk"

    assoc.abort()
    deadline = time.monotonic() + 10
    while (node.active_associations() or _incoming_with_data(archive)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert not node.active_associations()
    assert _incoming_with_data(archive) == []
    # Only the empty spare files stay open (and on disk) until the archive closes.
    assert all(p.exists() and p.stat().st_size == 0 for p in _fds_under(archive.incoming))
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    node.stop()
    archive.close()  # by its maker, the test
    assert list(archive.incoming.iterdir()) == []
    assert _fds_under(archive.incoming) == []


def test_a_command_announcing_another_instance_is_indexed_by_the_dataset_uid(
    start_node: NodeFactory,
    archive: Archive,
    sessions: sessionmaker[Session],
    phantom_series: list[Path],
) -> None:
    """The index and the file's place follow the dataset's own SOP Instance UID; the File Meta
    Information, written before the dataset arrives, carries the UID the command announced (as
    pynetdicom's own chunked reception does)."""
    node = start_node()
    assoc = _associate(node.port, "ODDSCU")
    first = pydicom.dcmread(phantom_series[0])
    second = pydicom.dcmread(phantom_series[1], stop_before_pixels=True)
    announced = generate_uid()
    request = C_STORE()
    request.MessageID = 2
    request.AffectedSOPClassUID = second.SOPClassUID
    request.AffectedSOPInstanceUID = announced
    request.Priority = 2
    request.DataSet = io.BytesIO(_dataset_bytes(phantom_series[1].read_bytes()))
    expected = {first.SOPInstanceUID, second.SOPInstanceUID}
    try:
        assert assoc.send_c_store(first).Status == 0x0000  # the ordinary path
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        for pdata in message.encode_msg(assoc.accepted_contexts[0].context_id, 16382):
            assoc.dul.send_pdu(pdata)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with sessions() as session:
                uids = {r.sop_instance_uid for r in session.scalars(select(Instance))}
            if uids == expected:
                break
            time.sleep(0.02)
    finally:
        assoc.release()
    assert uids == expected
    stored = (
        archive.root
        / second.StudyInstanceUID
        / second.SeriesInstanceUID
        / f"{second.SOPInstanceUID}.dcm"
    )
    on_disk = pydicom.dcmread(stored, stop_before_pixels=True)
    assert on_disk.SOPInstanceUID == second.SOPInstanceUID
    assert on_disk.file_meta.MediaStorageSOPInstanceUID == announced
    assert _incoming_with_data(archive) == []
