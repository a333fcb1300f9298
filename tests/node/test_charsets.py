"""Character sets through C-STORE and C-FIND (PS3.5 6.1, PS3.4 C.4.1.1.3.2), with dcmtk's storescu
and findscu and pynetdicom as the real peers: each name is indexed as written, found by any of
its component groups, and answered in the requester's character set where it can hold the name,
else in UTF-8 (ISO_IR 192)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.node.ae import DicomNode
from tests.charsets import CASES, PLACEHOLDER, CharsetCase, recode
from tests.support.dcmtk import dcmtk
from tests.support.dimse import NodeFactory


@pytest.fixture(scope="module")
def charset_series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small series per character set (8 slices each), in one folder per case."""
    root = tmp_path_factory.mktemp("charsets")
    phantom = make_phantom(2, shape=(8, 24, 24), spacing=(1.5, 1.5, 3.0))
    out: dict[str, Path] = {}
    for index, case in enumerate(CASES):
        folder = root / "all" / f"case{index}"
        for path in write_dicom_series(
            phantom, folder, patient_id=f"CS{index}", patient_name=PLACEHOLDER
        ):
            recode(path, case)
        out[case.id] = folder
    return out


@pytest.fixture
def node(start_node: NodeFactory, charset_series: dict[str, Path]) -> DicomNode:
    node = start_node()
    folder = next(iter(charset_series.values())).parent
    result = dcmtk(
        "storescu",
        "-v",
        "+sd",
        "+r",
        "-aec",
        "NNUNET_NODE",
        "127.0.0.1",
        str(node.port),
        str(folder),
    )
    assert result.returncode == 0, result.stdout
    return node


def _pynetdicom_find(port: int, identifier: Dataset) -> list[Dataset]:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNUNET_NODE")
    assert assoc.is_established
    try:
        responses = []
        for status, found in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        ):
            assert status is not None and status.Status in (0x0000, 0xFF00), status
            if status.Status == 0xFF00:
                responses.append(found)
        return responses
    finally:
        assoc.release()


def _study_identifier(name: str, charset: list[str] | None) -> Dataset:
    identifier = Dataset()
    if charset is not None:
        identifier.SpecificCharacterSet = charset
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = name
    identifier.PatientID = ""
    identifier.StudyInstanceUID = ""
    return identifier


def _requested(case: CharsetCase) -> list[str] | None:
    # The unknown term cannot encode a query: that requester asks in UTF-8.
    return None if case.id == "unknown term" else list(case.terms)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_pynetdicom_finds_each_name_by_a_group_and_reads_it_back(
    node: DicomNode, case: CharsetCase
) -> None:
    requested = _requested(case)
    query_charset = requested if requested is not None else ["ISO_IR 192"]
    (found,) = _pynetdicom_find(node.port, _study_identifier(case.given_name_group, query_charset))
    assert str(found.PatientName) == case.expected
    answered = found.get("SpecificCharacterSet")
    terms = [answered] if isinstance(answered, str) else list(answered)
    assert terms == query_charset
    # Asked in the default repertoire (by Patient ID): the answer is UTF-8, since the name
    # is not ASCII.
    plain_query = _study_identifier("", None)
    plain_query.PatientID = f"CS{CASES.index(case)}"
    (plain,) = _pynetdicom_find(node.port, plain_query)
    assert str(plain.PatientName) == case.expected
    assert plain.SpecificCharacterSet == "ISO_IR 192"


def test_an_answer_the_requested_set_cannot_hold_comes_in_utf8(node: DicomNode) -> None:
    """A requester asking in ISO_IR 100 for the Japanese name: Latin-1 cannot hold it."""
    (found,) = _pynetdicom_find(node.port, _study_identifier("Yamada^Tarou", ["ISO_IR 100"]))
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert str(found.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_findscu_reads_each_name(node: DicomNode, case: CharsetCase, tmp_path: Path) -> None:
    """dcmtk's findscu asks in UTF-8 by an ideographic or accented group; the response files
    it extracts hold the whole name."""
    out = tmp_path / f"rsp-{CASES.index(case)}"
    out.mkdir()
    result = dcmtk(
        "findscu",
        "-S",
        "-X",
        "-od",
        str(out),
        "-aec",
        "NNUNET_NODE",
        "-k",
        "SpecificCharacterSet=ISO_IR 192",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"PatientName={case.given_name_group}",
        "-k",
        "PatientID",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        str(node.port),
    )
    assert result.returncode == 0, result.stdout
    files = sorted(out.glob("rsp*.dcm"))
    assert len(files) == 1, result.stdout
    response = pydicom.dcmread(files[0])
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert str(response.PatientName) == case.expected
    assert response.PatientID == f"CS{CASES.index(case)}"
