"""C-FIND response identifiers encoded directly (node/identifiers.py) are byte for byte what
pydicom writes for the Dataset storage.query.to_dataset makes (the path pynetdicom takes): for
every attribute the index holds and keys it does not, each level, both little-endian transfer
syntaxes, odd and even lengths, empty values, and answers in the requester's character set or in
UTF-8. Where the direct encoder declines (ISO 2022 code extensions, an ambiguous VR) it says so
and the caller keeps pydicom's path."""

from __future__ import annotations

import io
from typing import Any

import pytest
from pynetdicom.dsutils import decode, encode

from nnunet_node.node.identifiers import encode_identifier
from nnunet_node.storage.query import ATTRIBUTES, COMPUTED, to_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"

ROW: dict[str, Any] = {
    "_pk": 7,
    "_path": "1.2/3.4/5.dcm",
    "PatientID": "P12345",  # even
    "IssuerOfPatientID": "HOSP",
    "PatientName": "Doe^Jane",  # even
    "PatientBirthDate": "19700101",
    "PatientSex": "F",  # odd: padded with a space
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1",  # odd: padded with NUL
    "StudyDate": "20240102",
    "StudyTime": "101530.5",
    "AccessionNumber": "",
    "StudyID": "S1",
    "StudyDescription": "Head CT",
    "ReferringPhysicianName": "Who^Doctor=",  # an empty trailing group pydicom drops
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.12",
    "Modality": "CT",
    "SeriesNumber": 3,
    "SeriesDescription": "Axial 3 mm",
    "BodyPartExamined": "HEAD",
    "SeriesDate": "",
    "SeriesTime": "",
    "FrameOfReferenceUID": "1.2.3",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.123",
    "SOPClassUID": CT,
    "InstanceNumber": 12,
    "Rows": 512,
    "Columns": 511,
    "NumberOfFrames": None,
    "AvailableTransferSyntaxUID": "1.2.840.10008.1.2.1",
    "InstanceAvailability": "ONLINE",
    "ModalitiesInStudy": ["CT", "SEG"],
    "SOPClassesInStudy": [CT, SEG],
    "NumberOfStudyRelatedSeries": 2,
    "NumberOfStudyRelatedInstances": 101,
    "NumberOfSeriesRelatedInstances": 100,
    "NumberOfPatientRelatedStudies": 1,
    "NumberOfPatientRelatedSeries": 2,
    "NumberOfPatientRelatedInstances": 101,
}
EVERY_KEY = [*ATTRIBUTES, *(name for names in COMPUTED.values() for name in names)]
NOT_INDEXED = [
    "PatientAge",  # AS
    "PatientWeight",  # DS
    "ReferencedStudySequence",  # SQ: an empty sequence
    "InstitutionName",
    "OtherPatientIDs",
    "RetrieveAETitle",  # AE
    "ImageComments",  # LT
    "StudyComments",  # LT, retired
    "InstanceCreationDate",
    "ContentDate",
    "PixelSpacing",
    "AcquisitionDateTime",  # DT
    "BitsAllocated",  # US, empty
    "ICCProfile",  # OB
    "RealWorldValueFirstValueMapped",  # "US or SS", asked for alone below
]


def _pydicom(row: dict[str, Any], keys: list[str], level: str, charset: Any, implicit: bool) -> Any:
    ds = to_dataset(row, keys, requested_charset=charset)
    ds.QueryRetrieveLevel = level
    return encode(ds, implicit, True)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_every_key_is_encoded_as_pydicom_encodes_it(level: str, implicit: bool) -> None:
    keys = [k for k in EVERY_KEY + NOT_INDEXED if k != "RealWorldValueFirstValueMapped"]
    ours = encode_identifier(ROW, keys, level, implicit_vr=implicit)
    assert ours is not None
    assert ours == _pydicom(ROW, keys, level, None, implicit)
    found = decode(io.BytesIO(ours), implicit, True)
    assert found.QueryRetrieveLevel == level
    assert found.PatientName == "Doe^Jane"
    assert found.StudyInstanceUID == ROW["StudyInstanceUID"]
    assert found.Rows == 512 and found.SeriesNumber == 3
    assert list(found.ModalitiesInStudy) == ["CT", "SEG"]
    assert found.ReferencedStudySequence == []
    assert "SpecificCharacterSet" not in found  # plain ASCII, nothing requested


@pytest.mark.parametrize(
    ("requested", "name", "answer"),
    [
        (None, "Müller^Jürgen", "ISO_IR 192"),  # not ASCII, nothing requested: UTF-8
        ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 100"),
        ("ISO_IR 100", "Ελληνικά^Ελένη", "ISO_IR 192"),  # latin-1 cannot hold it
        ("ISO_IR 192", "Ελληνικά^Ελένη=", "ISO_IR 192"),
        ("ISO_IR 144", "Иванов^Иван", "ISO_IR 144"),
        ("ISO_IR 126", "Παπαδόπουλος^Ελένη", "ISO_IR 126"),
        ("GB18030", "Wang^Xiaodong=王^小东", "GB18030"),
        ("GBK", "王^小东", "GBK"),
        ("ISO_IR 100", "Doe^Jane", "ISO_IR 100"),  # ASCII in the requested set: named as asked
    ],
)
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_texts_are_in_the_answers_character_set(
    requested: str | None, name: str, answer: str, implicit: bool
) -> None:
    row = {**ROW, "PatientName": name, "StudyDescription": name.split("^")[0] + " CT"}
    keys = ["PatientName", "PatientID", "StudyDescription", "StudyInstanceUID", "Modality"]
    ours = encode_identifier(row, keys, "STUDY", requested_charset=requested, implicit_vr=implicit)
    assert ours == _pydicom(row, keys, "STUDY", requested, implicit)
    found = decode(io.BytesIO(ours), implicit, True)
    assert found.SpecificCharacterSet == answer
    assert str(found.PatientName) == name.rstrip("=")
    assert found.StudyDescription == row["StudyDescription"]


@pytest.mark.parametrize(
    ("requested", "keys"),
    [
        (["", "ISO 2022 IR 87"], ["PatientName"]),  # code extensions: pydicom switches sets
        (None, ["RealWorldValueFirstValueMapped"]),  # "US or SS"
    ],
)
def test_what_pydicom_must_encode_is_left_to_it(requested: Any, keys: list[str]) -> None:
    row = {**ROW, "PatientName": "Yamada^Tarou=山田^太郎"}
    assert encode_identifier(row, keys, "STUDY", requested_charset=requested) is None
    assert _pydicom(row, keys, "STUDY", requested, True)  # which pydicom's path still answers
