"""storage.part10: the File Meta Information encoded directly is what pydicom's writer encodes,
and a Part 10 head in front of a dataset makes a file pydicom reads back."""

from __future__ import annotations

import io
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from nnunet_node.storage.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PREAMBLE,
    file_meta,
    part10_head,
)
from tests.support.datasets import build_dataset

PYNETDICOM_CLASS_UID = "1.2.826.0.1.3680043.9.3811.3.0.4"  # 32 characters
UID_64 = "1.2.826.0.1.3680043.8.498." + "1" * 38


def pydicom_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    *,
    source_ae_title: str = "",
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str = IMPLEMENTATION_VERSION_NAME,
) -> bytes:
    """The same group, encoded by ``write_file_meta_info``. With ``enforce_standard`` pydicom
    adds an Implementation Version Name of its own when there is none, so a group without one
    is written as given (group length and version included) instead."""
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0  # pydicom writes the real length
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(implementation_class_uid)
    if implementation_version_name:
        meta.ImplementationVersionName = implementation_version_name
    if source_ae_title:
        meta.SourceApplicationEntityTitle = source_ae_title
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=bool(implementation_version_name))
    return fp.getvalue()


UIDS = [
    pytest.param(CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian, id="odd-uids"),
    pytest.param(
        SecondaryCaptureImageStorage, "1.2.3.4.56", JPEGBaseline8Bit, id="even-instance-and-ts"
    ),
    pytest.param(RTStructureSetStorage, UID_64, ImplicitVRLittleEndian, id="64-character-uid"),
    pytest.param(CTImageStorage, generate_uid(), RLELossless, id="generated-uid"),
]


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), UIDS)
@pytest.mark.parametrize(
    "source_ae_title",
    ["", "SCANNER", "STORESCU", "A" * 16],
    ids=["no-ae", "odd-ae", "even-ae", "16-character-ae"],
)
@pytest.mark.parametrize(
    "implementation_version_name",
    [IMPLEMENTATION_VERSION_NAME, "", "NODE1", "PYNETDICOM_304"],
    ids=["default-version", "no-version", "odd-version", "even-version"],
)
def test_file_meta_bytes_are_pydicoms(
    sop_class: str,
    sop_instance: str,
    syntax: str,
    source_ae_title: str,
    implementation_version_name: str,
) -> None:
    identity = {
        "source_ae_title": source_ae_title,
        "implementation_version_name": implementation_version_name,
    }
    encoded = file_meta(sop_class, sop_instance, syntax, **identity)
    assert encoded == pydicom_file_meta(sop_class, sop_instance, syntax, **identity)


@pytest.mark.parametrize(
    "implementation_class_uid", [IMPLEMENTATION_CLASS_UID, PYNETDICOM_CLASS_UID, "1.2.3"]
)
def test_implementation_class_uid_bytes_are_pydicoms(implementation_class_uid: str) -> None:
    args = (CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian)
    encoded = file_meta(*args, implementation_class_uid=implementation_class_uid)
    expected = pydicom_file_meta(*args, implementation_class_uid=implementation_class_uid)
    assert encoded == expected


def test_defaults_name_pydicom_as_the_writer() -> None:
    meta = pydicom.dcmread(
        io.BytesIO(part10_head(CTImageStorage, "1.2.3", ExplicitVRLittleEndian))
    ).file_meta
    assert meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    assert str(meta.ImplementationVersionName).startswith("PYDICOM 3.")
    assert "SourceApplicationEntityTitle" not in meta


def _dataset_bytes(ds: Dataset, syntax: str) -> bytes:
    """``ds`` encoded in ``syntax`` by pydicom's ``write_dataset`` (no File Meta Information)."""
    fp = DicomBytesIO()
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    body = fp.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = compressor.compress(body) + compressor.flush()
    return body


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGBaseline8Bit,
    ],
)
@pytest.mark.parametrize("source_ae_title", ["", "SCANNER", "PACS01"], ids=["no-ae", "odd", "even"])
def test_head_and_dataset_read_back(syntax: str, source_ae_title: str) -> None:
    sop_uid = generate_uid()
    ds = build_dataset(sop_uid=sop_uid, PatientName="Doe^John", Rows=4)
    if syntax == JPEGBaseline8Bit:
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 fragment \xff\xd9"])
        ds["PixelData"].VR = "OB"
    del ds.file_meta
    pixels = ds.PixelData

    head = part10_head(ds.SOPClassUID, sop_uid, syntax, source_ae_title=source_ae_title)
    assert head[:132] == PREAMBLE == b"\x00" * 128 + b"DICM"
    read = pydicom.dcmread(io.BytesIO(head + _dataset_bytes(ds, syntax)))

    meta = read.file_meta
    assert meta.FileMetaInformationGroupLength == len(head) - 132 - 12
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == read.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == sop_uid == read.SOPInstanceUID
    assert meta.TransferSyntaxUID == syntax
    if source_ae_title:
        assert meta.SourceApplicationEntityTitle == source_ae_title
    else:
        assert "SourceApplicationEntityTitle" not in meta
    assert str(read.PatientName) == "Doe^John"
    assert read.StudyInstanceUID == ds.StudyInstanceUID
    assert read.Rows == 4
    assert read.PixelData == pixels


def test_identity_of_the_node_reads_back() -> None:
    head = part10_head(
        CTImageStorage,
        "1.2.3.4",
        ExplicitVRLittleEndian,
        source_ae_title="MODALITY",
        implementation_class_uid=PYNETDICOM_CLASS_UID,
        implementation_version_name="PYNETDICOM_304",
    )
    meta = pydicom.dcmread(io.BytesIO(head)).file_meta
    assert meta.ImplementationClassUID == PYNETDICOM_CLASS_UID
    assert meta.ImplementationVersionName == "PYNETDICOM_304"
    assert meta.SourceApplicationEntityTitle == "MODALITY"


@pytest.mark.parametrize(
    "argument",
    ["sop_class_uid", "sop_instance_uid", "transfer_syntax_uid", "implementation_class_uid"],
)
def test_uid_over_64_characters_is_refused(argument: str) -> None:
    values = {
        "sop_class_uid": CTImageStorage,
        "sop_instance_uid": "1.2.3",
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "implementation_class_uid": IMPLEMENTATION_CLASS_UID,
    }
    file_meta(**(values | {argument: UID_64}))  # 64: the longest there is
    with pytest.raises(ValueError):
        file_meta(**(values | {argument: UID_64 + "1"}))
    with pytest.raises(ValueError):
        part10_head(**(values | {argument: UID_64 + "1"}))


@pytest.mark.parametrize("argument", ["source_ae_title", "implementation_version_name"])
def test_text_over_16_characters_is_refused(argument: str) -> None:
    args = (CTImageStorage, "1.2.3", ExplicitVRLittleEndian)
    file_meta(*args, **{argument: "A" * 16})
    with pytest.raises(ValueError):
        file_meta(*args, **{argument: "A" * 17})
    with pytest.raises(ValueError):
        part10_head(*args, **{argument: "A" * 17})


@pytest.mark.parametrize(
    "values",
    [
        {"source_ae_title": "SCANNÉ"},
        {"implementation_version_name": "NŒUD"},
        {"sop_instance_uid": "1.2.3\u00b9"},
    ],
    ids=["ae-title", "version-name", "uid"],
)
def test_non_ascii_is_refused(values: dict[str, str]) -> None:
    arguments = {
        "sop_class_uid": CTImageStorage,
        "sop_instance_uid": "1.2.3",
        "transfer_syntax_uid": ExplicitVRLittleEndian,
    } | values
    with pytest.raises(ValueError):
        file_meta(**arguments)
