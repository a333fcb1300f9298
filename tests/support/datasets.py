"""Small DICOM instances built with pydicom directly (4x4 int16 CT pixels by default), so the tests
that use them do not depend on the phantom generator."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def build_dataset(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    size: int = 4,
    **attributes: Any,
) -> Dataset:
    """A small CT Image Storage instance; keyword arguments set any other attribute."""
    with warnings.catch_warnings():
        # Tests build hostile values on purpose; pydicom warns when they are set.
        warnings.simplefilter("ignore")
        return _build(study_uid, series_uid, sop_uid, size, attributes)


def _build(
    study_uid: str | None,
    series_uid: str | None,
    sop_uid: str | None,
    size: int,
    attributes: dict[str, Any],
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = "P1"
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.arange(size * size, dtype=np.int16).tobytes()
    return ds


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


BAD_UIDS = {
    "non-ASCII": b"1.2.3.\xe9\xe8.4",
    "too long": b"1.2." + b"9" * 200,
    "letters": b"1.2.abc",
    "backslash": b"1.2.3\\4.5",
}
"""Values no UID may take (PS3.5 9.1), as a sender's bytes, by what is wrong with them."""


def with_raw_uid(data: bytes, keyword: str, value: bytes) -> bytes:
    """``data`` (an Explicit VR Little Endian data set, or a Part 10 file of one) with the
    value of its UI element ``keyword`` replaced by ``value`` as given, padded with one NUL to
    an even length and not checked: what a faulty or hostile sender writes (non-ASCII bytes,
    200 characters, letters), which pydicom would warn about or refuse to write.

    :raises ValueError: ``data`` has no such element."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or pydicom.datadict.dictionary_VR(tag) != "UI":
        raise ValueError(f"{keyword} is not a UI attribute")
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"UI"
    at = data.index(head)
    (length,) = struct.unpack_from("<H", data, at + 6)
    padded = value + b"\x00" * (len(value) % 2)
    return data[:at] + head + struct.pack("<H", len(padded)) + padded + data[at + 8 + length :]


def write_ct_series(
    folder: Path, count: int, *, size: int = 128, patient_id: str = "SERIES"
) -> dict[str, str]:
    """``count`` CT instances of ``size`` x ``size`` zeros (int16) in one new series, written to
    the new ``folder`` as ``0000.dcm``, ``0001.dcm``...: file name -> SOP Instance UID."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    pixels = np.zeros((size, size), dtype=np.int16).tobytes()
    uids = {}
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.Modality, ds.InstanceNumber = patient_id, "CT", i + 1
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels
        name = f"{i:04d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        uids[name] = str(ds.SOPInstanceUID)
    return uids
