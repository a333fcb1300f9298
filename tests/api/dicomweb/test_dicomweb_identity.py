"""QIDO-RS over instances stored by STOW-RS: each study's own patient, person names in every
character set split into their component groups (PS3.18 F.2.2), and a moved instance that leaves
no empty series behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from nnunet_node.api.dicomweb.multipart import encode_parts
from nnunet_node.core.phantom import make_phantom, write_dicom_series
from tests.charsets import CASES, PLACEHOLDER, CharsetCase, recode
from tests.support.datasets import build_dataset, encode
from tests.support.dicomweb import Node

CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary=id-boundary'


def _stow(node: Node, parts: list[bytes]) -> requests.Response:
    body = b"".join(encode_parts("id-boundary", [("application/dicom", [p]) for p in parts]))
    return node.session().post(
        f"{node.dicomweb}/studies",
        data=body,
        headers={"Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json"},
    )


def _qido(node: Node, path: str, **params: str) -> list[dict[str, Any]]:
    response = node.session().get(f"{node.dicomweb}/{path}", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _value(result: dict[str, Any], keyword: str) -> Any:
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    values = result.get(tag, {}).get("Value", [])
    return values[0] if len(values) == 1 else values


@pytest.fixture(scope="module")
def charset_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One instance per character set, Patient ID ``QCS<index>``."""
    root = tmp_path_factory.mktemp("qido-charsets")
    phantom = make_phantom(4, shape=(8, 24, 24), spacing=(1.5, 1.5, 3.0))
    files = []
    for index, case in enumerate(CASES):
        (path, *_) = write_dicom_series(
            phantom, root / f"case{index}", patient_id=f"QCS{index}", patient_name=PLACEHOLDER
        )
        recode(path, case)
        files.append(path)
    return files


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_qido_names_in_every_character_set(
    node: Node, charset_files: list[Path], case: CharsetCase
) -> None:
    index = CASES.index(case)
    assert _stow(node, [charset_files[index].read_bytes()]).status_code == 200
    (study,) = _qido(node, "studies", PatientID=f"QCS{index}")
    groups = dict(
        zip(("Alphabetic", "Ideographic", "Phonetic"), case.expected.split("="), strict=False)
    )
    assert study["00100010"] == {"vr": "PN", "Value": [groups]}
    assert study["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    # found by the ideographic (or only) group, as typed in UTF-8
    found = _qido(node, "studies", PatientName=case.given_name_group)
    assert [_value(s, "PatientID") for s in found] == [f"QCS{index}"]


def test_studies_without_patient_id_keep_their_own_patient(node: Node) -> None:
    empty = build_dataset(PatientID="", PatientName="Leer^Anna", PatientBirthDate="19510101")
    absent = build_dataset(PatientName="Fehlt^Bruno", PatientBirthDate="19620202")
    del absent.PatientID
    response = _stow(node, [encode(empty), encode(absent)])
    assert response.status_code == 200, response.text
    for ds, name, birth in ((empty, "Leer^Anna", "19510101"), (absent, "Fehlt^Bruno", "19620202")):
        (study,) = _qido(node, "studies", StudyInstanceUID=ds.StudyInstanceUID)
        assert study["00100010"]["Value"] == [{"Alphabetic": name}]
        assert _value(study, "PatientBirthDate") == birth
        (by_name,) = _qido(node, "studies", PatientName=name)
        assert _value(by_name, "StudyInstanceUID") == ds.StudyInstanceUID


def test_an_instance_moved_by_stow_leaves_no_empty_series(node: Node) -> None:
    study, first, second, sop = (generate_uid() for _ in range(4))
    original = build_dataset(study_uid=study, series_uid=first, sop_uid=sop, PatientID="MOVE-1")
    kept = build_dataset(study_uid=study, series_uid=second, PatientID="MOVE-1")
    assert _stow(node, [encode(original), encode(kept)]).status_code == 200
    (before,) = _qido(node, "studies", StudyInstanceUID=study)
    assert _value(before, "NumberOfStudyRelatedSeries") == 2
    moved = build_dataset(study_uid=study, series_uid=second, sop_uid=sop, PatientID="MOVE-1")
    assert _stow(node, [encode(moved)]).status_code == 200
    (after,) = _qido(node, "studies", StudyInstanceUID=study)
    assert _value(after, "NumberOfStudyRelatedSeries") == 1
    assert _value(after, "NumberOfStudyRelatedInstances") == 2
    series = _qido(node, f"studies/{study}/series")
    assert [_value(s, "SeriesInstanceUID") for s in series] == [second]
    assert _qido(node, "series", SeriesInstanceUID=first) == []
