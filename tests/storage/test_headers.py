"""read_header and header_from_prefix: the direct scan (core.dicomscan) gives what pydicom gives.

The scan answers for Little Endian files with ASCII values and says NotSure for the rest; either
way the header must be the one pydicom's reader builds. A prefix of a file still arriving gives
the whole header or None, never a header missing what the bytes did not reach yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RTStructureSetStorage,
    generate_uid,
)

from nnunet_node.core import dicomscan
from nnunet_node.core.errors import InvalidDicom, shown_value
from nnunet_node.storage.headers import (
    INSTANCE_INT_ATTRIBUTES,
    PATIENT_ATTRIBUTES,
    SERIES_ATTRIBUTES,
    SERIES_INT_ATTRIBUTES,
    STUDY_ATTRIBUTES,
    _scanned_header,
    header_from_prefix,
    read_header,
    read_header_pydicom,
)
from nnunet_node.storage.indexer import Header
from tests.support.datasets import build_dataset, encode

# --- building files ---------------------------------------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_UNDEFINED = 0xFFFFFFFF

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
STUDY_DESCRIPTION = 0x00081030
STUDY_UID = 0x0020000D
SERIES_NUMBER = 0x00200011
INSTANCE_NUMBER = 0x00200013
FRAME_OF_REFERENCE_UID = 0x00200052
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
COLUMNS = 0x00280011
PIXEL_DATA = 0x7FE00010


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """pydicom warns about odd values; in production that is a log line, not an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` as a Part 10 file in ``transfer_syntax`` (pydicom's writer)."""
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return encode(ds)


def raw(tag: int, vr: bytes, value: bytes, *, implicit: bool = False, length: int = -1) -> bytes:
    """One Little Endian data element, encoded by hand (PS3.5 7.1); ``length`` overrides."""
    group, element = tag >> 16, tag & 0xFFFF
    size = len(value) if length < 0 else length
    if implicit:
        return struct.pack("<HHI", group, element, size) + value
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr, 0, size) + value
    return struct.pack("<HH2sH", group, element, vr, size) + value


def item(*elements: bytes, defined: bool = False) -> bytes:
    body = b"".join(elements)
    if defined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    return (
        struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED)
        + body
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    )


def sequence_end() -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def elements_of(ds: Dataset, *, implicit: bool = False) -> dict[int, bytes]:
    """Each top-level element of ``ds`` encoded on its own (Little Endian), by tag."""
    encoded: dict[int, bytes] = {}
    with quiet():
        correct_ambiguous_vr(ds, is_little_endian=True)
        for elem in ds:
            fp = DicomBytesIO()
            fp.is_little_endian = True
            fp.is_implicit_VR = implicit
            write_data_element(fp, elem, ds.get("SpecificCharacterSet", "ISO_IR 6"))
            encoded[int(elem.tag)] = fp.getvalue()
    return encoded


def assemble(elements: Iterable[bytes], transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Preamble, File Meta Information (pydicom's writer) and these dataset bytes, as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + b"".join(elements)


def edited(
    ds: Dataset,
    replace: dict[int, bytes] | None = None,
    *,
    drop: Iterable[int] = (),
    implicit: bool = False,
) -> bytes:
    """``ds`` with some elements replaced by hand-encoded bytes (in tag order), some dropped."""
    encoded = elements_of(ds, implicit=implicit) | (replace or {})
    for tag in drop:
        encoded.pop(tag, None)
    transfer_syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return assemble((encoded[tag] for tag in sorted(encoded)), transfer_syntax)


def all_indexed_attributes() -> dict[str, Any]:
    """A value for every attribute the index keeps (headers.py's keyword tables)."""
    values: dict[str, Any] = {
        "IssuerOfPatientID": "HOSPITAL-A",
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
        "StudyDate": "20240102",
        "StudyTime": "101500.123",
        "AccessionNumber": "ACC0001",
        "StudyID": "S17",
        "StudyDescription": "CT Thorax",
        "ReferringPhysicianName": "House^Gregory",
        "Modality": "CT",
        "SeriesDescription": "Lung 1.0 B70f",
        "BodyPartExamined": "CHEST",
        "SeriesDate": "20240102",
        "SeriesTime": "101733",
        "FrameOfReferenceUID": "1.2.826.0.1.3680043.2.1125.1.7",
        "SeriesNumber": 3,
        "InstanceNumber": 42,
        "NumberOfFrames": 1,
    }
    kept = (
        *PATIENT_ATTRIBUTES,
        *STUDY_ATTRIBUTES,
        *SERIES_ATTRIBUTES,
        *SERIES_INT_ATTRIBUTES,
        *INSTANCE_INT_ATTRIBUTES,
    )
    missing = set(kept) - set(values) - {"Rows", "Columns"}
    assert not missing, f"add a value for {missing}"
    return values


def ct(**attributes: Any) -> Dataset:
    return build_dataset(**(all_indexed_attributes() | attributes))


def undefined_length_sequences(ds: Dataset) -> Dataset:
    """Add a Referenced Image Sequence (0008,1140) of undefined length, before the wanted tags,
    whose first item (of undefined length) nests another undefined-length sequence."""
    nested = Dataset()
    nested.ReferencedSOPClassUID = CTImageStorage
    nested.ReferencedSOPInstanceUID = "1.2.3.4.5"
    nested.is_undefined_length_sequence_item = True
    first = Dataset()
    first.ReferencedSOPClassUID = CTImageStorage
    first.ReferencedSOPInstanceUID = "1.2.3.4.6"
    first.SourceImageSequence = Sequence([nested])
    first["SourceImageSequence"].is_undefined_length = True
    first.is_undefined_length_sequence_item = True
    second = Dataset()  # defined length
    second.ReferencedSOPClassUID = CTImageStorage
    second.ReferencedSOPInstanceUID = "1.2.3.4.7"
    ds.ReferencedImageSequence = Sequence([first, second])
    ds["ReferencedImageSequence"].is_undefined_length = True
    return ds


def items_with_wanted_tags() -> Dataset:
    """Items (of defined and undefined length) that hold tags the index reads at the top level:
    only the top-level values count."""
    ds = undefined_length_sequences(ct())
    for inner in (ds.ReferencedImageSequence[0], ds.ReferencedImageSequence[1]):
        inner.SOPInstanceUID = "9.9.9"
        inner.PatientName = "Other^Name"
        inner.InstanceNumber = 99
        inner.Rows = 1
    ds.ReferencedImageSequence[0].SourceImageSequence[0].StudyInstanceUID = "9.9.8"
    return ds


def private_un_sequence(*, implicit: bool = False) -> bytes:
    """A private creator and a (0009,1010) UN of undefined length holding Implicit VR items:
    one of undefined length with a nested undefined-length sequence, one of defined length."""
    value = raw(0x00091001, b"UN", b"abcd", implicit=True)
    nested = (
        raw(0x00091002, b"UN", b"", implicit=True, length=_UNDEFINED) + item(value) + sequence_end()
    )
    header = (
        raw(0x00091010, b"UN", b"", implicit=True, length=_UNDEFINED)
        if implicit
        else struct.pack("<HH2sHI", 0x0009, 0x1010, b"UN", 0, _UNDEFINED)
    )
    return (
        raw(0x00090010, b"LO", b"ACME", implicit=implicit)
        + header
        + item(value, nested)
        + item(value, defined=True)
        + sequence_end()
    )


def with_private_un(ds: Dataset, *, implicit: bool = False) -> bytes:
    encoded = elements_of(ds, implicit=implicit)
    before = [encoded[tag] for tag in sorted(encoded) if tag < 0x00090010]
    after = [encoded[tag] for tag in sorted(encoded) if tag > 0x00091010]
    transfer_syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return assemble([*before, private_un_sequence(implicit=implicit), *after], transfer_syntax)


def deflated(ds: Dataset) -> bytes:
    """Deflated Explicit VR Little Endian, built by hand (PS3.5 A.5)."""
    encoded = elements_of(ds)
    body = b"".join(encoded[tag] for tag in sorted(encoded))
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return assemble(
        [compressor.compress(body) + compressor.flush()], DeflatedExplicitVRLittleEndian
    )


def encapsulated() -> bytes:
    ds = ct()
    ds.PixelData = encapsulate(
        [b"\xff\xd8\xff\xe0not a real jpeg\xff\xd9", b"\xff\xd8more\xff\xd9"]
    )
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    return part10(ds, JPEGBaseline8Bit)


def rtstruct(*, with_roi_sequence: bool) -> bytes:
    """An RT Structure Set: no pixel data, the file ends after the last element."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ds.Modality = "RTSTRUCT"
    ds.SeriesNumber = 9
    if with_roi_sequence:
        roi = Dataset()
        roi.ROINumber = 1
        roi.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
        roi.ROIName = "Liver"
        ds.StructureSetLabel = "nnU-Net"
        ds.StructureSetROISequence = Sequence([roi])
    return part10(ds)


def out_of_order(ds: Dataset, tag: int, value: bytes, vr: bytes, *, after: int) -> bytes:
    """``ds`` with the element ``tag`` moved after the element ``after`` (not conformant, but
    sent by real devices): pydicom reads the dataset whatever the order."""
    encoded = elements_of(ds)
    encoded.pop(tag, None)
    ordered = [encoded[t] for t in sorted(encoded)]
    index = sorted(encoded).index(after) + 1
    ordered.insert(index, raw(tag, vr, value))
    return assemble(ordered)


def realistic_ct() -> Dataset:
    """A CT slice as scanners send them: ~3 KB of header, then 64x64 pixels."""
    ds = ct(
        SpecificCharacterSet="ISO_IR 100",
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        AcquisitionDate="20240102",
        ContentDate="20240102",
        AcquisitionTime="101801.5",
        ContentTime="101802",
        Manufacturer="ACME Medical",
        InstitutionName="General Hospital",
        StationName="CT01",
        ManufacturerModelName="Spinner 128",
        PatientAge="054Y",
        SliceThickness="1.0",
        KVP="120",
        DataCollectionDiameter="500",
        SoftwareVersions="VA40",
        ProtocolName="Thorax routine",
        ReconstructionDiameter="380",
        GantryDetectorTilt="0",
        TableHeight="150",
        RotationDirection="CW",
        ExposureTime="500",
        XRayTubeCurrent="200",
        Exposure="100",
        FilterType="FLAT",
        ConvolutionKernel="B70f",
        PatientPosition="HFS",
        AcquisitionNumber=2,
        ImagePositionPatient=["-190.0", "-190.0", "-120.5"],
        ImageOrientationPatient=["1", "0", "0", "0", "1", "0"],
        PositionReferenceIndicator="",
        SliceLocation="-120.5",
        PixelSpacing=["0.7421875", "0.7421875"],
        WindowCenter=["40", "-600"],
        WindowWidth=["400", "1200"],
        RescaleIntercept="-1024",
        RescaleSlope="1",
        RescaleType="HU",
        size=64,
    )
    del ds.NumberOfFrames
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = Sequence([ref])
    ds.add_new(0x00190010, "LO", "ACME CT PRIVATE")
    ds.add_new(0x00191001, "OB", bytes(range(256)) * 8)
    ds.add_new(0x00191002, "DS", "1.5")
    ds.add_new(0x00430010, "LO", "ACME CT PRIVATE 2")
    ds.add_new(0x00431001, "SS", 7)
    return ds


# --- the corpus -------------------------------------------------------------------------------

FAST, FALLBACK, EITHER = "fast", "fallback", "either"
"""Whether the scan must answer, must send the file to pydicom, or may do either."""


def _corpus() -> dict[str, tuple[str, Callable[[], bytes]]]:
    return {
        "explicit LE, every indexed attribute": (FAST, lambda: part10(ct())),
        "implicit VR LE": (FAST, lambda: part10(ct(), ImplicitVRLittleEndian)),
        "realistic CT with private elements": (FAST, lambda: part10(realistic_ct())),
        "undefined-length sequences, explicit": (
            FAST,
            lambda: part10(undefined_length_sequences(ct())),
        ),
        "undefined-length sequences, implicit": (
            FAST,
            lambda: part10(undefined_length_sequences(ct()), ImplicitVRLittleEndian),
        ),
        "wanted tags inside sequence items": (FAST, lambda: part10(items_with_wanted_tags())),
        "wanted tags inside sequence items, implicit": (
            FAST,
            lambda: part10(items_with_wanted_tags(), ImplicitVRLittleEndian),
        ),
        "private UN of undefined length, explicit": (FAST, lambda: with_private_un(ct())),
        "private undefined-length element, implicit": (
            FAST,
            lambda: with_private_un(ct(), implicit=True),
        ),
        "odd-length values": (
            FAST,
            lambda: edited(
                ct(sop_uid="1.2.3.4.5"),  # 9 characters: padded with NUL by the writer
                {
                    PATIENT_ID: raw(PATIENT_ID, b"LO", b"P12"),
                    STUDY_DESCRIPTION: raw(STUDY_DESCRIPTION, b"LO", b"Thora"),
                    FRAME_OF_REFERENCE_UID: raw(FRAME_OF_REFERENCE_UID, b"UI", b"1.2.345"),
                    SERIES_NUMBER: raw(SERIES_NUMBER, b"IS", b"7"),
                },
            ),
        ),
        "empty values": (
            FAST,
            lambda: edited(
                ct(),
                {
                    PATIENT_NAME: raw(PATIENT_NAME, b"PN", b""),
                    STUDY_DESCRIPTION: raw(STUDY_DESCRIPTION, b"LO", b""),
                    SERIES_NUMBER: raw(SERIES_NUMBER, b"IS", b""),
                    INSTANCE_NUMBER: raw(INSTANCE_NUMBER, b"IS", b"  "),
                    NUMBER_OF_FRAMES: raw(NUMBER_OF_FRAMES, b"IS", b""),
                    ROWS: raw(ROWS, b"US", b""),
                },
            ),
        ),
        "values padded with spaces and NULs": (
            FAST,
            lambda: edited(
                ct(),
                {
                    PATIENT_ID: raw(PATIENT_ID, b"LO", b" P1 "),
                    PATIENT_NAME: raw(PATIENT_NAME, b"PN", b"Doe^Jane\x00\x00"),
                    SERIES_NUMBER: raw(SERIES_NUMBER, b"IS", b" 12 "),
                    INSTANCE_NUMBER: raw(INSTANCE_NUMBER, b"IS", b"+7\x00"),
                    NUMBER_OF_FRAMES: raw(NUMBER_OF_FRAMES, b"IS", b"0001"),
                    STUDY_UID: raw(STUDY_UID, b"UI", b"1.2.840.99 "),
                },
            ),
        ),
        "bad and multi-valued IS": (
            FAST,
            lambda: edited(
                ct(),
                {
                    SERIES_NUMBER: raw(SERIES_NUMBER, b"IS", b"abc "),
                    INSTANCE_NUMBER: raw(INSTANCE_NUMBER, b"IS", b"1\\2 "),
                    NUMBER_OF_FRAMES: raw(NUMBER_OF_FRAMES, b"IS", b"1.5 "),
                },
            ),
        ),
        "multi-valued text": (
            FAST,
            lambda: edited(ct(), {PATIENT_NAME: raw(PATIENT_NAME, b"PN", b"Doe^Jane\\Roe^J")}),
        ),
        "Rows and Columns as UN": (
            FAST,
            lambda: edited(
                ct(size=4),
                {ROWS: raw(ROWS, b"UN", b"\x02\x00"), COLUMNS: raw(COLUMNS, b"UN", b"\x04\x00")},
            ),
        ),
        "Rows with two values": (
            EITHER,
            lambda: edited(ct(), {ROWS: raw(ROWS, b"US", b"\x04\x00\x08\x00")}),
        ),
        "Rows with the wrong VR": (
            EITHER,
            lambda: edited(ct(), {ROWS: raw(ROWS, b"SS", b"\x04\x00")}),
        ),
        "group length elements": (
            FAST,
            lambda: edited(
                ct(),
                {
                    0x00080000: raw(0x00080000, b"UL", struct.pack("<I", 0)),
                    0x00200000: raw(0x00200000, b"UL", struct.pack("<I", 1234)),
                },
            ),
        ),
        "ISO_IR 100, ASCII values": (FAST, lambda: part10(ct(SpecificCharacterSet="ISO_IR 100"))),
        "ISO_IR 100, non-ASCII name": (
            FALLBACK,
            lambda: part10(ct(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")),
        ),
        "ISO_IR 192, non-ASCII names": (
            FALLBACK,
            lambda: part10(
                ct(
                    SpecificCharacterSet="ISO_IR 192",
                    PatientName="Иванов^Иван",
                    StudyDescription="Грудная клетка",
                )
            ),
        ),
        "explicit VR big endian": (FALLBACK, lambda: part10(ct(), ExplicitVRBigEndian)),
        "deflated explicit VR LE": (FALLBACK, lambda: deflated(ct())),
        "JPEG baseline, encapsulated pixel data": (FAST, encapsulated),
        "RT structure set, no pixel data": (FAST, lambda: rtstruct(with_roi_sequence=True)),
        "dataset ending before the last wanted tag": (
            FAST,
            lambda: rtstruct(with_roi_sequence=False),
        ),
        "wanted tags out of order": (
            EITHER,
            lambda: out_of_order(ct(), STUDY_UID, b"1.2.840.77", b"UI", after=SERIES_NUMBER),
        ),
        "a wanted tag after the last wanted one": (
            EITHER,  # past where the scan stops: it must not answer without it
            lambda: out_of_order(ct(), INSTANCE_NUMBER, b"42", b"IS", after=0x00280100),
        ),
        "a wanted element of undefined length": (
            EITHER,
            lambda: edited(
                ct(),
                {
                    STUDY_DESCRIPTION: raw(STUDY_DESCRIPTION, b"UN", b"", length=_UNDEFINED)
                    + sequence_end()
                },
            ),
        ),
    }


CORPUS = _corpus()


@pytest.fixture(scope="module")
def corpus() -> dict[str, tuple[str, bytes]]:
    return {name: (mode, build()) for name, (mode, build) in CORPUS.items()}


def pydicom_header(data: bytes) -> Header:
    """The reference: pydicom's reader (``dcmread(stop_before_pixels=True)``)."""
    with quiet():
        return read_header_pydicom(data)


def read(data: bytes | Path) -> Header:
    with quiet():
        return read_header(data)


# --- equivalence ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORPUS))
def test_scan_and_pydicom_give_the_same_header(
    corpus: dict[str, tuple[str, bytes]], name: str
) -> None:
    mode, data = corpus[name]
    expected = pydicom_header(data)
    if mode == FAST:
        assert _scanned_header(data, complete=True) == expected
    elif mode == FALLBACK:
        with pytest.raises(dicomscan.NotSure):
            _scanned_header(data, complete=True)
    else:
        with contextlib.suppress(dicomscan.NotSure):
            assert _scanned_header(data, complete=True) == expected
    assert read(data) == expected


@pytest.mark.parametrize("name", list(CORPUS))
def test_read_header_from_a_file_or_stream(
    corpus: dict[str, tuple[str, bytes]], name: str, tmp_path: Path
) -> None:
    _, data = corpus[name]
    path = tmp_path / "instance.dcm"
    path.write_bytes(data)
    expected = pydicom_header(data)
    assert read(path) == expected
    with quiet():
        assert read_header(io.BytesIO(data)) == expected
        assert read_header(bytearray(data)) == expected


def test_every_indexed_value_is_read() -> None:
    """What the index keeps, checked value by value (not only against pydicom)."""
    ds = ct(size=8, sop_uid="1.2.3.4.5", study_uid="1.2.3", series_uid="1.2.3.4")
    for data in (part10(ds), part10(ds, ImplicitVRLittleEndian)):
        header = read(data)
        assert (header.sop_instance_uid, header.study_instance_uid) == ("1.2.3.4.5", "1.2.3")
        assert (header.series_instance_uid, header.sop_class_uid) == ("1.2.3.4", CTImageStorage)
        assert header.patient == {
            "patient_id": "P1",
            "issuer_of_patient_id": "HOSPITAL-A",
            "patient_name": "Doe^Jane",
            "patient_birth_date": "19700101",
            "patient_sex": "F",
        }
        assert header.study == {
            "study_date": "20240102",
            "study_time": "101500.123",
            "accession_number": "ACC0001",
            "study_id": "S17",
            "study_description": "CT Thorax",
            "referring_physician_name": "House^Gregory",
        }
        assert header.series == {
            "modality": "CT",
            "series_description": "Lung 1.0 B70f",
            "body_part_examined": "CHEST",
            "series_date": "20240102",
            "series_time": "101733",
            "frame_of_reference_uid": "1.2.826.0.1.3680043.2.1125.1.7",
            "series_number": 3,
        }
        assert header.instance == {
            "instance_number": 42,
            "rows": 8,
            "columns": 8,
            "number_of_frames": 1,
        }


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: part10(ds, ImplicitVRLittleEndian),
        lambda ds: part10(ds, ExplicitVRBigEndian),
        deflated,
    ],
    ids=["implicit", "big endian", "deflated"],
)
def test_the_transfer_syntax_changes_nothing_else(make: Callable[[Dataset], bytes]) -> None:
    ds = ct(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen", size=8)
    reference = read(part10(ds))
    data = make(ds)
    header = read(data)
    assert header.patient["patient_name"] == "Müller^Jürgen"
    assert header.instance == {
        "instance_number": 42,
        "rows": 8,
        "columns": 8,
        "number_of_frames": 1,
    }
    syntax = pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID
    assert header == dataclasses.replace(reference, transfer_syntax_uid=syntax)


def test_non_ascii_names_are_decoded_with_their_character_set() -> None:
    """ISO 2022 IR 87 (Japanese) is 7-bit: its escape sequences are ASCII bytes, yet the value
    is not ASCII text. The header holds the name as pydicom decodes it."""
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds = ct(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName=name)
    data = part10(ds)
    assert str(pydicom.dcmread(io.BytesIO(data)).PatientName) == name
    assert read(data).patient["patient_name"] == name


# --- refusals ---------------------------------------------------------------------------------


def _refusal(data: bytes) -> str:
    with pytest.raises(InvalidDicom) as refused:
        read(data)
    return str(refused.value)


def _pydicom_refusal(data: bytes) -> str:
    with pytest.raises(InvalidDicom) as refused:
        pydicom_header(data)
    return str(refused.value)


BAD_UIDS = ["1.2.3.", "1.2/../3", "1." + "2" * 63, "1.2.abc", ".1.2", "1..2", "1.2.3 4"]


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize(
    ("keyword", "tag"),
    [
        ("SOPInstanceUID", 0x00080018),
        ("StudyInstanceUID", STUDY_UID),
        ("SeriesInstanceUID", 0x0020000E),
        ("SOPClassUID", 0x00080016),
    ],
)
def test_missing_uid_is_refused(keyword: str, tag: int, implicit: bool) -> None:
    data = edited(ct(), drop=[tag], implicit=implicit)
    message = _refusal(data)
    assert message == _pydicom_refusal(data)
    assert message == f"{keyword} is missing"


@pytest.mark.parametrize("uid", BAD_UIDS)
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID"])
def test_invalid_uid_is_refused(keyword: str, uid: str) -> None:
    ds = ct(**{keyword: uid})
    data = part10(ds)
    message = _refusal(data)
    assert message == _pydicom_refusal(data)
    assert message == f"{keyword} {shown_value(uid)} is not a valid UID (PS3.5 9.1)"
    assert message.isascii() and len(message) < 150


def test_invalid_uid_in_a_fallback_file_is_refused_alike() -> None:
    ds = ct(SpecificCharacterSet="ISO_IR 192", PatientName="Иванов", SOPInstanceUID="1.2/../3")
    data = part10(ds)
    with pytest.raises(dicomscan.NotSure):
        _scanned_header(data, complete=True)
    assert _refusal(data) == "SOPInstanceUID '1.2/../3' is not a valid UID (PS3.5 9.1)"


def test_non_ascii_uid_is_refused() -> None:
    data = edited(ct(), {STUDY_UID: raw(STUDY_UID, b"UI", b"1.2.3\xe9")})
    message = _refusal(data)
    assert message == _pydicom_refusal(data)
    # the byte as sent, escaped: the message stays printable ASCII
    assert message == "StudyInstanceUID '1.2.3\\xe9' is not a valid UID (PS3.5 9.1)"


def test_overlong_uid_is_quoted_cut_short() -> None:
    uid = "1.2." + "9" * 200
    message = _refusal(part10(ct(SOPInstanceUID=uid)))
    quoted = f"'{uid[:64]}'... (204 characters)"
    assert message == f"SOPInstanceUID {quoted} is not a valid UID (PS3.5 9.1)"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, world",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 300,
        b"\x00" * 128 + b"DICM",
        b"\x00" * 128 + b"DICM" + b"\xff" * 200,
    ],
    ids=["empty", "text", "png", "preamble only", "garbage after DICM"],
)
def test_not_dicom_is_refused(data: bytes) -> None:
    _refusal(data)


def _value_end(data: bytes, tag: int) -> int:
    """Where the value of the top-level element ``tag`` ends in ``data``."""
    with quiet():
        elem = pydicom.dcmread(io.BytesIO(data)).get_item(tag)
    assert isinstance(elem, RawDataElement) and elem.value_tell is not None
    return int(elem.value_tell) + int(elem.length)


@pytest.mark.parametrize(
    "tag",
    [0x00020010, 0x00080018, FRAME_OF_REFERENCE_UID, INSTANCE_NUMBER, ROWS],
    ids=["TransferSyntaxUID", "SOPInstanceUID", "FrameOfReferenceUID", "InstanceNumber", "Rows"],
)
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_file_cut_inside_its_header_is_refused(tag: int, implicit: bool) -> None:
    """A file whose bytes end inside an element of its header (a transfer cut short, a disk
    full): refused, not indexed with the values it lost."""
    data = part10(ct(), ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    if tag >> 16 == 0x0002:  # File Meta Information: always explicit VR
        cut = data.index(struct.pack("<HH2s", 0x0002, tag & 0xFFFF, b"UI"), 132) + 8 + 3
    else:
        cut = _value_end(data, tag) - 1
    _refusal(data[:cut])


@pytest.mark.parametrize("implicit", [False, True])
def test_native_pixel_data_shorter_than_the_image_is_refused(implicit: bool) -> None:
    """A file cut inside its pixel data and then written again with a consistent length (a
    lenient reader's copy): the element fits the file, but holds fewer bytes than Rows x
    Columns x Samples per Pixel x Bits Allocated / 8 (PS3.5 8.1.1). Refused; the whole image,
    and one with a byte of padding more, are read."""
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = ct(size=4)
    whole = bytes(ds.PixelData)
    assert len(whole) == 4 * 4 * 2
    assert read_header(part10(ds, syntax)).pixel_bytes == 32
    ds.PixelData = whole + b"\0\0"
    read_header(part10(ds, syntax))
    ds.PixelData = whole[:16]
    with pytest.raises(InvalidDicom, match=r"pixel data holds 16 bytes .* need 32"):
        read_header(part10(ds, syntax))


def test_native_colour_and_one_bit_pixel_data_of_the_right_size_are_read() -> None:
    """The length check refuses no valid image: YBR_FULL_422 holds 2 bytes per pixel for 3
    samples (PS3.3 C.7.6.3.1.2), RGB 3; a binary SEG's frames are packed bits (PS3.3 C.8.20.2)."""
    ds = ct(size=4)
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = bytes(4 * 4 * 2)
    assert read_header(part10(ds)).pixel_bytes == 32
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = bytes(4 * 4 * 3)
    read_header(part10(ds))
    seg = ct(size=4)
    seg.SamplesPerPixel, seg.BitsAllocated, seg.BitsStored, seg.HighBit = 1, 1, 1, 0
    seg.NumberOfFrames = 3
    seg.PixelData = bytes((4 * 4 * 3 + 7) // 8)
    assert read_header(part10(seg)).pixel_bytes == 6
    seg.PixelData = bytes(4)
    with pytest.raises(InvalidDicom, match="holds 4 bytes"):
        read_header(part10(seg))


# --- prefixes of a file still arriving ---------------------------------------------------------


def _pixel_data_offset(data: bytes) -> int:
    with quiet():
        ds = pydicom.dcmread(io.BytesIO(data))
    elem = ds.get_item(PIXEL_DATA)
    assert isinstance(elem, RawDataElement) and elem.value_tell is not None
    explicit = not ds.original_encoding[0]
    return int(elem.value_tell) - (12 if explicit else 8)


def _prefix_file(kind: str) -> bytes:
    if kind == "realistic CT":
        return part10(realistic_ct())
    if kind == "undefined-length sequences and private UN":
        ds = undefined_length_sequences(ct(size=16))
        encoded = elements_of(ds)
        before = [encoded[tag] for tag in sorted(encoded) if tag < 0x00090010]
        after = [encoded[tag] for tag in sorted(encoded) if tag > 0x00091010]
        return assemble([*before, private_un_sequence(), *after])
    if kind == "implicit VR with sequences":
        return part10(undefined_length_sequences(ct(size=16)), ImplicitVRLittleEndian)
    if kind == "ISO_IR 192 (pydicom reads it)":
        return part10(ct(SpecificCharacterSet="ISO_IR 192", PatientName="Иванов^Иван", size=16))
    if kind == "big endian (pydicom reads it)":
        return part10(ct(size=16), ExplicitVRBigEndian)
    raise AssertionError(kind)


PREFIX_FILES = [
    "realistic CT",
    "undefined-length sequences and private UN",
    "implicit VR with sequences",
    "ISO_IR 192 (pydicom reads it)",
    "big endian (pydicom reads it)",
]


def _lengths(data: bytes, pixel_offset: int) -> list[int]:
    header_part = pixel_offset + 12
    every = range(header_part + 64 + 1)
    sample = range(header_part + 65, len(data), 97)
    return sorted({*every, *sample, len(data) - 1, len(data)})


@pytest.mark.parametrize("kind", PREFIX_FILES)
def test_a_prefix_gives_the_whole_header_or_none(kind: str) -> None:
    data = _prefix_file(kind)
    full = read(data)
    assert full == pydicom_header(data)
    pixel_offset = _pixel_data_offset(data)
    if kind == "realistic CT":
        assert 2048 <= pixel_offset <= 4096, pixel_offset
    answered = []
    with quiet():
        for n in _lengths(data, pixel_offset):
            header = header_from_prefix(data[:n])
            assert header is None or header == full, f"a partial header from {n} bytes"
            if n >= pixel_offset + 12:
                assert header == full, f"no header from {n} bytes (pixel data at {pixel_offset})"
            if header is not None:
                answered.append(n)
    assert answered and answered[-1] == len(data)


@pytest.mark.parametrize("kind", PREFIX_FILES[:3])
def test_the_scan_of_a_prefix_never_answers_wrong(kind: str) -> None:
    data = _prefix_file(kind)
    full = _scanned_header(data, complete=True)
    assert full is not None and full == read(data)
    pixel_offset = _pixel_data_offset(data)
    for n in _lengths(data, pixel_offset):
        try:
            header = _scanned_header(data[:n], complete=False)
        except dicomscan.NotSure:
            assert n < 132, f"the scan gave up at {n} bytes of a file it reads whole"
            continue
        assert header is None or header == full, f"a partial header from {n} bytes"
        if n >= pixel_offset + 8:  # (7FE0,0010) read: past the last wanted tag
            assert header == full


def test_a_prefix_of_a_file_without_pixel_data_is_never_partial() -> None:
    """A dataset that ends before any tag past the wanted ones: no prefix may answer early."""
    data = rtstruct(with_roi_sequence=False)
    full = read(data)
    for n in range(len(data) + 1):
        header = header_from_prefix(data[:n])
        assert header is None or header == full, f"a partial header from {n} bytes"


def test_a_prefix_with_bad_uids_is_left_to_the_whole_file() -> None:
    data = part10(ct(SOPInstanceUID="1.2/../3", size=16))
    assert header_from_prefix(data) is None
    _refusal(data)


def test_a_large_header_in_a_file_is_read_past_the_scanned_bytes(tmp_path: Path) -> None:
    """read_header scans the first 256 KB of a file; a header longer than that is read whole."""
    ds = ct()
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "OB", b"\x01" * (300 * 1024))
    data = part10(ds)
    path = tmp_path / "large.dcm"
    path.write_bytes(data)
    expected = pydicom_header(data)
    assert expected.instance["instance_number"] == 42
    assert read(path) == expected
    assert read(data) == expected


# --- files cut inside their pixel data ---------------------------------------------------------


def _encapsulated(ds: Dataset) -> bytes:
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 300 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    return encode(ds)


def test_a_file_cut_inside_its_pixel_data_is_refused(tmp_path: Path) -> None:
    """A sender that stops early (STOW-RS, C-STORE) must not have its short file filed: pydicom
    reads it without a word, and the archive would replace a good copy with it."""
    whole = encode(build_dataset(size=64))
    assert read_header(whole).sop_instance_uid  # the whole file is fine
    with pytest.raises(InvalidDicom, match="pixel data"):
        read_header(whole[:-100])
    big = encode(build_dataset(size=512))  # longer than the prefix read from a path
    path = tmp_path / "big.dcm"
    path.write_bytes(big)
    assert read_header(path).sop_instance_uid
    path.write_bytes(big[: len(big) - 1000])
    with pytest.raises(InvalidDicom, match="pixel data"):
        read_header(path)
    jpeg = _encapsulated(build_dataset(size=8))
    assert read_header(jpeg).sop_instance_uid
    with pytest.raises(InvalidDicom, match="pixel data"):
        read_header(jpeg[:-20])
