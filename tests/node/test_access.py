"""Access control: declared peers may use what they are allowed, undeclared AEs are refused
(dcmtk's findscu, getscu, movescu and storescu as the real clients; pynetdicom where dcmtk cannot
say what it needs: a C-STORE on a C-GET association, a chosen source address)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core import metrics
from nnunet_node.core.settings import Settings
from nnunet_node.node.access import effective_mode
from nnunet_node.node.ae import DicomNode
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.models import Instance
from tests.node.peers import free_port, received, storescp
from tests.node.raw_dimse import RawAssociation
from tests.support.datasets import build_dataset
from tests.support.dcmtk import dcmtk, retrieve
from tests.support.dimse import NodeFactory

PEERS: dict[str, Any] = {
    "peers": [
        {"ae_title": "PACS1", "host": "127.0.0.1", "port": 11199},
        {"ae_title": "VIEWER", "host": "127.0.0.1", "operations": ["find", "get"]},
        {"ae_title": "CT1", "host": "127.0.0.1", "operations": ["store"]},
    ]
}


def _instances(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _store(node: DicomNode, calling: str, files: list[Path]) -> str:
    result = dcmtk(
        "storescu", "-aet", calling, "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port),
        *map(str, files),
    )  # fmt: skip
    return result.stdout if result.returncode == 0 else f"FAILED {result.stdout}"


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _find(node: DicomNode, calling: str) -> tuple[int, str]:
    result = dcmtk(
        "findscu", "-v", "-S", "-aet", calling, "-aec", "NNUNET_NODE",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
        "127.0.0.1", str(node.port),
    )  # fmt: skip
    return result.returncode, result.stdout


def test_the_default_listens_on_loopback_only(settings: Settings, archive: Archive) -> None:
    assert Settings().dicom_host == "127.0.0.1"
    default = settings.model_copy(update={"dicom_host": Settings().dicom_host})
    node = DicomNode(default, archive, RoutingTable.from_spec({}), port=0)
    node.start()
    try:
        assert node._server is not None
        assert node._server.server_address[0] == "127.0.0.1"
    finally:
        node.stop()
    # Loopback only: open to local processes; any other address: declared peers only.
    assert effective_mode("auto", "127.0.0.1") == "open"
    assert effective_mode("auto", "::1") == "open"
    assert effective_mode("auto", "0.0.0.0") == "peers"
    assert effective_mode("auto", "192.0.2.7") == "peers"


def test_undeclared_ae_is_refused_query_and_retrieve_a_declared_one_is_served(
    start_node: NodeFactory,
    sessions: sessionmaker[Session],
    phantom_series: list[Path],
    tmp_path: Path,
) -> None:
    node = start_node(routing=PEERS, dicom_access="peers")
    assert "FAILED" not in _store(node, "CT1", phantom_series)
    assert _instances(sessions) == len(phantom_series)
    for folder in ("got", "viewer"):
        (tmp_path / folder).mkdir()

    # The stranger: every association is rejected, so no query or retrieve is answered.
    code, out = _find(node, "STRANGER")
    assert code != 0 and "Association Rejected" in out, out
    assert "Calling AE Title Not Recognized" in out
    assert "Find Response" not in out
    get = retrieve(
        "getscu", node.port, "-S", "-aet", "STRANGER", "-od", str(tmp_path / "got"),
        QueryRetrieveLevel="STUDY", StudyInstanceUID="*",
    )  # fmt: skip
    assert get.returncode != 0 and "Association Rejected" in get.stdout, get.stdout
    assert received(tmp_path / "got") == []
    move = retrieve(
        "movescu", node.port, "-S", "-aet", "STRANGER", "-aem", "PACS1",
        QueryRetrieveLevel="STUDY", StudyInstanceUID="*",
    )  # fmt: skip
    assert move.returncode != 0 and "Association Rejected" in move.stdout, move.stdout
    assert "FAILED" in _store(node, "STRANGER", phantom_series[:1])

    # A declared peer allowed to query and retrieve is served.
    code, out = _find(node, "VIEWER")
    assert code == 0 and out.count("(Pending)") == 1, out  # the one study
    study_uid = _study_uid(phantom_series)
    assert study_uid in out
    got = retrieve(
        "getscu", node.port, "-S", "-aet", "VIEWER", "-od", str(tmp_path / "viewer"),
        QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid,
    )  # fmt: skip
    assert got.returncode == 0, got.stdout
    assert len(received(tmp_path / "viewer")) == len(phantom_series)

    # The scanner may store only: its C-FIND finds no accepted presentation context.
    code, out = _find(node, "CT1")
    assert code != 0 and "Find Response" not in out, out
    assert "No Acceptable Presentation Contexts" in out, out


def test_open_store_mode_takes_any_store_and_no_query(
    start_node: NodeFactory, sessions: sessionmaker[Session], phantom_series: list[Path]
) -> None:
    node = start_node(routing=PEERS, dicom_access="open-store")
    assert "FAILED" not in _store(node, "ANY_SCANNER", phantom_series[:2])
    assert _instances(sessions) == 2
    code, out = _find(node, "ANY_SCANNER")
    assert code != 0 and "Find Response" not in out, out
    assert "No Acceptable Presentation Contexts" in out, out


def test_move_goes_only_to_declared_peers_and_only_for_movers(
    start_node: NodeFactory, phantom_series: list[Path], tmp_path: Path
) -> None:
    pacs_port = free_port()
    peers = {
        "peers": [
            {"ae_title": "PACS1", "host": "127.0.0.1", "port": pacs_port},
            *PEERS["peers"][1:],
        ]
    }
    node = start_node(routing=peers, dicom_access="peers")
    assert "FAILED" not in _store(node, "CT1", phantom_series)
    with storescp(tmp_path / "pacs", ae_title="PACS1", port=pacs_port):
        # VIEWER may find and get, not move.
        refused = retrieve(
            "movescu", node.port, "-S", "-aet", "VIEWER", "-aem", "PACS1",
            QueryRetrieveLevel="STUDY", StudyInstanceUID="*",
        )  # fmt: skip
        assert "Move Response" not in refused.stdout  # (movescu exits 0 all the same)
        assert "No valid Presentation Context" in refused.stdout, refused.stdout
        assert received(tmp_path / "pacs") == []
        # PACS1 may move, to itself (a declared peer with a port).
        study_uid = _study_uid(phantom_series)
        moved = retrieve(
            "movescu", node.port, "-S", "-aet", "PACS1", "-aem", "PACS1",
            QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid,
        )  # fmt: skip
        assert moved.returncode == 0, moved.stdout
    assert len(received(tmp_path / "pacs")) == len(phantom_series)


def test_a_peer_allowed_to_get_but_not_store_is_refused_a_store(
    start_node: NodeFactory, sessions: sessionmaker[Session], phantom_series: list[Path]
) -> None:
    node = start_node(routing=PEERS, dicom_access="peers")
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = build_role(CTImageStorage, scp_role=True, scu_role=True)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NNUNET_NODE", ext_neg=[role])
    assert assoc.is_established
    refused_before = _refused_stores()
    try:
        status = assoc.send_c_store(phantom_series[0])
        assert status.Status == 0x0124  # Refused: Not authorised
    finally:
        assoc.release()
    assert _instances(sessions) == 0
    assert _refused_stores() - refused_before == 1  # /metrics counts it a failed C-STORE


def _refused_stores() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "nnunet_node_dimse_requests_total", {"service": "C-STORE", "outcome": "failure"}
    )
    return value or 0.0


def test_check_host_recognises_a_peer_only_from_its_address(start_node: NodeFactory) -> None:
    peers = {"peers": [{"ae_title": "PACS1", "host": "127.0.0.1", "check_host": True}]}
    node = start_node(routing=peers, dicom_access="peers")

    def echo(source: str) -> bool:
        ae = AE(ae_title="PACS1")
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1", node.port, ae_title="NNUNET_NODE", bind_address=(source, 0)
        )
        established = assoc.is_established
        if established:
            assert assoc.send_c_echo().Status == 0
            assoc.release()
        return established

    assert echo("127.0.0.1")
    assert not echo("127.0.0.2")  # same AE title, another address


def test_an_abort_asked_for_as_a_reject_is_sent_closes_the_connection(
    start_node: NodeFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node stopping (an A-ABORT asked for from another thread) just as it refuses a peer:
    the abort is read once the A-ASSOCIATE-RJ is sent (PS3.8 Sta13, awaiting the close), where
    the state machine has no action for it; pynetdicom raised InvalidEventError in the
    association's thread (an intermittent teardown error of the test above). Now the node
    closes the connection, and nothing is logged at ERROR."""
    thread_errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    node = start_node(routing=PEERS, dicom_access="peers")
    aborts: list[threading.Thread] = []

    def abort_as_the_reject_goes(event: Any) -> None:
        """Runs in the association's thread, as the state machine enters Sta13."""
        if event.next_state == "Sta13" and not aborts:
            assoc = event.assoc
            aborts.append(threading.Thread(target=assoc.abort))
            aborts[0].start()
            deadline = time.monotonic() + 10
            while not assoc.is_aborted and time.monotonic() < deadline:  # A-ABORT queued
                time.sleep(0.001)

    node._server.bind(evt.EVT_FSM_TRANSITION, abort_as_the_reject_goes)  # type: ignore[union-attr]
    with caplog.at_level("ERROR"):
        sock, kind = RawAssociation.request(
            node.port, Verification, ImplicitVRLittleEndian, calling="STRANGER"
        )
        try:
            assert kind == 0x03  # A-ASSOCIATE-RJ: not a declared peer
            sock.settimeout(10)
            assert sock.recv(1) == b""  # then the connection closed
        finally:
            sock.close()
        assert len(aborts) == 1
        aborts[0].join(10)
        assert not aborts[0].is_alive()
    assert thread_errors == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


@pytest.mark.parametrize("mode", ["peers", "open-store"])
def test_start_up_log_says_how_open_the_node_is(
    start_node: NodeFactory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="nnunet_node.node.ae"):
        start_node(routing=PEERS, dicom_access=mode)
    line = next(r.getMessage() for r in caplog.records if "listening on" in r.getMessage())
    assert "PACS1" in line and "VIEWER" in line
    assert ("any calling AE may store" in line) == (mode == "open-store")


def test_allowed_aes_filter_the_peers_and_add_none(start_node: NodeFactory) -> None:
    """``NNUNET_NODE_ALLOWED_AES`` is a filter before access control, as the README's table says:
    a declared peer that it does not list is rejected, and an AE it lists that is not a declared
    peer is still rejected in ``peers`` mode."""
    node = start_node(routing=PEERS, dicom_access="peers", allowed_calling_aes=["CT1", "OTHER"])

    def echo(calling: str) -> bool:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="NNUNET_NODE")
        try:
            return bool(assoc.is_established)
        finally:
            if assoc.is_established:
                assoc.release()

    assert [echo(ae) for ae in ("CT1", "VIEWER", "OTHER")] == [True, False, False]


def test_calling_ae_labels_of_undeclared_aes_are_bounded(
    start_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In open access any AE title may store, and each one became a ``calling_ae`` label value
    of /metrics' counters for ever (unbounded cardinality, the operator's trial): declared
    peers keep a label each; past the first few undeclared titles, the rest are counted under
    one label."""
    monkeypatch.setattr(metrics, "UNDECLARED_CALLING_AE_LABELS", 2)
    monkeypatch.setattr(metrics, "_undeclared_calling_aes", set())
    monkeypatch.setattr(metrics, "_RECEIVED", {})
    node = start_node(routing=PEERS, dicom_access="open")
    callers = ["PACS1", "STRANGER1", "STRANGER2", "STRANGER3", "STRANGER4"]
    before = {ae: _received(ae) for ae in [*callers, metrics.OTHER_CALLING_AE]}
    for calling in callers:
        ae = AE(ae_title=calling)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="NNUNET_NODE")
        try:
            assert assoc.send_c_store(build_dataset(size=8)).Status == 0x0000
        finally:
            assoc.release()
    counted = {ae: _received(ae) - before[ae] for ae in before}
    assert counted == {
        "PACS1": 1,  # a declared peer
        "STRANGER1": 1,
        "STRANGER2": 1,
        "STRANGER3": 0,
        "STRANGER4": 0,
        metrics.OTHER_CALLING_AE: 2,
    }


def _received(calling_ae: str) -> float:
    value = REGISTRY.get_sample_value(
        "nnunet_node_instances_received_total",
        {"source": "dimse", "calling_ae": calling_ae, "transfer_syntax": ExplicitVRLittleEndian},
    )
    return value or 0.0
