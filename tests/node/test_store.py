"""C-ECHO and C-STORE against the node with dcmtk and pynetdicom as the real peers, and faults."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.pipeline.dispatch import NODELAY_HANDLERS
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.models import Instance, Series
from tests.support.dcmtk import dcmtk
from tests.support.dimse import NodeFactory


def _count(sessions: sessionmaker[Session], model: type) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _scu(node_port: int, *, calling: str = "TESTSCU") -> tuple[AE, object]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120  # a busy CI machine
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(
        "127.0.0.1", node_port, ae_title="NNUNET_NODE", evt_handlers=NODELAY_HANDLERS
    )
    assert assoc.is_established
    return ae, assoc


def test_echoscu_and_tcp_nodelay_on_both_ends(start_node: NodeFactory) -> None:
    node = start_node()
    result = dcmtk("echoscu", "-v", "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stdout
    assert "Received Echo Response (Success)" in result.stdout

    _, assoc = _scu(node.port)
    try:

        def open_sockets() -> list[socket.socket]:  # the echo's association may still be ending
            socks = [a.dul.socket.socket for a in node.active_associations() if a.dul.socket]
            return [s for s in socks if s is not None and s.fileno() != -1]

        deadline = time.monotonic() + 5
        while not open_sockets() and time.monotonic() < deadline:
            time.sleep(0.01)
        server_sock = open_sockets()[0]
        assert server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        client_sock = assoc.dul.socket.socket  # type: ignore[attr-defined]
        assert client_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_storescu_series_lands_in_archive_and_index(
    start_node: NodeFactory,
    archive: Archive,
    sessions: sessionmaker[Session],
    phantom_series: list[Path],
) -> None:
    node = start_node()
    folder = phantom_series[0].parent
    result = dcmtk(
        "storescu",
        "-aet",
        "SCANNER",
        "-aec",
        "NNUNET_NODE",
        "+sd",
        "127.0.0.1",
        str(node.port),
        str(folder),
    )
    assert result.returncode == 0, result.stdout
    assert _count(sessions, Instance) == len(phantom_series)
    with sessions() as session:
        series = session.scalars(select(Series)).one()
        instances = session.scalars(select(Instance)).all()
    assert series.calling_ae == "SCANNER" and series.called_ae == "NNUNET_NODE"
    assert {i.source for i in instances} == {"dimse"}
    for source in phantom_series:
        sent = pydicom.dcmread(source)
        stored = archive.root / next(
            i.path for i in instances if i.sop_instance_uid == sent.SOPInstanceUID
        )
        # The bytes after the File Meta are exactly those sent: nothing was decoded or rewritten.
        assert pydicom.dcmread(stored).PixelData == sent.PixelData


def test_called_ae_title_is_recorded_as_called(
    start_node: NodeFactory, sessions: sessionmaker[Session], phantom_series: list[Path]
) -> None:
    node = start_node()
    result = dcmtk(
        "storescu", "-aec", "ROUTE_B", "127.0.0.1", str(node.port), str(phantom_series[0])
    )
    assert result.returncode == 0, result.stdout
    with sessions() as session:
        assert session.scalars(select(Series.called_ae)).one() == "ROUTE_B"


def test_calling_ae_not_on_allow_list_is_rejected(
    start_node: NodeFactory, sessions: sessionmaker[Session], phantom_series: list[Path]
) -> None:
    node = start_node(allowed_calling_aes=["PACS1"])
    refused = dcmtk(
        "storescu",
        "-aet",
        "INTRUDER",
        "-aec",
        "NNUNET_NODE",
        "127.0.0.1",
        str(node.port),
        str(phantom_series[0]),
    )
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout
    assert "Calling AE Title Not Recognized" in refused.stdout
    allowed = dcmtk("echoscu", "-aet", "PACS1", "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port))
    assert allowed.returncode == 0, allowed.stdout
    assert _count(sessions, Instance) == 0


def test_free_disk_floor_answers_out_of_resources(
    start_node: NodeFactory,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    phantom_series: list[Path],
) -> None:
    full = Archive(tmp_path / "data" / "dicom", sessions, min_free_bytes=1 << 60)
    node = start_node(archive_=full)
    result = dcmtk(
        "storescu", "-v", "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port), str(phantom_series[0])
    )
    assert "Refused: OutOfResources" in result.stdout, result.stdout  # 0xA700
    assert _count(sessions, Instance) == 0
    node.stop()
    full.close()  # which deletes the empty spare files kept for streamed C-STOREs
    assert not [p for p in full.root.rglob("*") if p.is_file()]


def _raw_store(port: int, path: Path) -> int:
    """Send a file's bytes after its File Meta as they are (pynetdicom's chunked mode)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        _, assoc = _scu(port)
        try:
            return int(assoc.send_c_store(path).Status)  # type: ignore[attr-defined]
        finally:
            assoc.release()  # type: ignore[attr-defined]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def test_corrupt_dataset_cannot_be_understood(
    start_node: NodeFactory, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    node = start_node()
    ds = Dataset()
    ds.file_meta = _file_meta(generate_uid())
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    corrupt = tmp_path / "corrupt.dcm"
    # A valid File Meta followed by an element whose length runs past the end.
    corrupt.write_bytes(buffer.getvalue() + b"\x08\x00\x18\x00UI\xff\x7f1.2.3" + b"\x00" * 7)
    assert _raw_store(node.port, corrupt) == 0xC000
    assert _count(sessions, Instance) == 0


def test_dataset_without_uids_cannot_be_understood(
    start_node: NodeFactory, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    node = start_node()
    ds = Dataset()
    sop_uid = generate_uid()
    ds.file_meta = _file_meta(sop_uid)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = "NOUIDS"  # no Study or Series Instance UID
    _, assoc = _scu(node.port)
    try:
        status = assoc.send_c_store(ds)  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    assert status.Status == 0xC000
    assert _count(sessions, Instance) == 0
    assert not [p for p in (tmp_path / "data" / "dicom").rglob("*.dcm")]


def test_several_associations_at_once_lose_nothing_and_duplicate_nothing(
    start_node: NodeFactory, sessions: sessionmaker[Session], archive: Archive
) -> None:
    node = start_node()
    root = f"1.2.826.0.1.3680043.10.{time.time_ns() % 10**9}"
    study = f"{root}.1"
    series = [f"{root}.2.{i}" for i in range(4)]

    def make(series_uid: str, n: int) -> Dataset:
        ds = Dataset()
        sop_uid = f"{series_uid}.{n}"
        ds.file_meta = _file_meta(sop_uid)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.PatientID, ds.Modality, ds.InstanceNumber = "MANY", "CT", n
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = bytes(128)
        return ds

    statuses: list[int] = []
    lock = threading.Lock()

    def sender(index: int) -> None:
        _, assoc = _scu(node.port, calling=f"SCU{index}")
        try:
            # Each association sends its own series and, twice, one of the shared series.
            for n in range(10):
                for ds in (make(series[index], n), make(series[0], n)):
                    code = int(assoc.send_c_store(ds).Status)  # type: ignore[attr-defined]
                    with lock:
                        statuses.append(code)
        finally:
            assoc.release()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(statuses) == 80 and set(statuses) == {0}, [hex(s) for s in statuses if s]
    assert _count(sessions, Instance) == 40  # 4 series x 10, the re-sent ones once each
    assert _count(sessions, Series) == 4
    files = [p for p in archive.root.rglob("*.dcm") if ".incoming" not in p.parts]
    assert len(files) == 40


@pytest.mark.parametrize("rows", [64, 400])
def test_dataset_cut_inside_its_pixel_data_is_refused_and_the_stored_copy_kept(
    start_node: NodeFactory, tmp_path: Path, sessions: sessionmaker[Session], rows: int
) -> None:
    """A sender that stops inside the pixel data (its length says more bytes than came) gets
    0xC000, and so does a data set whose native Pixel Data is shorter than its Rows, Columns,
    Samples per Pixel and Bits Allocated need; the copy the node already held is not replaced
    by the short one. Checked for a
    dataset the node keeps whole in memory while it streams (64 rows: 8 KiB of pixels) and
    for one larger than that head (400 rows: 312 KiB, checked from where the header scan
    found the pixel data element)."""
    node = start_node()
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_uid)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256)
    whole = tmp_path / "whole.dcm"
    pydicom.dcmwrite(whole, ds, enforce_file_format=True)
    whole_pixels = ds.PixelData
    assert _raw_store(node.port, whole) == 0x0000
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-1000])
    assert _raw_store(node.port, cut) == 0xC000
    # Cut, then written again by a tool that reads it leniently: the Pixel Data element's
    # length is consistent, but holds half the bytes Rows x Columns x 16 bits need.
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    short = tmp_path / "short.dcm"
    pydicom.dcmwrite(short, ds, enforce_file_format=True)
    assert _raw_store(node.port, short) == 0xC000
    ds.PixelData = whole_pixels
    stored = list((tmp_path / "data" / "dicom").rglob(f"{sop_uid}.dcm"))
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).PixelData == ds.PixelData  # the whole copy
    assert _count(sessions, Instance) == 1
