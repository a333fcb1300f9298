"""The phantom generator: its definition, and NIfTI and DICOM forms keeping voxels and geometry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nnunet_node.core.phantom import (
    CUBE_LABEL,
    SPHERE_LABEL,
    Phantom,
    make_phantom,
    to_sitk,
    write_dicom_series,
    write_nifti,
)

ROOT = Path(__file__).resolve().parents[2]


def _rotation(axis: tuple[float, float, float], degrees: float) -> tuple[float, ...]:
    """Row-major rotation matrix about ``axis`` (Rodrigues)."""
    k = np.array(axis, dtype=float)
    k /= np.linalg.norm(k)
    a = np.deg2rad(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    r = np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx
    return tuple(float(v) for v in r.ravel())


OBLIQUE = _rotation((1.0, 2.0, 0.5), 25.0)
# Sagittal slices: rows run towards posterior (+y), columns towards the feet (-z), slices
# along row x column = -x (right-handed, as DICOM readers stack them).
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    return reader.Execute()


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 6, 7])
def test_phantom_follows_its_definition(seed: int) -> None:
    ph = make_phantom(seed)
    assert ph.image.dtype == np.float32 and ph.labels.dtype == np.uint8
    assert ph.image.shape == ph.labels.shape
    assert all(40 <= n <= 64 for n in ph.shape)
    assert all(0.8 <= s <= 1.5 for s in ph.spacing)
    assert set(np.unique(ph.labels)) == {0, SPHERE_LABEL, CUBE_LABEL}

    voxel_mm3 = float(np.prod(ph.spacing))
    radius = (3 * (ph.labels == SPHERE_LABEL).sum() * voxel_mm3 / (4 * np.pi)) ** (1 / 3)
    side = ((ph.labels == CUBE_LABEL).sum() * voxel_mm3) ** (1 / 3)
    assert 5.0 <= radius <= 13.0
    assert 6.5 <= side <= 17.5

    background = ph.image[ph.labels == 0]
    assert abs(background.mean()) < 5 and 45 < background.std() < 55
    assert 270 < ph.image[ph.labels == SPHERE_LABEL].mean() < 330
    assert 560 < ph.image[ph.labels == CUBE_LABEL].mean() < 640

    # The objects do not touch: dilating the sphere by one voxel finds no cube.
    sphere = sitk.GetImageFromArray((ph.labels == SPHERE_LABEL).astype(np.uint8))
    grown = sitk.GetArrayFromImage(sitk.BinaryDilate(sphere, [1, 1, 1]))
    assert not np.any(grown.astype(bool) & (ph.labels == CUBE_LABEL))


def test_same_seed_same_phantom_other_seed_other_phantom() -> None:
    a, b, c = make_phantom(11), make_phantom(11), make_phantom(12)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.spacing, a.origin) == (b.spacing, b.origin)
    assert a.shape != c.shape or not np.array_equal(a.labels, c.labels)


def test_explicit_shape_spacing_direction_are_kept() -> None:
    ph = make_phantom(5, shape=(40, 48, 56), spacing=(0.8, 1.1, 1.5), direction=OBLIQUE)
    assert ph.shape == (40, 48, 56)
    assert ph.spacing == (0.8, 1.1, 1.5)
    np.testing.assert_allclose(ph.direction, OBLIQUE)
    image, labels = to_sitk(ph)
    assert image.GetSize() == (56, 48, 40) and labels.GetSize() == (56, 48, 40)
    assert labels.GetPixelID() == sitk.sitkUInt8
    # The volume's centre lies near the patient-space origin.
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    assert np.linalg.norm(centre) < 10


def test_labels_are_the_same_in_any_direction() -> None:
    straight = make_phantom(9, shape=(44, 44, 44), spacing=(1.0, 1.0, 1.0))
    tilted = make_phantom(9, shape=(44, 44, 44), spacing=(1.0, 1.0, 1.0), direction=OBLIQUE)
    np.testing.assert_array_equal(straight.labels, tilted.labels)


@pytest.mark.parametrize(
    ("direction", "message"),
    [
        ((1.0, 0.0, 0.0), "9 values"),
        ((1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0), "orthonormal"),
        ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "left-handed"),
    ],
)
def test_bad_direction_is_refused(direction: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_phantom(0, direction=direction)


def test_bad_spacing_or_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(0, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        make_phantom(0, shape=(40, 40))
    with pytest.raises(ValueError, match="too small"):
        make_phantom(0, shape=(10, 10, 10), spacing=(1.0, 1.0, 1.0))


def test_nifti_round_trip(tmp_path: Path) -> None:
    ph = make_phantom(21, spacing=(0.8, 1.1, 1.3))
    write_nifti(ph, tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "image.nii.gz"))
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    ref_image, _ = to_sitk(ph)
    _assert_same_geometry(image, ref_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ph.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), ph.labels)


def test_write_nifti_without_labels(tmp_path: Path) -> None:
    write_nifti(make_phantom(1), tmp_path / "sub" / "image.nii.gz")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["image.nii.gz"]


@pytest.mark.parametrize(
    ("spacing", "direction"),
    [
        ((1.0, 1.0, 1.0), None),
        ((0.8, 1.1, 1.5), None),  # non-square pixels: PixelSpacing is row (y) then column (x)
        ((0.8, 1.1, 1.2), OBLIQUE),
        ((0.9, 1.2, 1.4), SAGITTAL),
    ],
    ids=["square", "non-square", "oblique", "sagittal"],
)
def test_dicom_series_reads_back_as_the_phantom(
    tmp_path: Path, spacing: tuple[float, float, float], direction: tuple[float, ...] | None
) -> None:
    ph = make_phantom(31, shape=(40, 44, 52), spacing=spacing, direction=direction)
    files = write_dicom_series(ph, tmp_path)
    assert len(files) == 40

    read = _read_series(tmp_path)
    expected, _ = to_sitk(ph)
    _assert_same_geometry(read, expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), ph.image)


def test_dicom_attributes(tmp_path: Path) -> None:
    ph = make_phantom(41, shape=(40, 44, 52), spacing=(0.8, 1.1, 1.5))
    files = write_dicom_series(
        ph,
        tmp_path,
        study_uid="1.2.3.4",
        series_uid="1.2.3.4.5",
        patient_id="P1",
        patient_name="Doe^Jane",
        series_description="Test CT",
        series_number=7,
    )
    datasets = [pydicom.dcmread(f) for f in files]
    first, last = datasets[0], datasets[-1]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.Modality == "CT"
    assert (first.StudyInstanceUID, first.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.4.5")
    assert (first.PatientID, str(first.PatientName)) == ("P1", "Doe^Jane")
    assert (first.SeriesDescription, first.SeriesNumber) == ("Test CT", 7)
    assert (first.Rows, first.Columns) == (44, 52)
    assert [float(v) for v in first.PixelSpacing] == [1.1, 0.8]
    assert float(first.SliceThickness) == 1.5
    assert [int(d.InstanceNumber) for d in datasets] == list(range(1, 41))
    assert len({d.SOPInstanceUID for d in datasets}) == 40
    assert len({d.FrameOfReferenceUID for d in datasets}) == 1
    np.testing.assert_allclose(
        np.array(last.ImagePositionPatient, dtype=float)
        - np.array(first.ImagePositionPatient, dtype=float),
        [0, 0, 39 * 1.5],
        atol=1e-4,
    )
    hu = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(hu, ph.image[0])


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy not installed")
def test_dciodvfy_finds_no_error(tmp_path: Path) -> None:
    ph = make_phantom(51, shape=(40, 40, 40), spacing=(0.8, 1.1, 1.5), direction=OBLIQUE)
    files = write_dicom_series(ph, tmp_path)
    for path in (files[0], files[-1]):
        assert _dciodvfy_errors(path) == []


def test_command_line_writes_a_demo_study(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    subprocess.run(
        [sys.executable, "-m", "nnunet_node.core.phantom", "--out", str(out), "--seed", "4"],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    image = sitk.ReadImage(str(out / "nifti" / "image.nii.gz"))
    labels = sitk.ReadImage(str(out / "nifti" / "labels.nii.gz"))
    series = _read_series(out / "dicom" / "ct")
    _assert_same_geometry(series, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(series), sitk.GetArrayFromImage(image))
    ph: Phantom = make_phantom(4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), ph.labels)
