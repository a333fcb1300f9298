"""Association latency: C-ECHO and C-FIND associations against the node, beside the same node
with pynetdicom's own associations (``event_driven=False``: its DUL thread, its 1 ms reactor
sleeps, its encoders), measured server side.

Usage: ``.venv/bin/python bench/bench_association.py [--reps 30]``

A client on a plain socket (TCP_NODELAY) replays what dcmtk's ``echoscu`` and ``findscu -S``
send (one presentation context, Implicit VR Little Endian) and times each phase: A-ASSOCIATE-RQ
to -AC, the request to its first and final response, A-RELEASE-RQ to -RP. No client process
is started, so the figures are the server's own (a findscu process adds ~25 ms of start-up to
both). The archive holds 5 phantom studies of 2 series of 10 slices; the STUDY query asks for
ModalitiesInStudy and NumberOfStudyRelatedInstances (5 matches), the SERIES query for one
study's series with NumberOfSeriesRelatedInstances (2 matches). Prints medians and the ratio
baseline / node (>1: the node is faster).
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom.dsutils import encode  # noqa: E402

from nnunet_node.core.phantom import make_phantom, write_dicom_series  # noqa: E402
from nnunet_node.core.settings import Settings  # noqa: E402
from nnunet_node.node.ae import DicomNode  # noqa: E402
from nnunet_node.pipeline.routing import RoutingTable  # noqa: E402
from nnunet_node.storage.archive import Archive  # noqa: E402
from nnunet_node.storage.db import make_engine, make_sessionmaker  # noqa: E402
from nnunet_node.storage.migrations import upgrade  # noqa: E402

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(sop_class: str) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing ``sop_class`` in Implicit VR Little Endian."""
    context = struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, _uid(sop_class))
    context += _item(0x40, _uid(IMPLICIT))
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, _uid("1.2.3.4.5.6"))
    body = struct.pack(">HH", 1, 0) + b"NNUNET_NODE".ljust(16) + b"BENCH".ljust(16)
    body += b"\x00" * 32 + _item(0x10, _uid("1.2.840.10008.3.1.1.1")) + _item(0x20, context)
    body += _item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def _pdata(control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, 1, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def echo_rq() -> bytes:
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    return _pdata(
        0x03,
        _command(
            [
                (0x0002, _uid(VERIFICATION)),
                (0x0100, us(0x30)),
                (0x0110, us(1)),
                (0x0800, us(0x0101)),
            ]
        ),
    )


def find_rq(identifier: Dataset) -> bytes:
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    command = _command(
        [
            (0x0002, _uid(STUDY_ROOT_FIND)),
            (0x0100, us(0x20)),
            (0x0110, us(1)),
            (0x0700, us(0)),
            (0x0800, us(0x0001)),
        ]
    )
    data = encode(identifier, True, True)
    assert data is not None
    return _pdata(0x03, command) + _pdata(0x02, data)


RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4


def _read(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def _pdu(sock: socket.socket) -> bytes:
    head = _read(sock, 6)
    return head + _read(sock, struct.unpack(">I", head[2:])[0])


def _status(pdu: bytes) -> int | None:
    """The Status of a P-DATA-TF holding a whole command set in one PDV, else None."""
    if pdu[0] != 0x04 or pdu[11] & 0x03 != 0x03:
        return None
    data, offset = pdu[12:], 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack("<HHI", data[offset : offset + 8])
        if (group, element) == (0, 0x0900):
            return int(struct.unpack("<H", data[offset + 8 : offset + 10])[0])
        offset += 8 + length
    return None


def one(port: int, rq: bytes, request: bytes) -> tuple[float, float, float, float]:
    """Milliseconds: association accepted, first response, final response, released."""
    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.sendall(rq)
        if _pdu(sock)[0] != 0x02:
            raise RuntimeError("association not accepted")
        t1 = time.perf_counter()
        sock.sendall(request)
        first = None
        while True:
            status = _status(_pdu(sock))
            first = first or time.perf_counter()
            if status is not None and status not in (0xFF00, 0xFF01):
                break
        t2 = time.perf_counter()
        sock.sendall(RELEASE_RQ)
        _pdu(sock)
        t3 = time.perf_counter()
    finally:
        sock.close()
    return (t1 - t0) * 1e3, (first - t1) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3


@contextmanager
def nodes(data: Path) -> Iterator[tuple[int, int, str]]:
    """The node and the same node with pynetdicom's own associations, over one archive."""
    settings = Settings(data_dir=data, dicom_port=0, min_free_disk_mb=0)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    archive = Archive(settings.archive_dir, make_sessionmaker(engine))
    study = ""
    for s in range(5):
        for n in range(2):
            phantom = make_phantom(s * 2 + n, shape=(10, 32, 32), spacing=(1.0, 1.0, 3.0))
            files = write_dicom_series(
                phantom,
                data / "in" / f"{s}-{n}",
                study_uid=f"1.2.826.0.1.3680043.8.498.1.{s}",
                patient_id=f"P{s}",
                series_number=n + 1,
            )
            for path in files:
                archive.ingest(path, source="dimse")
    study = "1.2.826.0.1.3680043.8.498.1.0"
    started = []
    try:
        for event_driven in (True, False):
            node = DicomNode(
                settings,
                archive,
                RoutingTable.from_spec({}),
                host="127.0.0.1",
                port=0,
                event_driven=event_driven,
            )
            node.start()
            started.append(node)
        yield started[0].port, started[1].port, study
    finally:
        for node in started:
            node.stop()
        archive.close()
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-assoc-") as tmp, nodes(Path(tmp)) as ports:
        node_port, plain_port, study = ports
        studies = Dataset()
        studies.QueryRetrieveLevel = "STUDY"
        studies.PatientName = "*"
        studies.PatientID = studies.StudyInstanceUID = studies.StudyDate = ""
        studies.ModalitiesInStudy = ""
        studies.NumberOfStudyRelatedInstances = None
        series = Dataset()
        series.QueryRetrieveLevel = "SERIES"
        series.StudyInstanceUID = study
        series.SeriesInstanceUID = series.Modality = ""
        series.NumberOfSeriesRelatedInstances = None
        cases = {
            "C-ECHO": (associate_rq(VERIFICATION), echo_rq()),
            "C-FIND study": (associate_rq(STUDY_ROOT_FIND), find_rq(studies)),
            "C-FIND series": (associate_rq(STUDY_ROOT_FIND), find_rq(series)),
        }
        heads = ("accept", "1st rsp", "final", "release", "total")
        print(" " * 25 + " ".join(f"{h:>8s}" for h in heads))
        for name, (rq, request) in cases.items():
            times: dict[str, list[tuple[float, ...]]] = {"node": [], "pynetdicom": []}
            for _ in range(args.reps):  # alternated, so that both see the same load
                for label, port in (("node", node_port), ("pynetdicom", plain_port)):
                    times[label].append(one(port, rq, request))
                    time.sleep(0.005)
            medians = {
                k: [statistics.median(c) for c in zip(*v, strict=True)] for k, v in times.items()
            }
            for label, m in medians.items():
                total = m[0] + m[2] + m[3]
                cells = " ".join(f"{x:8.2f}" for x in (*m, total))
                print(f"{name:14s} {label:10s} {cells} ms")
            node_total = sum(medians["node"][i] for i in (0, 2, 3))
            plain_total = sum(medians["pynetdicom"][i] for i in (0, 2, 3))
            print(f"{name:14s} ratio pynetdicom / node (total): {plain_total / node_total:5.2f}")


if __name__ == "__main__":
    main()
