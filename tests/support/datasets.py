"""Small DICOM instances built with pydicom directly (4x4 int16 CT pixels by default), so the tests
that use them do not depend on the phantom generator."""

from __future__ import annotations

import io
import warnings
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
