"""The DICOMweb building blocks without a server: multipart, DICOM JSON, query parameters,
Accept negotiation, frame extraction."""

from __future__ import annotations

import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from nnunet_node.api.dicomweb.dicom_json import (
    FailedRef,
    MetadataCache,
    StoredRef,
    dataset_to_json,
    read_metadata,
    row_to_json,
    store_response,
)
from nnunet_node.api.dicomweb.frames import BulkValue, read_frames
from nnunet_node.api.dicomweb.multipart import (
    Part,
    encode_parts,
    iter_parts,
    parse_media_type,
    split_accept,
)
from nnunet_node.api.dicomweb.negotiate import (
    Delivery,
    bulk_content_type,
    frame_content_type,
    instance_delivery,
    wants_json,
)
from nnunet_node.api.dicomweb.qido_params import parse_qido
from nnunet_node.core.errors import InvalidRequest, NotAcceptable, NotFound, PayloadTooLarge


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def _collect(body: bytes, boundary: bytes, *, size: int = 7, **kwargs: object) -> list[Part]:
    async def run() -> list[Part]:
        out = []
        async for part in iter_parts(_chunks(body, size), boundary, **kwargs):  # type: ignore[arg-type]
            out.append(Part(part.index, part.headers, part.read(), None, part.size))
            part.discard()
        return out

    return anyio.run(run)


def _body(parts: list[bytes], boundary: str = "b0und") -> bytes:
    return b"".join(encode_parts(boundary, [("application/dicom", [p]) for p in parts]))


# --- multipart -------------------------------------------------------------------------------


def test_parts_come_back_byte_for_byte_whatever_the_chunking() -> None:
    payloads = [b"first\r\n--b0und-not-a-boundary", b"", b"x" * 5000, bytes(range(256)) * 3]
    body = _body(payloads)
    for size in (1, 3, 64, 10_000):
        parts = _collect(body, b"b0und", size=size, max_bytes=1 << 20)
        assert [p.data for p in parts] == payloads
        assert all(p.headers["content-type"] == "application/dicom" for p in parts)


def test_large_parts_spill_to_disk_and_the_file_goes_away(tmp_path: Path) -> None:
    body = _body([b"a" * 3000, b"b" * 10])
    seen: list[Path | None] = []

    async def run() -> None:
        async for part in iter_parts(
            _chunks(body, 100), b"b0und", max_bytes=1 << 20, spill_bytes=1000, spill_dir=tmp_path
        ):
            seen.append(part.path)
            assert part.read()[:1] in (b"a", b"b")
            part.discard()

    anyio.run(run)
    assert seen[0] is not None and seen[1] is None
    assert list(tmp_path.iterdir()) == []


def test_body_over_the_limit_is_refused() -> None:
    with pytest.raises(PayloadTooLarge):
        _collect(_body([b"x" * 2000]), b"b0und", max_bytes=1000)


def test_truncated_body_keeps_finished_parts_then_fails() -> None:
    body = _body([b"one", b"two"])[:-20]
    got: list[bytes] = []

    async def run() -> None:
        async for part in iter_parts(_chunks(body, 5), b"b0und", max_bytes=1 << 20):
            got.append(part.read())

    with pytest.raises(InvalidRequest, match="closing boundary"):
        anyio.run(run)
    assert got == [b"one"]


def test_wrong_boundary_is_a_bad_request() -> None:
    with pytest.raises(InvalidRequest):
        _collect(_body([b"one"]), b"other", max_bytes=1 << 20)


def test_media_type_and_accept_parsing() -> None:
    media = parse_media_type('Multipart/Related; type="application/dicom"; boundary="a;b"')
    assert media.type == "multipart/related"
    assert media.param("type") == "application/dicom"
    assert media.param("boundary") == "a;b"
    entries = split_accept(
        'multipart/related; type="application/octet-stream"; transfer-syntax=*, */*'
    )
    assert [e.type for e in entries] == ["multipart/related", "*/*"]
    assert entries[0].param("transfer-syntax") == "*"
    assert split_accept(None)[0].type == "*/*"


# --- DICOM JSON ----------------------------------------------------------------------------


def _instance(
    tmp_path: Path, *, frames: int = 1, bits: int = 16, ts: str = ExplicitVRLittleEndian
) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ds.Rows, ds.Columns = 5, 3
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    if bits == 1:
        pixels = (np.arange(frames * 15) % 3 == 0).astype(np.uint8)
        ds.PixelData = np.packbits(pixels, bitorder="little").tobytes()
    else:
        ds.PixelData = np.arange(frames * 15, dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_metadata_has_bulk_data_uri_for_pixels_and_round_trips(tmp_path: Path) -> None:
    path = _instance(tmp_path, frames=400)  # 400 frames: pixel data over the defer size
    model = read_metadata(path, bulk_base="http://x/bulk")
    assert model["7FE00010"] == {"vr": "OW", "BulkDataURI": "http://x/bulk/7FE00010"}
    assert model["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    back = Dataset.from_json(model, bulk_data_uri_handler=lambda *_: b"")
    assert back.PatientID == "P1" and back.Rows == 5
    small = read_metadata(_instance(tmp_path), bulk_base="http://x/bulk")
    assert "BulkDataURI" in small["7FE00010"]  # pixel data is bulk even when small
    assert "7FE00010" not in dataset_to_json(pydicom.dcmread(path), bulk_base=None)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_large_sequences_and_text_are_inline_large_binary_is_bulk(tmp_path: Path, ts: str) -> None:
    """PS3.18 F.2.6: only binary values go behind a BulkDataURI. A sequence of 200 items or a
    text of 10 kB (both over the defer size) stays in the metadata, as OHIF needs for SEG and
    RTSTRUCT; a large private OB value and the pixel data are bulk."""
    path = _instance(tmp_path, ts=ts)
    ds = pydicom.dcmread(path)
    items = []
    for number in range(200):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = f"1.2.3.4.{number}"
        items.append(item)
    ds.ReferencedImageSequence = items
    ds.ImageComments = "x" * 10_000
    ds.add_new(0x00291010, "OB", b"\1" * 5000)
    ds.save_as(path, enforce_file_format=True)
    model = read_metadata(path, bulk_base="http://x/bulk")
    sequence = model["00081140"]
    assert "BulkDataURI" not in sequence and len(sequence["Value"]) == 200
    assert sequence["Value"][199]["00081155"]["Value"] == ["1.2.3.4.199"]
    assert model["00204000"]["Value"] == ["x" * 10_000]
    assert model["00291010"]["BulkDataURI"] == "http://x/bulk/00291010"
    assert "BulkDataURI" in model["7FE00010"]


def test_metadata_cache_serves_the_model_until_the_file_changes(tmp_path: Path) -> None:
    """The model is kept once built and served with the request's bulk data base; a file
    re-sent (other size or time) is read again and its old model removed."""
    path = _instance(tmp_path)
    sop = str(pydicom.dcmread(path).SOPInstanceUID)
    cache = MetadataCache(tmp_path / "cache")
    first = json.loads(cache.model(path, sop, "http://a/bulk"))
    assert first == read_metadata(path, bulk_base="http://a/bulk")
    (kept,) = (tmp_path / "cache").glob(f"{sop}.*.json")
    second = json.loads(cache.model(path, sop, "https://b:1/x/bulk"))
    assert second["7FE00010"]["BulkDataURI"] == "https://b:1/x/bulk/7FE00010"
    assert second["00100020"]["Value"] == ["P1"]
    ds = pydicom.dcmread(path)
    ds.PatientID = "P2-resent"
    ds.save_as(path, enforce_file_format=True)
    os.utime(path, ns=(1, 1))  # whatever the clock, another time
    third = json.loads(cache.model(path, sop, "http://a/bulk"))
    assert third["00100020"]["Value"] == ["P2-resent"]
    assert not kept.exists()
    assert len(list((tmp_path / "cache").glob(f"{sop}.*.json"))) == 1


def test_store_response_lists_stored_and_failed() -> None:
    body = store_response(
        [StoredRef("1.2", "1.2.3", "http://x/studies/1/series/2/instances/1.2.3")],
        [FailedRef("", "", 0xC000)],  # Cannot understand
        study_url="http://x/studies/1",
    )
    ds = Dataset.from_json(body)
    assert ds.RetrieveURL == "http://x/studies/1"
    assert ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3"
    assert ds.FailedSOPSequence[0].FailureReason == 0xC000


@pytest.mark.parametrize("uid", ["1.2.3.\u00e9", "1.2." + "9" * 80, "1.2.abc", "1.2.3\\4"])
def test_store_response_never_echoes_an_invalid_uid(uid: str) -> None:
    body = store_response([], [FailedRef(uid, uid, 0xC000)], study_url=None)
    item = body["00081198"]["Value"][0]
    assert item["00081150"] == {"vr": "UI"}  # present, empty (the docstring says why)
    assert item["00081155"] == {"vr": "UI"}
    assert item["00081197"] == {"vr": "US", "Value": [0xC000]}


# --- QIDO parameters -----------------------------------------------------------------------


def test_query_keys_by_keyword_or_tag_and_paging() -> None:
    params = parse_qido(
        [
            ("PatientID", "P*"),
            ("0008103E", "CT?"),
            ("StudyDate", "20200101-20201231"),
            ("StudyInstanceUID", "1.2.3,1.2.4"),
            ("includefield", "00100030,StudyDescription"),
            ("includefield", "all"),
            ("limit", "10"),
            ("offset", "20"),
            ("fuzzymatching", "true"),
        ]
    )
    assert params.filters == {
        "PatientID": "P*",
        "SeriesDescription": "CT?",
        "StudyDate": "20200101-20201231",
        "StudyInstanceUID": "1.2.3\\1.2.4",
    }
    assert params.includefields == {"PatientBirthDate", "StudyDescription"}
    assert params.include_all and params.fuzzy
    assert (params.limit, params.offset) == (10, 20)


@pytest.mark.parametrize(
    "pair",
    [
        ("NoSuchAttribute", "x"),
        ("FFFF0000", "x"),
        ("StudyDate", "2020-01-01"),
        ("StudyDate", "20201301"),
        ("StudyDate", "20201231-20200101"),
        ("StudyInstanceUID", "1.2.abc"),
        ("limit", "ten"),
        ("limit", "-1"),
        ("offset", "x"),
        ("includefield", "Bogus"),
        ("fuzzymatching", "maybe"),
        ("ReferencedSeriesSequence.SeriesInstanceUID", "1.2"),
    ],
)
def test_malformed_queries_are_refused(pair: tuple[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        parse_qido([pair])


# --- negotiation -----------------------------------------------------------------------------


def test_instances_are_served_as_stored_or_made_explicit() -> None:
    implicit, explicit = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
    assert instance_delivery('multipart/related; type="application/dicom"', implicit) is (
        Delivery.AS_STORED
    )
    assert (
        instance_delivery(
            f'multipart/related; type="application/dicom"; transfer-syntax={explicit}', implicit
        )
        is Delivery.TO_EXPLICIT_LE
    )
    assert instance_delivery(None, "1.2.840.10008.1.2.4.50") is Delivery.AS_STORED
    with pytest.raises(NotAcceptable):
        instance_delivery(
            f'multipart/related; type="application/dicom"; transfer-syntax={explicit}',
            "1.2.840.10008.1.2.4.50",
        )
    with pytest.raises(NotAcceptable):
        instance_delivery("application/zip", explicit)


def test_frame_media_types() -> None:
    ohif = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    assert frame_content_type(ohif, "1.2.840.10008.1.2").startswith("application/octet-stream")
    jpeg = "1.2.840.10008.1.2.4.50"
    assert frame_content_type(ohif, jpeg) == f"application/octet-stream; transfer-syntax={jpeg}"
    assert frame_content_type('multipart/related; type="*/*"', jpeg).startswith("image/jpeg")
    with pytest.raises(NotAcceptable):
        frame_content_type('multipart/related; type="application/octet-stream"', jpeg)
    assert bulk_content_type(None) == "application/octet-stream"
    wants_json("application/dicom+json")
    with pytest.raises(NotAcceptable):
        wants_json("application/dicom+xml")


# --- frames ----------------------------------------------------------------------------------


def test_native_frames_are_cut_at_their_offsets(tmp_path: Path) -> None:
    path = _instance(tmp_path, frames=300)
    info, frames = read_frames(path, [1, 300, 2])
    pixels = np.arange(300 * 15, dtype=np.uint16)
    assert info.native and info.number_of_frames == 300
    assert frames[0] == pixels[:15].tobytes()
    assert frames[1] == pixels[-15:].tobytes()
    assert frames[2] == pixels[15:30].tobytes()
    with pytest.raises(NotFound):
        read_frames(path, [301])


def test_one_bit_frames_start_on_a_byte_boundary(tmp_path: Path) -> None:
    path = _instance(tmp_path, frames=7, bits=1)  # 15 bits a frame: frames straddle bytes
    _, frames = read_frames(path, [1, 2, 7])
    pixels = (np.arange(7 * 15) % 3 == 0).astype(np.uint8)
    for frame, n in zip(frames, [1, 2, 7], strict=True):
        bits = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")[:15]
        assert np.array_equal(bits, pixels[(n - 1) * 15 : n * 15])


def test_encapsulated_frames_come_back_compressed(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_instance(tmp_path, frames=3))
    fragments = [b"JPEG-frame-%d" % i + b"\x00" * i for i in range(3)]
    even = [f if len(f) % 2 == 0 else f + b"\x00" for f in fragments]
    ds.PixelData = pydicom.encaps.encapsulate(even)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    path = tmp_path / "jpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    info, frames = read_frames(path, [2, 3])
    assert not info.native
    assert frames[0].rstrip(b"\x00") == b"JPEG-frame-1"
    assert frames[1].rstrip(b"\x00") == b"JPEG-frame-2"


def test_bulk_value_reads_the_element_from_the_file(tmp_path: Path) -> None:
    path = _instance(tmp_path, frames=200)
    value = BulkValue(path, 0x7FE00010)
    assert b"".join(value.chunks(size=100)) == np.arange(200 * 15, dtype=np.uint16).tobytes()
    with pytest.raises(NotFound):
        BulkValue(path, 0x00091001)
    assert io  # keep the import for readers of the module


def test_row_to_json_is_what_pydicom_writes() -> None:
    from nnunet_node.storage.query import to_dataset

    rows = [
        {
            "InstanceNumber": 7,
            "Rows": 40,
            "ModalitiesInStudy": ["CT", "SEG"],
            "PatientName": "Doe^J",
            "StudyDate": "",
            "SeriesNumber": None,
            "PatientID": "A\\B",
            "InstanceAvailability": "ONLINE",
            "NumberOfStudyRelatedInstances": 5,
            "StudyDescription": "Tête",
            "_pk": 3,
        },
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "ModalitiesInStudy": [], "Rows": None},
        {
            "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
            "StudyDescription": "a\\b",
            "AdditionalPatientHistory": "x\\y",
            "PatientID": "P1",
        },
    ]
    keys = [*rows[0], "SOPClassUID", "ReferencedSeriesSequence", "Manufacturer", "NoSuchKey"]
    keys += ["AdditionalPatientHistory"]
    for row in rows:
        assert row_to_json(row, keys) == to_dataset(row, keys).to_json_dict()
