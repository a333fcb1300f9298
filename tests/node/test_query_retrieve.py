"""C-FIND, C-MOVE and C-GET with dcmtk's findscu, movescu and getscu as the real clients, and a
dcmtk storescp as the move destination."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from nnunet_node.core.logging import install_library_filters
from nnunet_node.node.ae import DicomNode
from tests.node.peers import free_port, received, storescp
from tests.support.dcmtk import dcmtk, get_series, retrieve, storescu
from tests.support.dimse import NodeFactory


@dataclass
class Stored:
    node: DicomNode
    pacs_port: int
    study_uid: str
    series_uid: str
    sop_uids: list[str]

    def series_keys(self) -> dict[str, str]:
        """The identifier of a SERIES-level retrieve of the stored series (``-k`` keys)."""
        return {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": self.study_uid,
            "SeriesInstanceUID": self.series_uid,
        }


@pytest.fixture
def stored(start_node: NodeFactory, phantom_series: list[Path]) -> Stored:
    pacs_port = free_port()
    node = start_node(
        routing={
            "destinations": {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}}
        }
    )
    storescu(node.port, phantom_series[0].parent)
    first = pydicom.dcmread(phantom_series[0], stop_before_pixels=True)
    sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in phantom_series]
    return Stored(node, pacs_port, first.StudyInstanceUID, first.SeriesInstanceUID, sops)


def _find(port: int, model: str, *keys: str) -> list[str]:
    """Run findscu; return the text of each pending response."""
    args = ["findscu", "-v", model, "-aec", "NNUNET_NODE"]
    for key in keys:
        args += ["-k", key]
    result = dcmtk(*args, "127.0.0.1", str(port))
    assert result.returncode == 0, result.stdout
    assert "Received Final Find Response (Success)" in result.stdout, result.stdout
    return result.stdout.split("Find Response: ")[1:]


def test_findscu_at_study_series_and_image_level(stored: Stored) -> None:
    port = stored.node.port
    studies = _find(
        port,
        "-S",
        "QueryRetrieveLevel=STUDY",
        "PatientID=PHANT*",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
        "SOPClassesInStudy",
    )
    assert len(studies) == 1
    assert stored.study_uid in studies[0] and "[12]" in studies[0]
    # asked for, so read from the study's instances (storage.query: only on request)
    assert re.search(r"\(0008,0062\) UI =CTImageStorage", studies[0])
    series = _find(
        port,
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={stored.study_uid}",
        "SeriesInstanceUID",
        "Modality=CT",
        "NumberOfSeriesRelatedInstances",
    )
    assert len(series) == 1 and stored.series_uid in series[0]
    images = _find(
        port,
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={stored.study_uid}",
        f"SeriesInstanceUID={stored.series_uid}",
        "SOPInstanceUID",
        "InstanceNumber",
    )
    assert len(images) == len(stored.sop_uids)
    pattern = r"\(0008,0018\) UI \[([0-9.]+)"
    found = {m for text in images for m in re.findall(pattern, text)}
    assert found == set(stored.sop_uids)
    assert _find(port, "-S", "QueryRetrieveLevel=STUDY", "PatientID=NOBODY") == []


def test_findscu_patient_root_patient_level(stored: Stored) -> None:
    patients = _find(
        stored.node.port, "-P", "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName"
    )
    assert len(patients) == 1 and "PHANTOM" in patients[0]


def _find_refused(port: int, *keys: str) -> str:
    """Run findscu (Study Root) where the node must answer 0xA900; its output."""
    args = ["findscu", "-v", "-S", "-aec", "NNUNET_NODE"]
    for key in keys:
        args += ["-k", key]
    result = dcmtk(*args, "127.0.0.1", str(port))
    assert "Error: DataSetDoesNotMatchSOPClass" in result.stdout, result.stdout  # 0xA900
    return result.stdout


def test_study_root_refuses_patient_level(stored: Stored) -> None:
    _find_refused(stored.node.port, "QueryRetrieveLevel=PATIENT", "PatientID")


def test_a_date_that_is_not_in_the_calendar_is_refused(
    stored: Stored, caplog: pytest.LogCaptureFixture
) -> None:
    """StudyDate 20261301 (month 13) is an error of the requester, 0xA900 as QIDO-RS's 400,
    not a Success that matched nothing; the response's Error Comment (PS3.4 C.4.1.1.4; findscu
    does not print it) and the node's warning name the value."""
    with caplog.at_level("WARNING", logger="nnunet_node.node.status"):
        _find_refused(stored.node.port, "QueryRetrieveLevel=STUDY", "StudyDate=20261301")
    assert [r.getMessage() for r in caplog.records if r.name == "nnunet_node.node.status"] == [
        "C-FIND from FINDSCU@127.0.0.1: 0xA900: '20261301' is not a calendar date"
    ]
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", stored.node.port, ae_title="NNUNET_NODE")
    try:
        with pydicom.config.disable_value_validation():  # pydicom would not send it
            query = Dataset()
            query.QueryRetrieveLevel, query.StudyDate = "STUDY", "20261301"
            ((status, identifier),) = list(
                assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            )
    finally:
        assoc.release()
    assert (status.Status, identifier) == (0xA900, None)
    assert status.ErrorComment == "'20261301' is not a calendar date"


def _moves(outcome: str) -> float:
    """The node's count of C-MOVE requests with ``outcome`` (``/metrics``' counter)."""
    sample = REGISTRY.get_sample_value(
        "nnunet_node_dimse_requests_total", {"service": "C-MOVE", "outcome": outcome}
    )
    return sample or 0.0


def test_movescu_to_storescp_destination(stored: Stored, tmp_path: Path) -> None:
    failures = _moves("failure")
    with storescp(tmp_path / "pacs", port=stored.pacs_port):
        result = retrieve(
            "movescu",
            stored.node.port,
            "-S",
            "-aem",
            "PACS",
            **stored.series_keys(),
        )
    assert result.returncode == 0, result.stdout
    assert "Received Final Move Response (Success)" in result.stdout, result.stdout
    files = received(tmp_path / "pacs")
    assert len(files) == len(stored.sop_uids)
    for path in files:
        dump = dcmtk("dcmdump", "-q", str(path))
        assert dump.returncode == 0 and "(7fe0,0010)" in dump.stdout, dump.stdout
    assert {pydicom.dcmread(p).SOPInstanceUID for p in files} == set(stored.sop_uids)
    assert _moves("failure") == failures


def test_movescu_hears_the_count_before_its_sub_association(stored: Stored, tmp_path: Path) -> None:
    """movescu as its own destination (``+P``): the first C-MOVE-RSP is Pending with every
    sub-operation remaining and none completed, and it comes before the node's association to
    movescu (which movescu would otherwise notice only after a second's wait for a response)."""
    out = tmp_path / "moved"
    out.mkdir()
    result = retrieve(
        "movescu",
        stored.node.port,
        "-d",
        "-S",
        "-aem",
        "PACS",
        "+P",
        str(stored.pacs_port),
        "-od",
        str(out),
        **stored.series_keys(),
    )
    assert result.returncode == 0, result.stdout
    first, sub_association = (
        result.stdout.index(marker)
        for marker in ("Received Move Response 1", "Sub-Association Received")
    )
    assert first < sub_association, result.stdout
    response = result.stdout[first:sub_association]
    assert "0xff00: Pending" in response, response
    assert re.search(rf"Remaining Suboperations\s*:\s*{len(stored.sop_uids)}\b", response), response
    assert re.search(r"Completed Suboperations\s*:\s*0\b", response), response
    final = result.stdout.split("Received Final Move Response")[1]
    assert "0x0000: Success" in final, result.stdout
    files = received(out)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in files} == set(stored.sop_uids)


def _refusal_logged_once(caplog: pytest.LogCaptureFixture, words: str) -> None:
    """The node's one WARNING names the refused C-MOVE; no ERROR line (pynetdicom's own, which
    repeated it, is filtered as the node's logging set-up does)."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if words in w], warnings


def test_move_to_unknown_ae_is_refused(stored: Stored, caplog: pytest.LogCaptureFixture) -> None:
    install_library_filters()
    caplog.set_level(logging.WARNING)
    failures = _moves("failure")
    result = retrieve(
        "movescu",
        stored.node.port,
        "-S",
        "-aem",
        "STRANGER",
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=stored.study_uid,
    )
    assert "Refused: MoveDestinationUnknown" in result.stdout, result.stdout  # 0xA801
    assert _moves("failure") == failures + 1  # /metrics counts it as a failure
    _refusal_logged_once(caplog, "C-MOVE to 'STRANGER' refused")


def test_move_to_known_destination_that_is_down(
    stored: Stored, caplog: pytest.LogCaptureFixture
) -> None:
    install_library_filters()
    caplog.set_level(logging.WARNING)
    failures = _moves("failure")
    result = retrieve(
        "movescu",
        stored.node.port,
        "-S",
        "-d",
        "-aem",
        "PACS",
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=stored.study_uid,
    )
    # PS3.4 C.4.2.3.1: the destination is known but no association could be made with it:
    # 0xA702 Refused: Out of Resources - Unable to perform sub-operations (not 0xA801), every
    # sub-operation failed, an Error Comment naming the destination, the failed instances listed.
    assert "Move response with error status (Refused: OutOfResourcesSubOperations)" in (
        result.stdout
    ), result.stdout
    final = result.stdout.split("Received Final Move Response")[1]
    assert "DIMSE Status                  : 0xa702" in final, final
    assert "MoveDestinationUnknown" not in result.stdout
    assert re.search(rf"Failed Suboperations\s*: {len(stored.sop_uids)}\n", final), final
    assert re.search(r"Completed Suboperations\s*: 0\n", final), final
    comment = f"[no association with PACS (127.0.0.1:{stored.pacs_port}): no connection]"
    assert f"LO {comment}" in final, final
    assert all(uid in final for uid in stored.sop_uids), final  # Failed SOP Instance UID List
    assert _moves("failure") == failures + 1
    _refusal_logged_once(caplog, "C-MOVE refused 0xA702: no association with PACS")


@pytest.mark.parametrize("tool", ["getscu", "movescu"])
def test_retrieve_without_the_levels_unique_key_is_refused(
    stored: Stored, tool: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A SERIES-level C-GET or C-MOVE without SeriesInstanceUID: 0xA900 with an Error Comment
    naming the missing key, and a warning in the log, no error, no traceback."""
    caplog.set_level(logging.WARNING)
    service = "C-GET" if tool == "getscu" else "C-MOVE"
    before = REGISTRY.get_sample_value(
        "nnunet_node_dimse_requests_total", {"service": service, "outcome": "failure"}
    )
    result = retrieve(
        tool,
        stored.node.port,
        "-d",
        "-S",
        *(["-aem", "PACS"] if tool == "movescu" else []),
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=stored.study_uid,
    )
    final = result.stdout.split("INCOMING DIMSE MESSAGE")[-1]  # the only response
    assert "0xa900" in final.lower(), result.stdout
    assert "SeriesInstanceUID is required" in final, result.stdout  # the Error Comment
    assert "(0020,000e)" in final.lower(), result.stdout  # the Offending Element
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info is not None]
    assert not problems, [r.getMessage() for r in problems]
    assert any("SeriesInstanceUID is required" in r.getMessage() for r in caplog.records)
    after = REGISTRY.get_sample_value(
        "nnunet_node_dimse_requests_total", {"service": service, "outcome": "failure"}
    )
    assert (after or 0.0) == (before or 0.0) + 1


def test_get_cancelled_during_its_first_sub_operation(stored: Stored) -> None:
    """A C-CANCEL-RQ sent while the node waits for the first C-STORE-RSP (the association's thread
    reads the cancel while it waits, pipeline/pynetdicom_internals): that
    sub-operation completes, no other follows, and the final C-GET-RSP is Cancel (0xFE00, PS3.4
    C.4.3.2) with the rest counted as remaining."""
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 1:
            event.assoc.send_c_cancel(1, event.context.context_id)  # the C-GET's Message ID
        return 0x0000

    assoc = ae.associate(
        "127.0.0.1",
        stored.node.port,
        ae_title="NNUNET_NODE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = stored.study_uid
    identifier.SeriesInstanceUID = stored.series_uid
    try:
        responses = list(
            assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet, msg_id=1)
        )
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0xFE00, final
    assert len(received) == 1
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfRemainingSuboperations == len(stored.sop_uids) - 1


def test_getscu_gets_the_series(stored: Stored, tmp_path: Path) -> None:
    got = get_series(stored.node.port, tmp_path / "got", stored.series_keys(), "-S")
    assert got.returncode == 0, got.output
    assert {pydicom.dcmread(p).SOPInstanceUID for p in got.files} == set(stored.sop_uids)


def test_get_one_image_with_patient_root(stored: Stored, tmp_path: Path) -> None:
    image = {
        "QueryRetrieveLevel": "IMAGE",
        "PatientID": "PHANTOM",
        "StudyInstanceUID": stored.study_uid,
        "SeriesInstanceUID": stored.series_uid,
        "SOPInstanceUID": stored.sop_uids[3],
    }
    got = get_series(stored.node.port, tmp_path / "got", image, "-P")
    assert got.returncode == 0, got.output
    assert [pydicom.dcmread(p).SOPInstanceUID for p in got.files] == [stored.sop_uids[3]]


def test_getscu_without_the_series_uid_is_told_the_identifier_is_wrong(
    stored: Stored, tmp_path: Path
) -> None:
    """A SERIES-level C-GET without SeriesInstanceUID: 0xA900 (Identifier does not match SOP
    Class), the status a C-FIND with a bad identifier gets, not pynetdicom's unable to process;
    nothing is sent."""
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": stored.study_uid}
    got = get_series(stored.node.port, tmp_path / "got", keys, "-S")
    assert "DataSetDoesNotMatchSOPClass" in got.output, got.output
    assert got.files == []
