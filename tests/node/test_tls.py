"""DICOM over TLS (PS3.15 B.1): dcmtk's storescu and findscu with ``+tls`` and pynetdicom's
C-GET against the node's TLS port, a client whose certificate the node does not trust, and the
node's own C-STORE (dispatch and C-MOVE) to a dcmtk storescp that speaks only TLS. Certificates
are made for the test (tests/tls_certs.py)."""

from __future__ import annotations

import logging
import socket
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.logging import install_library_filters
from nnunet_node.core.tls import client_context
from nnunet_node.node.ae import DicomNode
from nnunet_node.pipeline.dispatch import SendError, send_files
from nnunet_node.pipeline.routing import Peer
from nnunet_node.storage.models import Instance
from tests.node.peers import free_port, received, storescp
from tests.support.dcmtk import dcmtk, retrieve
from tests.support.dimse import NodeFactory
from tests.tls_certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_node(start_node: NodeFactory, pki: Pki) -> DicomNode:
    node = start_node(
        dicom_tls_port=0, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_ca=pki.ca
    )
    assert node.tls_port and node.tls_port != node.port
    return node


def _instances(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _tls_args(pki: Pki, client: tuple[Path, Path] | None = None) -> list[str]:
    key, cert = client or (pki.client.key, pki.client.cert)
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def test_storescu_and_findscu_over_tls(
    tls_node: DicomNode, pki: Pki, sessions: sessionmaker[Session], phantom_series: list[Path]
) -> None:
    stored = dcmtk(
        "storescu", "-v", *_tls_args(pki), "-aec", "NNUNET_NODE", "localhost",
        str(tls_node.tls_port), *map(str, phantom_series),
    )  # fmt: skip
    assert stored.returncode == 0, stored.stdout
    assert _instances(sessions) == len(phantom_series)

    study_uid = pydicom.dcmread(phantom_series[0], stop_before_pixels=True).StudyInstanceUID
    found = dcmtk(
        "findscu", "-v", "-S", *_tls_args(pki), "-aec", "NNUNET_NODE",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
        "localhost", str(tls_node.tls_port),
    )  # fmt: skip
    assert found.returncode == 0, found.stdout
    assert study_uid in found.stdout and "Final Find Response (Success)" in found.stdout


def test_c_get_over_tls_with_pynetdicom(
    tls_node: DicomNode, pki: Pki, phantom_series: list[Path]
) -> None:
    stored = dcmtk(
        "storescu", *_tls_args(pki), "-aec", "NNUNET_NODE", "localhost",
        str(tls_node.tls_port), *map(str, phantom_series),
    )  # fmt: skip
    assert stored.returncode == 0, stored.stdout
    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        got.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    context = client_context(pki.client.cert, pki.client.key, pki.ca)
    assoc = ae.associate(
        "localhost",
        tls_node.tls_port,
        ae_title="NNUNET_NODE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        tls_args=(context, "localhost"),
    )
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = pydicom.dcmread(
        phantom_series[0], stop_before_pixels=True
    ).StudyInstanceUID
    try:
        statuses = [
            status.Status
            for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000
    expected = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom_series
    }
    assert set(got) == expected


def test_a_client_certificate_the_node_does_not_trust_is_refused(
    tls_node: DicomNode,
    pki: Pki,
    sessions: sessionmaker[Session],
    phantom_series: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="nnunet_node.node.ae")
    rogue = (pki.rogue_client.key, pki.rogue_client.cert)
    refused = dcmtk(
        "storescu", *_tls_args(pki, rogue), "-aec", "NNUNET_NODE", "localhost",
        str(tls_node.tls_port), str(phantom_series[0]),
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout
    assert "TLS" in refused.stdout or "Association Request Failed" in refused.stdout
    # No certificate at all, and plain DICOM on the TLS port: refused too.
    anonymous = dcmtk(
        "storescu", "+tla", "-aec", "NNUNET_NODE", "localhost",
        str(tls_node.tls_port), str(phantom_series[0]),
    )  # fmt: skip
    assert anonymous.returncode != 0, anonymous.stdout
    plain = dcmtk(
        "storescu", "-aec", "NNUNET_NODE", "localhost", str(tls_node.tls_port),
        str(phantom_series[0]),
    )  # fmt: skip
    assert plain.returncode != 0, plain.stdout
    assert _instances(sessions) == 0
    # One warning each, saying what went wrong in words (OpenSSL's reason beside them).
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3, refusals
    assert "certificate is not signed by a CA of NNUNET_NODE_TLS_CA" in refusals[0], refusals
    assert "the client does not trust the node's certificate" in refusals[1], refusals
    assert "not a TLS handshake (plain DICOM sent to the TLS port?)" in refusals[2], refusals
    # The plain port still works beside the TLS one.
    ok = dcmtk(
        "storescu", "-aec", "NNUNET_NODE", "127.0.0.1", str(tls_node.port), str(phantom_series[0])
    )
    assert ok.returncode == 0, ok.stdout
    assert _instances(sessions) == 1


def _records_settle(caplog: pytest.LogCaptureFixture, words: str) -> list[logging.LogRecord]:
    """The log records once one holding ``words`` came (the association's thread logs after
    the client has gone), or after 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(words in r.getMessage() for r in caplog.records):
            time.sleep(0.3)  # any repeat of it would follow at once
            break
        time.sleep(0.05)
    return list(caplog.records)


def test_tls_or_http_sent_to_the_plain_port_is_one_warning_saying_so(
    tls_node: DicomNode, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS client pointed at the plain DICOM port got pynetdicom's ERROR "Unknown PDU type
    received '0x16'" five times (once per 6 bytes of its ClientHello), naming neither TLS nor
    the TLS port; an HTTP request more. Now: one WARNING each, no ERROR, and the port serves on."""
    install_library_filters()
    caplog.set_level(logging.WARNING)
    refused = dcmtk(
        "echoscu", *_tls_args(pki), "-aec", "NNUNET_NODE", "localhost", str(tls_node.port)
    )
    assert refused.returncode != 0, refused.stdout
    records = _records_settle(caplog, "a TLS handshake")
    assert not [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    warnings = [r.getMessage() for r in records if "no DICOM PDU" in r.getMessage()]
    assert warnings == [
        "a connection sent bytes that are no DICOM PDU (PS3.8 9.3), first 0x16, a TLS handshake: "
        "TLS is served only on NNUNET_NODE_DICOM_TLS_PORT, when set: aborted"
    ], warnings
    caplog.clear()
    with socket.create_connection(("127.0.0.1", tls_node.port), timeout=10) as http:
        http.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHost: localhost\r\n\r\n" * 4)
        records = _records_settle(caplog, "an HTTP request")
    assert not [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    warnings = [r.getMessage() for r in records if "no DICOM PDU" in r.getMessage()]
    assert len(warnings) == 1 and "first 0x47, an HTTP request?" in warnings[0], warnings
    # A TLS client that resets the connection mid-"PDU" (as echoscu may, once refused): what
    # pynetdicom logs of it after the first line ("Connection closed before the entire PDU was
    # received", "Connection reset by peer") is no ERROR either.
    caplog.clear()
    with socket.create_connection(("127.0.0.1", tls_node.port), timeout=10) as tls:
        tls.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64))
        records = _records_settle(caplog, "a TLS handshake")
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    time.sleep(0.5)
    records = list(caplog.records)
    assert not [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert len([r for r in records if "no DICOM PDU" in r.getMessage()]) == 1
    echo = dcmtk("echoscu", "-aec", "NNUNET_NODE", "localhost", str(tls_node.port))
    assert echo.returncode == 0, echo.stdout


def test_the_node_sends_to_a_tls_destination(
    pki: Pki, phantom_series: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install_library_filters()
    port = free_port()
    peer = Peer("SECURE_PACS", "SECURE", "localhost", port, tls=True)
    context = client_context(pki.server.cert, pki.server.key, pki.ca)
    tls = (pki.server.key, pki.server.cert, pki.ca)
    with storescp(tmp_path / "pacs", ae_title="SECURE", port=port, tls=tls):
        report = send_files(peer, phantom_series, calling_ae="NNUNET_NODE", tls_context=context)
        assert report.sent == len(phantom_series)
        # Without TLS the same peer is not reached: the node says what it makes of it, and
        # pynetdicom's three ERROR lines (one with a traceback) of the aborted request are gone
        plain = Peer("SECURE_PACS", "SECURE", "localhost", port)
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(SendError, match="expect TLS"):
            send_files(plain, phantom_series[:1], calling_ae="NNUNET_NODE", timeout_s=5)
        time.sleep(0.2)  # the request's DUL thread logs as it ends
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert len(received(tmp_path / "pacs")) == len(phantom_series)


def test_c_move_to_a_tls_peer(
    start_node: NodeFactory, pki: Pki, phantom_series: list[Path], tmp_path: Path
) -> None:
    port = free_port()
    peers = {"peers": [{"ae_title": "SECURE", "host": "localhost", "port": port, "tls": True}]}
    node = start_node(
        routing=peers, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_ca=pki.ca
    )
    stored = dcmtk(
        "storescu", "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port), *map(str, phantom_series)
    )
    assert stored.returncode == 0, stored.stdout
    study_uid = pydicom.dcmread(phantom_series[0], stop_before_pixels=True).StudyInstanceUID
    tls = (pki.server.key, pki.server.cert, pki.ca)
    with storescp(tmp_path / "pacs", ae_title="SECURE", port=port, tls=tls):
        moved = retrieve(
            "movescu", node.port, "-S", "-aem", "SECURE",
            QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid,
        )  # fmt: skip
        assert "Final Move Response (Success)" in moved.stdout or moved.returncode == 0
    assert len(received(tmp_path / "pacs")) == len(phantom_series)
