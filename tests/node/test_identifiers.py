"""C-FIND response identifiers encoded directly (node/identifiers.py) are byte for byte what
pydicom writes for the Dataset storage.query.to_dataset makes (the path pynetdicom takes): for
every attribute the index holds and keys it does not, each level, both little-endian transfer
syntaxes, odd and even lengths, empty values, and answers in the requester's character set or in
UTF-8. Where the direct encoder declines (ISO 2022 code extensions, an ambiguous VR) it says so
and the caller keeps pydicom's path. Request identifiers read directly give the keys, level,
character set and matching that pydicom's Dataset gives."""

from __future__ import annotations

import io
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from nnunet_node.core.charset import terms_of
from nnunet_node.node.handlers import query_keys
from nnunet_node.node.identifiers import encode_identifier, read_find_identifier
from nnunet_node.storage.matching import Kind, match_of
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


def _request(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


REQUESTS = [
    _request(QueryRetrieveLevel="STUDY", PatientName="*", PatientID="", StudyInstanceUID=""),
    _request(
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",  # odd: NUL-padded on the wire
        SeriesInstanceUID="",
        Modality="CT\\MR",
        SeriesNumber="3",
        NumberOfSeriesRelatedInstances=None,
    ),
    _request(
        QueryRetrieveLevel="IMAGE",
        SpecificCharacterSet="ISO_IR 100",
        PatientName="Doe^J*",
        StudyDate="20240101-20240131",
        StudyTime="-1015",
        SOPInstanceUID="1.2.3\\1.2.4",
        InstanceNumber=None,
        Rows=None,  # US, empty
        ReferencedStudySequence=[],
        AccessionNumber="ACC_1%",
    ),
    _request(
        QueryRetrieveLevel="PATIENT",
        SpecificCharacterSet=["", "ISO 2022 IR 87"],
        PatientName="Yamada^Tarou",
        PatientSex="F",  # odd: space-padded
        NumberOfPatientRelatedStudies=None,
    ),
    _request(QueryRetrieveLevel="STUDY", StudyDescription="Head CT*", ModalitiesInStudy="SEG"),
]


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.QueryRetrieveLevel)
def test_request_keys_read_directly_are_pydicoms(request_: Dataset, implicit: bool) -> None:
    """What C-FIND matches on: the same keys in the same order, the same level and character
    set, and values that match the same rows (the same SQL shape and bound values)."""
    data = encode(request_, implicit, True)
    ours = read_find_identifier(data, implicit_vr=implicit)
    assert ours is not None
    theirs = decode(io.BytesIO(data), implicit, True)
    keys, matching = query_keys(theirs)
    assert ours.keys == keys
    assert ours.matching.keys() == matching.keys()
    assert ours.level.strip().upper() == str(theirs.QueryRetrieveLevel).strip().upper()
    assert terms_of(ours.charset) == terms_of(theirs.get("SpecificCharacterSet"))
    for keyword, value in matching.items():
        kind = ATTRIBUTES[keyword].kind if keyword in ATTRIBUTES else None
        if keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
            kind = Kind.STRING if keyword == "ModalitiesInStudy" else Kind.UID
        if kind is not None:
            assert match_of(ours.matching[keyword], kind) == match_of(value, kind), keyword


@pytest.mark.parametrize(
    "identifier",
    [
        _request(QueryRetrieveLevel="STUDY", PatientName="Müller^*"),  # ISO_IR 100 bytes
        _request(QueryRetrieveLevel="STUDY", PatientName="\x1b$B;3ED\x1b(B"),  # ISO 2022 escape
        _request(QueryRetrieveLevel="IMAGE", Rows=512),  # a binary value
    ],
    ids=["latin-1", "escape sequence", "binary"],
)
def test_what_only_pydicom_can_read_is_left_to_it(identifier: Dataset) -> None:
    identifier.SpecificCharacterSet = "ISO_IR 100"
    data = encode(identifier, True, True)
    assert read_find_identifier(data) is None
    assert decode(io.BytesIO(data), True, True).QueryRetrieveLevel  # pydicom's path reads it


def test_private_elements_are_neither_returned_nor_matched() -> None:
    identifier = _request(QueryRetrieveLevel="STUDY", PatientID="P1")
    identifier.add_new(0x00090010, "LO", "ACME")
    identifier.add_new(0x00091001, "LO", "x")
    found = read_find_identifier(encode(identifier, True, True))
    assert found is not None and found.keys == ["PatientID"]
    assert found.matching == {"PatientID": "P1"}
