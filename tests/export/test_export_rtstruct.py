"""RTSTRUCT: validity (dciodvfy), references, and contours that rasterise back onto the mask."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest
from export_helpers import (
    Series,
    blank_volatile,
    dciodvfy,
    dice,
    rasterise_rtstruct,
    rasterise_with_sitk,
)

from nnunet_node.core.errors import ExportError
from nnunet_node.core.phantom import to_sitk
from nnunet_node.export import dicom_output_name, make_rtstruct, write_dataset
from nnunet_node.export.metadata import SegmentationMetadata


@pytest.mark.parametrize("name", ["axial", "sagittal", "oblique"])
def test_contours_rasterise_back_onto_the_mask(
    name: str, series_set: dict[str, Series], phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    src = series_set[name]
    labels = src.phantom.labels
    ds = make_rtstruct(labels, src.datasets, phantom_metadata)
    assert ds is not None
    path = write_dataset(ds, tmp_path / dicom_output_name("rtstruct"))
    assert dciodvfy(path) == []
    back = pydicom.dcmread(path)
    _, reference = to_sitk(src.phantom)
    for value in (1, 2):
        mask = rasterise_rtstruct(back, value, src.datasets)
        score = dice(mask, labels == value)
        assert score > 0.95, f"{name}: label {value} Dice {score:.4f}"
        # The same through SimpleITK's geometry of the phantom, independent of the writer's maths.
        score = dice(rasterise_with_sitk(back, value, reference), labels == value)
        assert score > 0.95, f"{name}: label {value} Dice {score:.4f} (SimpleITK mapping)"


def test_axial_contour_z_is_the_slice_position(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    ds = make_rtstruct(axial.phantom.labels, axial.datasets, phantom_metadata)
    assert ds is not None
    z_of = {d.SOPInstanceUID: float(d.ImagePositionPatient[2]) for d in axial.datasets}
    count = 0
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            zs = {float(v) for v in contour.ContourData[2::3]}  # exactly, not approximately
            assert zs == {z_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]}
            assert all(len(str(v)) <= 16 for v in contour.ContourData)
            count += 1
    assert count > 10


def test_structure_set_references_and_rois(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    ds = make_rtstruct(axial.phantom.labels, axial.datasets, phantom_metadata, series_number=7)
    assert ds is not None
    first = axial.datasets[0]
    assert ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.PatientID == first.PatientID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID and ds.SeriesNumber == 7
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [
        d.SOPInstanceUID for d in axial.datasets
    ]
    assert [(r.ROINumber, r.ROIName) for r in ds.StructureSetROISequence] == [
        (1, "sphere"),
        (2, "cube"),
    ]
    assert all(
        r.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
        for r in ds.StructureSetROISequence
    )
    assert [list(r.ROIDisplayColor) for r in ds.ROIContourSequence] == [
        list(phantom_metadata.segment(v).rgb) for v in (1, 2)
    ]
    assert [o.ReferencedROINumber for o in ds.RTROIObservationsSequence] == [1, 2]
    code = ds.RTROIObservationsSequence[0].RTROIIdentificationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("S-SPH", "99NNODE")


def test_holes_and_islands_on_one_slice(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    labels = np.zeros_like(axial.phantom.labels)
    labels[12, 5:25, 5:25] = 1  # a square ring: outline plus hole
    labels[12, 10:20, 10:20] = 0
    labels[12, 13:16, 13:16] = 1  # an island inside the hole
    labels[12, 30:40, 28:36] = 1  # a separate island
    labels[12, 2, 38] = 1  # a one-pixel island
    labels[13, 30:40, 28:36] = 3  # another ROI on the next slice
    ds = make_rtstruct(labels, axial.datasets, phantom_metadata)
    assert ds is not None
    path = write_dataset(ds, tmp_path / "struct.dcm")
    assert dciodvfy(path) == []
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["sphere", "Right Kidney"]
    assert len(ds.ROIContourSequence[0].ContourSequence) == 5
    np.testing.assert_array_equal(rasterise_rtstruct(ds, 1, axial.datasets), labels == 1)
    np.testing.assert_array_equal(rasterise_rtstruct(ds, 3, axial.datasets), labels == 3)


def test_single_slice_single_image_series(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    labels = axial.phantom.labels[14:15]
    sources = axial.datasets[14:15]
    assert labels.any()
    ds = make_rtstruct(labels, sources, phantom_metadata)
    assert ds is not None
    path = write_dataset(ds, tmp_path / "struct.dcm")
    assert dciodvfy(path) == []
    for value in np.unique(labels[labels > 0]):
        assert dice(rasterise_rtstruct(ds, int(value), sources), labels == value) > 0.95


def test_empty_mask_gives_no_rtstruct(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    assert (
        make_rtstruct(np.zeros_like(axial.phantom.labels), axial.datasets, phantom_metadata) is None
    )


def test_label_absent_from_metadata_is_a_clear_error(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    labels = axial.phantom.labels.copy()
    labels[labels == 1] = 8
    with pytest.raises(ExportError, match="model 'phantom': label 8 has no segment"):
        make_rtstruct(labels, axial.datasets, phantom_metadata)


def test_unusable_geometry_is_refused(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    sources = list(axial.datasets)
    sources[3] = copy.deepcopy(sources[3])  # the fixture's datasets stay untouched
    del sources[3].PixelSpacing
    with pytest.raises(ExportError, match="source image 3 lacks PixelSpacing"):
        make_rtstruct(axial.phantom.labels, sources, phantom_metadata)


def test_rtstruct_is_deterministic_apart_from_uids_and_times(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    one = make_rtstruct(axial.phantom.labels, axial.datasets, phantom_metadata)
    two = make_rtstruct(
        axial.phantom.labels,
        axial.datasets,
        phantom_metadata,
        content_datetime=dt.datetime(2001, 2, 3, 4, 5, 6),
    )
    assert one is not None and two is not None
    assert one.SOPInstanceUID != two.SOPInstanceUID
    assert two.StructureSetDate == "20010203"
    assert blank_volatile(one) == blank_volatile(two)
