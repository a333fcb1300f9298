"""Output file names (``docs/reference-contract.md``) and the atomic writer."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from nnunet_node.core.errors import InvalidRequest
from nnunet_node.export import check_suffix, dicom_output_name, write_dataset


@pytest.mark.parametrize(
    ("kind", "suffix", "name"),
    [
        ("seg", None, "prediction.dcm"),
        ("seg", "", "prediction.dcm"),
        ("seg", "v2", "prediction_v2.dcm"),
        ("rtstruct", None, "struct.dcm"),
        ("rtstruct", "run-1", "struct_run-1.dcm"),
        ("fractional", None, "proba.dcm"),
        ("fractional", "a.b_c", "proba_a.b_c.dcm"),
    ],
)
def test_names_follow_the_seed_document(kind: str, suffix: str | None, name: str) -> None:
    assert dicom_output_name(kind, suffix) == name  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", ["../x", "a/b", ".hidden", "a..b", "x" * 65, "sp ace", "é"])
def test_unsafe_suffixes_are_refused(suffix: str) -> None:
    with pytest.raises(InvalidRequest, match="suffix"):
        check_suffix(suffix)
    with pytest.raises(InvalidRequest, match="suffix"):
        dicom_output_name("seg", suffix)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown DICOM output kind"):
        dicom_output_name("nifti", None)  # type: ignore[arg-type]


def test_write_dataset_is_atomic_and_readable(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "X"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    target = tmp_path / "stage_0" / "struct.dcm"
    assert write_dataset(ds, target) == target
    assert pydicom.dcmread(target).PatientID == "X"
    assert sorted(p.name for p in target.parent.iterdir()) == ["struct.dcm"]
