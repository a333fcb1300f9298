"""write_stage_dicom: a stage's DICOM files under the names of docs/reference-contract.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from export_helpers import Series, dciodvfy

from nnunet_node.export import read_sources, write_stage_dicom
from nnunet_node.export.metadata import SegmentationMetadata


def test_stage_outputs_from_source_files(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    labels = axial.phantom.labels
    probabilities = np.stack([(labels == v).astype(np.float32) * 0.6 for v in (1, 2)])
    out = write_stage_dicom(
        tmp_path / "stage_0",
        labels,
        axial.paths,
        phantom_metadata,
        suffix="v1",
        rtstruct=True,
        probabilities=probabilities,
        probability_labels=[1, 2],
    )
    assert out.notes == []
    assert out.segmentation == tmp_path / "stage_0" / "prediction_v1.dcm"
    assert out.struct == tmp_path / "stage_0" / "struct_v1.dcm"
    assert out.fractional == tmp_path / "stage_0" / "proba_v1.dcm"
    modalities = []
    for path in (out.segmentation, out.struct, out.fractional):
        assert path is not None and dciodvfy(path) == []
        modalities.append(pydicom.dcmread(path).Modality)
    assert modalities == ["SEG", "RTSTRUCT", "SEG"]
    # One stage, one time stamp; three new series in the source's study.
    objects = [pydicom.dcmread(p) for p in (out.segmentation, out.struct, out.fractional)]
    assert len({o.SeriesInstanceUID for o in objects}) == 3
    assert {o.StudyInstanceUID for o in objects} == {axial.datasets[0].StudyInstanceUID}
    assert len({str(o.SeriesDate) + str(o.SeriesTime) for o in objects}) == 1


def test_empty_stage_writes_nothing_and_says_so(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    empty = np.zeros_like(axial.phantom.labels)
    out = write_stage_dicom(
        tmp_path, empty, read_sources(axial.paths), phantom_metadata, rtstruct=True
    )
    assert (out.segmentation, out.struct, out.fractional) == (None, None, None)
    assert len(out.notes) == 2 and "empty label map" in out.notes[0]
    assert list(tmp_path.iterdir()) == []
