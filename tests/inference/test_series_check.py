"""The series geometry check (inference/series_check.py): its small pure functions on synthetic
headers, the header reader against pydicom, and the volume read from the kept files of phantom
series holding repeats, localizers, gaps, uneven spacing and gantry tilt."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nnunet_node.core.errors import SeriesRefused
from nnunet_node.core.phantom import Phantom, make_phantom, write_dicom_series
from nnunet_node.inference.series_check import (
    SliceHeader,
    check_headers,
    check_series_folder,
    cluster_positions,
    describe_orientation,
    group_volumes,
    missing_slices,
    plane_normal,
    read_slice_header,
    repeat_order,
    resolve_repeats,
    same_orientation,
    slice_spacing,
    tilt_degrees,
)
from nnunet_node.inference.volumes import onto_source_slices, read_series
from tests.support.series_cases import copy_instance

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def header(
    k: int,
    z: float,
    *,
    orientation: tuple[float, ...] = AXIAL,
    rows: int = 64,
    columns: int = 64,
    acquisition: int | None = 1,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    position: tuple[float, float, float] | None = None,
    spacing: tuple[float, float] = (0.8, 0.8),
) -> SliceHeader:
    return SliceHeader(
        path=Path(f"/nowhere/{k}.dcm"),
        sop_instance_uid=f"1.2.3.{k}",
        series_instance_uid="1.2.3",
        series_number=3,
        series_description="Thorax",
        image_type=image_type,
        instance_number=k,
        acquisition_number=acquisition,
        position=position or (0.0, 0.0, z),
        orientation=(
            orientation[0],
            orientation[1],
            orientation[2],
            orientation[3],
            orientation[4],
            orientation[5],
        ),
        rows=rows,
        columns=columns,
        pixel_spacing=spacing,
    )


def stack(n: int = 10, step: float = 2.5) -> list[SliceHeader]:
    return [header(k + 1, k * step) for k in range(n)]


def never_same(a: Path, b: Path) -> bool:
    return False


# --- pure functions --------------------------------------------------------------------------
def test_orientation_helpers() -> None:
    assert same_orientation(AXIAL, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0005))
    assert not same_orientation(AXIAL, (1.0, 0.0, 0.0, 0.0, 0.999, 0.045))
    assert np.allclose(plane_normal(AXIAL), (0, 0, 1))
    assert np.allclose(plane_normal(CORONAL), (0, 1, 0))
    assert describe_orientation(AXIAL) == "axial"
    assert describe_orientation(CORONAL) == "coronal"
    assert describe_orientation((0, 1, 0, 0, 0, -1)) == "sagittal"
    with pytest.raises(SeriesRefused):
        plane_normal((1, 0, 0, 1, 0, 0))


def test_group_volumes_splits_orientation_matrix_and_spacing() -> None:
    main = stack(6)
    other_matrix = header(20, 0.0, rows=32, columns=32)
    other_orientation = header(21, 0.0, orientation=CORONAL)
    other_spacing = header(22, 0.0, spacing=(0.7, 0.7))
    groups = group_volumes([*main, other_matrix, other_orientation, other_spacing])
    assert [len(g) for g in groups] == [6, 1, 1, 1]
    assert groups[0] == main


def test_cluster_positions_and_repeat_order() -> None:
    assert cluster_positions([0.0, 0.005, 2.5, 5.0, 5.0]) == [[0, 1], [2], [3, 4]]
    later = header(3, 0.0, acquisition=2)
    earlier_higher_number = header(9, 0.0, acquisition=1)
    assert repeat_order(later) > repeat_order(earlier_higher_number)
    assert repeat_order(header(9, 0.0)) > repeat_order(header(3, 0.0))


def test_resolve_repeats_drops_copies_and_keeps_the_latest_acquisition() -> None:
    slices = [header(1, 0.0), header(2, 2.5), header(11, 2.5, acquisition=2), header(3, 5.0)]
    copy = header(12, 5.0)
    slices.append(copy)

    def same(a: Path, b: Path) -> bool:
        return {a.name, b.name} == {"12.dcm", "3.dcm"}

    ordered = sorted(slices, key=lambda h: h.position[2])  # type: ignore[index]
    kept, heights, warnings = resolve_repeats(
        ordered,
        [h.position[2] for h in ordered],  # type: ignore[index]
        same,
    )
    # of two identical images either will do: the repeat rule picks (the higher InstanceNumber)
    assert [h.instance_number for h in kept] == [1, 11, 12]
    assert heights == [0.0, 2.5, 5.0]
    assert any("1 identical copy" in w for w in warnings)
    assert any("image 11 kept over image 2" in w for w in warnings)


def test_slice_spacing_and_missing_slices() -> None:
    uniform = slice_spacing([0.0, 2.5, 5.0, 7.5])
    assert uniform.uniform and uniform.nominal == pytest.approx(2.5)
    assert slice_spacing([0.0, 2.5, 5.02, 7.5]).uniform  # within 2 %
    uneven = slice_spacing([0.0, 2.5, 5.0, 8.0, 10.5])
    assert not uneven.uniform and uneven.largest == pytest.approx(3.0)
    assert missing_slices([0.0, 2.5, 5.0, 10.0, 12.5], 2.5) == [(2, 1)]
    assert missing_slices([0.0, 2.5, 5.0, 8.0, 10.5], 2.5) == []


def test_tilt_degrees() -> None:
    assert tilt_degrees([0.0, 10.0], [(0.0, 0.0), (0.0, 0.0)]) == 0.0
    assert tilt_degrees([0.0, 10.0], [(0.0, 0.0), (0.0, 10 * math.tan(math.radians(15)))]) == (
        pytest.approx(15.0)
    )


# --- check_headers -----------------------------------------------------------------------------
def test_clean_stack_keeps_everything_without_warnings() -> None:
    layout = check_headers(list(reversed(stack())), same_pixels=never_same)
    assert [p.name for p in layout.files] == [f"{k}.dcm" for k in range(1, 11)]
    assert not layout.resample and layout.warnings == ()
    assert layout.grid_spacing == (0.8, 0.8, pytest.approx(2.5))
    assert layout.grid_size == (64, 64, 10)


def test_localizers_are_left_out_with_a_warning() -> None:
    same_matrix = header(50, 5.0, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    other = header(51, 0.0, orientation=CORONAL, rows=512, columns=256)
    layout = check_headers([*stack(), same_matrix, other], same_pixels=never_same)
    assert "50.dcm" not in {p.name for p in layout.files}
    assert "51.dcm" not in {p.name for p in layout.files}
    assert len(layout.files) == 10 and not layout.resample
    text = " ".join(layout.warnings)
    assert "localizer image(s) (ImageType LOCALIZER) left out: image 50" in text
    assert "1 coronal image(s) of 256x512 pixels" in text and "image 51" in text
    assert text.startswith("series 3 (Thorax):")


def test_two_volumes_in_one_series_are_refused() -> None:
    coronal = [header(100 + k, 0.0, orientation=CORONAL, position=(0, k, 0)) for k in range(6)]
    with pytest.raises(SeriesRefused, match="more than one volume"):
        check_headers([*stack(), *coronal], same_pixels=never_same)


def test_only_localizers_or_unplaced_images_are_refused() -> None:
    loc = [header(1, 0.0, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))]
    with pytest.raises(SeriesRefused, match="only localizer"):
        check_headers(loc, same_pixels=never_same)
    unplaced = SliceHeader(path=Path("/x/1.dcm"), rows=64, columns=64)
    with pytest.raises(SeriesRefused, match="no position in the patient"):
        check_headers([unplaced], same_pixels=never_same)


def test_missing_slice_is_refused_naming_the_neighbours() -> None:
    slices = [h for h in stack() if h.instance_number != 5]
    with pytest.raises(SeriesRefused) as info:
        check_headers(slices, same_pixels=never_same)
    message = str(info.value)
    assert "incomplete" in message and "about 1 slice(s) missing between image 4 and image 6" in (
        message
    )
    assert "2.50 mm apart" in message


def test_uneven_spacing_is_resampled_at_the_median_gap() -> None:
    heights = [0.0, 2.5, 5.0, 7.5, 10.6, 13.1, 15.6]
    layout = check_headers(
        [header(k + 1, z) for k, z in enumerate(heights)], same_pixels=never_same
    )
    assert layout.resample
    assert layout.slice_spacing == pytest.approx(2.5)
    assert layout.grid_size[2] == round(15.6 / 2.5) + 1
    assert any("varies from 2.50 to 3.10 mm" in w for w in layout.warnings)


def test_gantry_tilt_is_resampled_and_grows_the_grid() -> None:
    step, angle = 2.5, math.radians(20)
    slices = [
        header(k + 1, 0.0, position=(0.0, k * step * math.tan(angle), k * step)) for k in range(8)
    ]
    layout = check_headers(slices, same_pixels=never_same)
    assert layout.resample
    assert layout.slice_spacing == pytest.approx(step)
    drift_pixels = math.ceil(7 * step * math.tan(angle) / 0.8 - 1e-6)
    assert layout.grid_size == (64, 64 + drift_pixels, 8)
    assert any("gantry tilt of 20.0 degrees" in w for w in layout.warnings)


# --- files -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_phantom() -> Phantom:
    return make_phantom(7, shape=(12, 40, 40), spacing=(1.0, 1.0, 2.5))


def test_read_slice_header_matches_pydicom(tmp_path: Path, small_phantom: Phantom) -> None:
    path = write_dicom_series(small_phantom, tmp_path)[3]
    h = read_slice_header(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert h is not None
    assert h.sop_instance_uid == ds.SOPInstanceUID
    assert h.position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert h.orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert (h.rows, h.columns) == (ds.Rows, ds.Columns)
    assert h.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert h.image_type == tuple(ds.ImageType)
    assert h.instance_number == ds.InstanceNumber
    # Implicit VR Little Endian: Rows/Columns carry no VR
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    implicit = tmp_path / "implicit.dcm"
    ds.save_as(implicit, implicit_vr=True, little_endian=True)
    assert read_slice_header(implicit) == dataclasses.replace(h, path=implicit)
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert read_slice_header(tmp_path / "notes.txt") is None


def test_volume_is_read_from_exactly_the_kept_files(tmp_path: Path, small_phantom: Phantom) -> None:
    files = write_dicom_series(small_phantom, tmp_path / "ct")
    # a true repeat of slice 6 (brighter, later acquisition), an identical copy of slice 3 and a
    # localizer with the same matrix
    ds6 = pydicom.dcmread(files[5])
    bright = (ds6.pixel_array + 100).astype(np.int16)
    copy_instance(
        files[5],
        tmp_path / "ct" / "R1.dcm",
        InstanceNumber=40,
        AcquisitionNumber=2,
        PixelData=bright.tobytes(),
    )
    copy_instance(files[2], tmp_path / "ct" / "R2.dcm", InstanceNumber=41)
    copy_instance(
        files[0],
        tmp_path / "ct" / "L1.dcm",
        InstanceNumber=42,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImagePositionPatient=["0", "0", "7"],
    )
    series = read_series(tmp_path / "ct")
    names = [p.name for p in series.dicom_files]
    # slice 6: the later acquisition; slice 3: of two identical images the rule's choice (the
    # higher InstanceNumber); the localizer nowhere
    assert names == [{2: "R2.dcm", 5: "R1.dcm"}.get(i, f.name) for i, f in enumerate(files)]
    array = sitk.GetArrayFromImage(series.image)
    expected = small_phantom.image.copy()
    expected[5] += 100
    np.testing.assert_array_equal(array, expected)
    assert series.image.GetSpacing() == pytest.approx(small_phantom.spacing)
    assert series.image.GetOrigin() == pytest.approx(small_phantom.origin, abs=1e-4)
    assert len(series.layout.warnings) == 3  # type: ignore[union-attr]


def test_missing_slice_folder_is_refused(tmp_path: Path, small_phantom: Phantom) -> None:
    files = write_dicom_series(small_phantom, tmp_path / "ct")
    files[6].unlink()
    with pytest.raises(SeriesRefused, match="missing between image 6 and image 8"):
        check_series_folder(tmp_path / "ct")


def tilted_series(ph: Phantom, folder: Path, rows_per_slice: int) -> tuple[Phantom, list[Path]]:
    """The phantom ``ph`` (identity direction) cut into axial slices whose positions drift along
    the column direction by ``rows_per_slice`` rows from one slice to the next (a CT gantry tilt
    of atan(rows_per_slice * row spacing / slice spacing)); the pixels are the phantom's at each
    slice pixel's patient position (-1000 outside it). Returns the tilted phantom as written (its
    ``direction`` holds the tilted slice direction) and the files."""
    sx, sy, sz = ph.spacing
    shear = rows_per_slice * sy / sz
    nz, ny, _ = ph.shape
    image = np.full_like(ph.image, -1000.0)
    labels = np.zeros_like(ph.labels)
    for k in range(nz):
        src = np.arange(ny) + k * rows_per_slice
        ok = src < ny
        image[k, ok] = ph.image[k, src[ok]]
        labels[k, ok] = ph.labels[k, src[ok]]
    step = np.array([0.0, shear * sz, sz])
    length = float(np.linalg.norm(step))
    slice_dir = step / length
    direction = (1.0, 0.0, slice_dir[0], 0.0, 1.0, slice_dir[1], 0.0, 0.0, slice_dir[2])
    tilted = Phantom(image, labels, (sx, sy, length), ph.origin, direction)
    return tilted, write_dicom_series(tilted, folder)


def test_tilted_series_is_resampled_onto_a_rectilinear_grid(tmp_path: Path) -> None:
    ph = make_phantom(8, shape=(16, 60, 40), spacing=(1.0, 0.5, 2.0))
    tilted, files = tilted_series(ph, tmp_path / "ct", 1)
    series = read_series(tmp_path / "ct")
    layout = series.layout
    assert layout is not None and layout.resample
    assert any("gantry tilt of 14.0 degrees" in w for w in layout.warnings)
    image = series.image
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1), abs=1e-9)
    assert image.GetSpacing() == pytest.approx((1.0, 0.5, 2.0))
    # every voxel of the rectilinear volume holds the phantom's value at its patient position
    truth = sitk.GetImageFromArray(ph.image)
    truth.SetSpacing(ph.spacing)
    truth.SetOrigin(ph.origin)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(truth, image, sitk.Transform(), sitk.sitkNearestNeighbor, -1000.0)
    )
    inside = sitk.GetArrayFromImage(image) > -999.5
    array = sitk.GetArrayFromImage(image)
    assert inside.mean() > 0.6
    np.testing.assert_allclose(array[inside], expected[inside], atol=1e-3)
    # and a mask on that grid maps back onto the tilted source slices
    back = onto_source_slices((expected > 150).astype(np.uint8), layout, is_mask=True)
    assert back.shape == tilted.labels.shape
    agree = (back > 0) == (tilted.image > 150)
    assert agree.all()
    assert [p.name for p in series.dicom_files] == [f.name for f in files]


def test_in_plane_jitter_without_tilt_is_named_as_such() -> None:
    """Slices that move sideways back and forth (no overall tilt) are still resampled, and the
    warning says what moved instead of a tilt of 0 degrees."""
    slices = [header(k + 1, 0.0, position=(0.4 if k % 2 else 0.0, 0.0, k * 2.5)) for k in range(6)]
    slices[-1] = header(6, 0.0, position=(0.0, 0.0, 12.5))
    layout = check_headers(slices, same_pixels=never_same)
    assert layout.resample
    assert any("move by up to 0.40 mm within their plane" in w for w in layout.warnings)
