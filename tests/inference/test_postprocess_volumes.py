"""Post-processing rules and volume handling on small synthetic arrays (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_node.core.errors import InvalidRequest
from nnunet_node.core.phantom import make_phantom, write_dicom_series, write_nifti
from nnunet_node.inference.postprocess import (
    MIN_COMPONENT_VOXELS,
    ComponentFilter,
    filter_components,
    labels_from_probabilities,
)
from nnunet_node.inference.volumes import bounding_box, onto_grid, read_series


def _two_blobs() -> tuple[np.ndarray, np.ndarray]:
    """Label 1: a big blob (p=0.9) and a small one (p=0.6), diagonal neighbours joined 26-wise."""
    proba = np.zeros((2, 20, 20, 20), dtype=np.float32)
    proba[1, 2:8, 2:8, 2:8] = 0.9
    proba[1, 12:14, 12:14, 12:14] = 0.6
    proba[1, 14, 14, 14] = 0.6  # touches the small blob by a corner only: same 26-component
    proba[0] = 1 - proba[1]
    return proba, labels_from_probabilities(proba, [0, 1], 0.5)


def test_threshold_then_components_by_confidence_and_size() -> None:
    proba, labels = _two_blobs()
    assert labels.sum() == 6**3 + 2**3 + 1
    kept, dropped = filter_components(labels, proba, [0, 1], ComponentFilter(threshold=0.5), [])
    assert kept.sum() == labels.sum() and dropped == {"confidence": 0, "size": 0, "intersection": 0}
    kept, dropped = filter_components(
        labels, proba, [0, 1], ComponentFilter(threshold=0.5, min_confidence=0.7), []
    )
    assert kept.sum() == 6**3 and dropped["confidence"] == 1
    kept, dropped = filter_components(
        labels, proba, [0, 1], ComponentFilter(threshold=0.5, smaller_than=0.5), []
    )
    assert kept.sum() == 6**3 and dropped["size"] == 1
    # A threshold above the small blob's probability removes it before components are found.
    assert labels_from_probabilities(proba, [0, 1], 0.7).sum() == 6**3


def test_tiny_components_are_dropped() -> None:
    proba = np.zeros((2, 10, 10, 10), dtype=np.float32)
    proba[1, 1, 1, 1:MIN_COMPONENT_VOXELS] = 0.9
    proba[0] = 1 - proba[1]
    labels = labels_from_probabilities(proba, [0, 1], 0.5)
    kept, dropped = filter_components(labels, proba, [0, 1], ComponentFilter(threshold=0.5), [])
    assert labels.sum() == MIN_COMPONENT_VOXELS - 1 and kept.sum() == 0 and dropped["size"] == 1


def test_intersection_is_coverage_of_the_component() -> None:
    proba, labels = _two_blobs()
    mask = np.zeros(labels.shape, dtype=bool)
    mask[2:8, 2:8, 2:4] = True  # a third of the big blob
    kept, _ = filter_components(
        labels, proba, [0, 1], ComponentFilter(min_intersection=0.3), [mask]
    )
    assert kept.sum() == 6**3  # big blob kept whole (1/3 >= 0.3), small one (0 inside) dropped
    kept, _ = filter_components(
        labels, proba, [0, 1], ComponentFilter(min_intersection=0.4), [mask]
    )
    assert kept.sum() == 0


def test_labels_keep_their_values_with_a_class_subset() -> None:
    proba = np.zeros((2, 4, 4, 4), dtype=np.float32)
    proba[0] = 1.0
    proba[:, 0, 0, 0] = (0.2, 0.8)
    labels = labels_from_probabilities(proba, [0, 7], None)
    assert labels[0, 0, 0] == 7 and labels.sum() == 7


def test_bounding_box_padding_is_xyz_and_clipped() -> None:
    mask = np.zeros((10, 20, 30), dtype=bool)
    mask[5, 10, 15] = True
    assert bounding_box(mask, (1, 2, 3)) == (slice(2, 9), slice(8, 13), slice(14, 17))
    assert bounding_box(mask, (100, 0, 0)) == (slice(5, 6), slice(10, 11), slice(0, 30))
    assert bounding_box(np.zeros_like(mask), (1, 1, 1)) is None


def test_series_forms_and_dicom_file_order(tmp_path: Path) -> None:
    ph = make_phantom(5, shape=(24, 32, 32))
    write_nifti(ph, tmp_path / "one" / "image.nii.gz")
    files = write_dicom_series(ph, tmp_path / "ct")
    from_file = read_series(tmp_path / "one" / "image.nii.gz")
    from_folder = read_series(tmp_path / "one")
    dicom = read_series(tmp_path / "ct")
    assert not from_file.is_dicom and dicom.is_dicom
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(from_file.image), sitk.GetArrayFromImage(from_folder.image)
    )
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(dicom.image), sitk.GetArrayFromImage(from_file.image)
    )
    # The files come in the order of the volume's z axis: slice k is at index (0, 0, k).
    assert sorted(dicom.dicom_files) == sorted(files)
    import pydicom

    for k, path in enumerate(dicom.dicom_files):
        ipp = [
            float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient
        ]
        np.testing.assert_allclose(
            ipp, dicom.image.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-3
        )


def test_series_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"series_folders\[0\]\[0\]: .* does not exist"):
        read_series(tmp_path / "nope", what="series_folders[0][0]")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="neither a DICOM series nor an image"):
        read_series(tmp_path / "empty")
    ph = make_phantom(5, shape=(24, 24, 24))
    write_nifti(ph, tmp_path / "two" / "a.nii.gz")
    write_nifti(ph, tmp_path / "two" / "b.nii.gz")
    with pytest.raises(InvalidRequest, match="2 image files"):
        read_series(tmp_path / "two")
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InvalidRequest, match="not an image"):
        read_series(tmp_path / "bad.nii.gz")


def test_resampling_onto_the_first_grid_is_physical() -> None:
    reference = sitk.Image(20, 20, 20, sitk.sitkFloat32)
    reference.SetSpacing((1.0, 1.0, 1.0))
    labels = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    labels.SetSpacing((2.0, 2.0, 2.0))
    labels[2, 3, 4] = 5  # physical (4, 6, 8) .. (5.x): lands at reference index (4..5, 6..7, 8..9)
    on_ref = sitk.GetArrayFromImage(onto_grid(labels, reference, is_mask=True))
    assert set(np.unique(on_ref)) == {0, 5}  # nearest neighbour: no in-between label values
    assert on_ref[8, 6, 4] == 5
