"""Patient identity through C-STORE (storescu) and C-FIND (findscu, pynetdicom): studies with an
empty or absent Patient ID keep their own patient, one Patient ID from two issuers is two
patients, and every study is answered with its own name."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
)

from nnunet_node.node.ae import DicomNode
from tests.support.datasets import build_dataset
from tests.support.dcmtk import dcmtk
from tests.support.dimse import NodeFactory


@pytest.fixture
def stored(start_node: NodeFactory, tmp_path: Path) -> tuple[DicomNode, dict[str, Dataset]]:
    datasets = {
        "empty": build_dataset(PatientID="", PatientName="Leer^Anna", PatientBirthDate="19510101"),
        "absent": build_dataset(PatientName="Fehlt^Bruno", PatientBirthDate="19620202"),
        "issuer_a": build_dataset(
            PatientID="4711", IssuerOfPatientID="HOSP_A", PatientName="Alpha^Ada"
        ),
        "issuer_b": build_dataset(
            PatientID="4711", IssuerOfPatientID="HOSP_B", PatientName="Beta^Bea"
        ),
    }
    del datasets["absent"].PatientID
    folder = tmp_path / "in"
    folder.mkdir()
    for name, ds in datasets.items():
        pydicom.dcmwrite(folder / f"{name}.dcm", ds, enforce_file_format=True)
    node = start_node()
    result = dcmtk(
        "storescu", "+sd", "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port), str(folder)
    )
    assert result.returncode == 0, result.stdout
    return node, datasets


def _findscu(port: int, out: Path, *keys: str) -> list[Dataset]:
    out.mkdir()
    args = [arg for key in keys for arg in ("-k", key)]
    result = dcmtk(
        "findscu", "-S", "-X", "-od", str(out), "-aec", "NNUNET_NODE", *args, "127.0.0.1", str(port)
    )
    assert result.returncode == 0, result.stdout
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_shows_each_study_its_own_patient(
    stored: tuple[DicomNode, dict[str, Dataset]], tmp_path: Path
) -> None:
    node, datasets = stored
    for key, name, birth in (
        ("empty", "Leer^Anna", "19510101"),
        ("absent", "Fehlt^Bruno", "19620202"),
    ):
        study = datasets[key].StudyInstanceUID
        (found,) = _findscu(
            node.port,
            tmp_path / key,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study}",
            "PatientName",
            "PatientBirthDate",
        )
        assert (str(found.PatientName), found.PatientBirthDate) == (name, birth)
        (by_name,) = _findscu(
            node.port,
            tmp_path / f"{key}-name",
            "QueryRetrieveLevel=STUDY",
            f"PatientName={name}",
            "StudyInstanceUID",
        )
        assert by_name.StudyInstanceUID == study


def test_pynetdicom_patient_level_keeps_two_issuers_apart(
    stored: tuple[DicomNode, dict[str, Dataset]],
) -> None:
    node, _ = stored
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NNUNET_NODE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = "4711"
    query.IssuerOfPatientID = ""
    query.PatientName = ""
    query.NumberOfPatientRelatedStudies = None
    try:
        found = [
            ds
            for status, ds in assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind)
            if status is not None and status.Status == 0xFF00
        ]
    finally:
        assoc.release()
    by_issuer = {ds.IssuerOfPatientID: str(ds.PatientName) for ds in found}
    assert by_issuer == {"HOSP_A": "Alpha^Ada", "HOSP_B": "Beta^Bea"}
    assert all(int(ds.NumberOfPatientRelatedStudies) == 1 for ds in found)
