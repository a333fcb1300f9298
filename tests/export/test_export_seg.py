"""Binary and fractional DICOM-SEG: validity (dciodvfy), references, and voxel-exact read-back."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from export_helpers import Series, blank_volatile, dciodvfy
from pydicom import Dataset

from nnunet_node.core.errors import ExportError
from nnunet_node.export import (
    dicom_output_name,
    make_binary_seg,
    make_fractional_seg,
    make_rtstruct,
    write_dataset,
)
from nnunet_node.export.metadata import SegmentationMetadata


def _write_and_read(ds: Dataset, path: Path) -> hd.seg.Segmentation:
    write_dataset(ds, path)
    assert dciodvfy(path) == []
    return hd.seg.segread(path)


def _label_map_back(
    seg: hd.seg.Segmentation, sources: list[Dataset], metadata: SegmentationMetadata
) -> np.ndarray:
    """Per source instance, the segments combined and mapped back to label values by their label."""
    by_label = {info.label: value for value, info in metadata.segments.items()}
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    lut = np.zeros(max(numbers) + 1, dtype=np.int32)
    for n in numbers:
        lut[n] = by_label[seg.get_segment_description(n).segment_label]
    combined = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    return lut[combined]


@pytest.mark.parametrize("name", ["axial", "sagittal", "oblique"])
def test_binary_seg_reads_back_voxel_for_voxel(
    name: str, series_set: dict[str, Series], phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    src = series_set[name]
    labels = src.phantom.labels
    ds = make_binary_seg(labels, src.datasets, phantom_metadata)
    assert ds is not None
    seg = _write_and_read(ds, tmp_path / dicom_output_name("seg"))
    back = _label_map_back(seg, src.datasets, phantom_metadata)
    np.testing.assert_array_equal(back, labels)


def test_binary_seg_references_its_own_source_series(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    ds = make_binary_seg(axial.phantom.labels, axial.datasets, phantom_metadata, series_number=42)
    assert ds is not None
    write_dataset(ds, tmp_path / "prediction.dcm")
    back = pydicom.dcmread(tmp_path / "prediction.dcm")
    first = axial.datasets[0]
    # Same study and frame of reference, a new series.
    assert back.StudyInstanceUID == first.StudyInstanceUID
    assert back.PatientID == first.PatientID
    assert back.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert back.SeriesInstanceUID != first.SeriesInstanceUID
    assert back.SeriesNumber == 42
    assert back.Modality == "SEG" and back.SegmentationType == "BINARY"
    assert back.SeriesDescription == "Phantom segmentation"
    assert back.BodyPartExamined == "ABDOMEN"
    # ReferencedSeriesSequence names the source series and its instances.
    (ref_series,) = back.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == first.SeriesInstanceUID
    source_uids = {d.SOPInstanceUID for d in axial.datasets}
    assert {
        i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence
    } <= source_uids
    # Every frame: a source image and a segment number.
    for frame in back.PerFrameFunctionalGroupsSequence:
        (derivation,) = frame.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        assert source.ReferencedSOPInstanceUID in source_uids
        assert frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber in (1, 2)
    # Segments: numbered from 1, labels, codes, colours from the metadata.
    segments = back.SegmentSequence
    assert [s.SegmentNumber for s in segments] == [1, 2]
    assert [s.SegmentLabel for s in segments] == ["sphere", "cube"]
    assert segments[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "S-SPH"
    expected = [phantom_metadata.segment(v).cielab.value for v in (1, 2)]
    assert [tuple(s.RecommendedDisplayCIELabValue) for s in segments] == [
        tuple(e) for e in expected
    ]


def test_one_segment_per_label_present_with_type_modifier(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    # Label 3 (Right Kidney) only: one segment, numbered 1, with the laterality modifier.
    labels = np.where(axial.phantom.labels == 2, 3, 0).astype(np.uint8)
    ds = make_binary_seg(labels, axial.datasets, phantom_metadata)
    assert ds is not None
    seg = _write_and_read(ds, tmp_path / "prediction.dcm")
    (segment,) = ds.SegmentSequence
    assert segment.SegmentNumber == 1 and segment.SegmentLabel == "Right Kidney"
    type_item = segment.SegmentedPropertyTypeCodeSequence[0]
    assert type_item.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    np.testing.assert_array_equal(_label_map_back(seg, axial.datasets, phantom_metadata), labels)


def test_empty_mask_gives_no_seg(axial: Series, phantom_metadata: SegmentationMetadata) -> None:
    empty = np.zeros_like(axial.phantom.labels)
    assert make_binary_seg(empty, axial.datasets, phantom_metadata) is None
    probabilities = np.zeros((2, *empty.shape), dtype=np.float32)
    assert make_fractional_seg(probabilities, [1, 2], axial.datasets, phantom_metadata) is None


def test_single_slice_object(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    labels = np.zeros_like(axial.phantom.labels)
    labels[7, 10:14, 20:23] = 1
    ds = make_binary_seg(labels, axial.datasets, phantom_metadata)
    assert ds is not None
    assert ds.NumberOfFrames == 1
    seg = _write_and_read(ds, tmp_path / "prediction.dcm")
    np.testing.assert_array_equal(_label_map_back(seg, axial.datasets, phantom_metadata), labels)


def test_single_image_series(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    labels = axial.phantom.labels[15:16]
    ds = make_binary_seg(labels, axial.datasets[15:16], phantom_metadata)
    assert ds is not None
    seg = _write_and_read(ds, tmp_path / "prediction.dcm")
    np.testing.assert_array_equal(
        _label_map_back(seg, axial.datasets[15:16], phantom_metadata), labels
    )


def test_label_absent_from_metadata_is_a_clear_error(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    labels = axial.phantom.labels.copy()
    labels[labels == 2] = 9
    with pytest.raises(ExportError, match=r"model 'phantom': label 9 has no segment"):
        make_binary_seg(labels, axial.datasets, phantom_metadata)


def test_mismatched_sources_are_refused(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    with pytest.raises(ExportError, match="30 slices but 29 source images"):
        make_binary_seg(axial.phantom.labels, axial.datasets[:29], phantom_metadata)
    with pytest.raises(ExportError, match="must hold integers"):
        make_binary_seg(axial.phantom.labels.astype(float), axial.datasets, phantom_metadata)


def test_binary_seg_is_deterministic_apart_from_uids_and_times(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    one = make_binary_seg(axial.phantom.labels, axial.datasets, phantom_metadata)
    two = make_binary_seg(
        axial.phantom.labels,
        axial.datasets,
        phantom_metadata,
        content_datetime=dt.datetime(2001, 2, 3, 4, 5, 6),
    )
    assert one is not None and two is not None
    assert one.SeriesInstanceUID != two.SeriesInstanceUID
    assert (str(two.ContentDate), str(two.ContentTime)) == ("20010203", "040506")
    assert blank_volatile(one) == blank_volatile(two)


def test_fractional_seg_is_within_one_step_of_the_probabilities(
    series_set: dict[str, Series], phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    src = series_set["oblique"]
    labels = src.phantom.labels
    rng = np.random.default_rng(0)
    probabilities = np.stack(
        [
            np.where(
                labels == v, rng.uniform(0.3, 1.0, labels.shape), rng.uniform(0, 0.05, labels.shape)
            )
            for v in (1, 2)
        ]
    ).astype(np.float32)
    probabilities[:, 0] = 0.0  # an empty slice: no frame for it
    ds = make_fractional_seg(probabilities, [1, 2], src.datasets, phantom_metadata)
    assert ds is not None
    path = tmp_path / dicom_output_name("fractional", "v1")
    assert path.name == "proba_v1.dcm"
    seg = _write_and_read(ds, path)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.MaximumFractionalValue == 255
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["sphere", "cube"]
    back = seg.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in src.datasets],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
        rescale_fractional=True,
    )
    # (instances, rows, columns, segments) -> (segments, z, y, x)
    back = np.moveaxis(back, -1, 0)
    assert back.shape == probabilities.shape
    assert float(np.abs(back - probabilities).max()) <= 1 / 255


def test_fractional_seg_validates_its_input(
    axial: Series, phantom_metadata: SegmentationMetadata
) -> None:
    shape = axial.phantom.labels.shape
    with pytest.raises(ExportError, match="2 probability channels but 1 labels"):
        make_fractional_seg(
            np.zeros((2, *shape), np.float32), [1], axial.datasets, phantom_metadata
        )
    with pytest.raises(ExportError, match=r"must lie in 0\.\.1"):
        make_fractional_seg(
            np.full((1, *shape), 1.5, np.float32), [1], axial.datasets, phantom_metadata
        )
    bad = np.zeros((1, *shape), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ExportError, match="NaN"):
        make_fractional_seg(bad, [1], axial.datasets, phantom_metadata)
    with pytest.raises(ExportError, match="label 5 has no segment"):
        make_fractional_seg(np.ones((1, *shape), np.float32), [5], axial.datasets, phantom_metadata)


def test_sources_without_type2_patient_study_attributes(
    axial: Series, phantom_metadata: SegmentationMetadata, tmp_path: Path
) -> None:
    """Senders may leave out type 2 attributes; the objects are still valid and the caller's
    datasets are left as they were."""
    sources = [copy.deepcopy(ds) for ds in axial.datasets]
    for ds in sources:
        for keyword in ("AccessionNumber", "PatientSex", "StudyID", "PatientName", "StudyDate"):
            delattr(ds, keyword)
    seg = make_binary_seg(axial.phantom.labels, sources, phantom_metadata)
    rt = make_rtstruct(axial.phantom.labels, sources, phantom_metadata)
    assert seg is not None and rt is not None
    for name, ds in (("prediction.dcm", seg), ("struct.dcm", rt)):
        assert dciodvfy(write_dataset(ds, tmp_path / name)) == []
        assert ds.AccessionNumber == "" and ds.PatientID == "PHANTOM"
    assert all("AccessionNumber" not in ds for ds in sources)
