"""SEG and RTSTRUCT from sources in every character set of tests/charsets.py: written (never a
failure after inference), valid for dciodvfy, with the source's patient name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from export_helpers import dciodvfy

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.export.metadata import SegmentationMetadata
from nnunet_node.export.stage import write_stage_dicom
from tests.charsets import CASES, PLACEHOLDER, CharsetCase, recode


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_seg_and_rtstruct_carry_the_name_in_utf8(
    tmp_path: Path, case: CharsetCase, phantom_metadata: SegmentationMetadata
) -> None:
    phantom = make_phantom(6, shape=(10, 32, 32), spacing=(1.2, 1.2, 2.5))
    paths = write_dicom_series(phantom, tmp_path / "src", patient_name=PLACEHOLDER)
    for path in paths:
        recode(path, case)
    label_map = np.asarray(phantom.labels, dtype=np.uint8)
    outputs = write_stage_dicom(tmp_path / "out", label_map, paths, phantom_metadata, rtstruct=True)
    assert outputs.segmentation is not None and outputs.struct is not None
    for path in (outputs.segmentation, outputs.struct):
        assert dciodvfy(path) == [], path.name
        written = pydicom.dcmread(path)
        assert str(written.PatientName) == case.expected
        assert written.SpecificCharacterSet in ("ISO_IR 192", "ISO_IR 100")
    fallback_noted = any("read as UTF-8" in note for note in outputs.notes)
    assert fallback_noted == (case.id == "unknown term"), outputs.notes
