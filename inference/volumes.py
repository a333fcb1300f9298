"""Reading series and putting volumes on one grid.

A series entry is a folder holding one DICOM series, an image file SimpleITK reads (NIfTI, NRRD,
MHA/MHD), or a folder holding exactly one such file. A DICOM series is first checked by
:mod:`inference.series_check` (headers only), which decides the kept instances, their order and
the grid; the volume is read from exactly those files (GDCM through SimpleITK), resampled when the
check says so (gantry tilt, non-uniform spacing), and :func:`onto_source_slices` maps arrays on
that grid back onto the kept source slices for the SEG and RTSTRUCT.
Other inputs of a stage are resampled onto the first input's grid in physical space with the
identity transform: linear for images, nearest neighbour for label maps and masks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_node.core import images
from nnunet_node.core.errors import InvalidRequest
from nnunet_node.inference.series_check import SeriesLayout, check_series_folder, is_image_file

LOGGER = logging.getLogger(__name__)


@dataclass
class SeriesVolume:
    """One series read for a job: its image (a SimpleITK volume, x, y, z order, spacing in mm).
    For a DICOM series, ``dicom_files`` are the kept instances in the order of the source slices
    and ``layout`` the check's decision (None for image files and for a single multi-frame file,
    whose ``dicom_files`` is that file). Not to be confused with the index's row of a series,
    ``storage.models.Series``."""

    image: sitk.Image
    path: Path
    dicom_files: list[Path] = field(default_factory=list)
    layout: SeriesLayout | None = None

    @property
    def is_dicom(self) -> bool:
        return bool(self.dicom_files)


def read_series(
    path: Path, *, what: str = "series", layout: SeriesLayout | None = None
) -> SeriesVolume:
    """Read one series (see module doc); raise :class:`InvalidRequest` naming ``what`` and the
    path (:class:`~inference.series_check.SeriesRefused` for a refused DICOM series). ``layout``
    is the check's result for a DICOM folder when the caller already has it."""
    if path.is_file():
        return SeriesVolume(_read_file(path, what), path)
    if not path.is_dir():
        raise InvalidRequest(f"{what}: {path} does not exist")
    if layout is None:
        layout = check_series_folder(path, what=what)
    if layout is not None:
        return SeriesVolume(read_dicom_volume(layout, what), path, list(layout.files), layout)
    series_ids = images.gdcm_series_ids(str(path))
    if len(series_ids) > 1:
        raise InvalidRequest(
            f"{what}: {path} holds {len(series_ids)} DICOM series; point to a folder with one"
        )
    if len(series_ids) == 1:
        files = images.gdcm_series_files(str(path), series_ids[0])
        try:
            image = images.read_series_files(files)
        except RuntimeError as exc:
            raise InvalidRequest(f"{what}: cannot read the DICOM series in {path}: {exc}") from exc
        return SeriesVolume(_as_volume(image), path, [Path(f) for f in files])
    image_files = sorted(p for p in path.iterdir() if is_image_file(p))
    if len(image_files) == 1:
        return SeriesVolume(_read_file(image_files[0], what), image_files[0])
    if not image_files:
        raise InvalidRequest(f"{what}: {path} holds neither a DICOM series nor an image file")
    raise InvalidRequest(f"{what}: {path} holds {len(image_files)} image files; name one of them")


def read_dicom_volume(layout: SeriesLayout, what: str = "series") -> sitk.Image:
    """The volume of a checked DICOM series: the kept files read in order (pixel values after
    the Modality LUT, as GDCM gives them), on ``layout``'s grid (x, y, z). Resampled series are
    float32, linear interpolation, filled with the volume's minimum outside the source slices."""
    try:
        image = _as_volume(images.read_series_files([str(f) for f in layout.files]))
    except RuntimeError as exc:
        raise InvalidRequest(f"{what}: cannot read the DICOM series: {exc}") from exc
    if images.size(image) != (layout.columns, layout.rows, len(layout.files)):
        raise InvalidRequest(
            f"{what}: read a volume of {images.size(image)} voxels where the headers say "
            f"{(layout.columns, layout.rows, len(layout.files))}"
        )
    if layout.resample:
        array = resample_stack(sitk.GetArrayFromImage(image), layout)
        image = sitk.GetImageFromArray(array)
    images.set_geometry(
        image,
        origin=layout.grid_origin,
        spacing=layout.grid_spacing,
        direction=layout.grid_direction,
    )
    return image


def _slice_bracket(heights: np.ndarray, height: float) -> tuple[int, float]:
    """The source slice at or below ``height`` and the weight of the next one (0..1)."""
    k = int(np.clip(np.searchsorted(heights, height, side="right") - 1, 0, len(heights) - 1))
    if k == len(heights) - 1:
        return k, 0.0
    gap = heights[k + 1] - heights[k]
    return k, float(np.clip((height - heights[k]) / gap, 0.0, 1.0))


def _shift_plane(
    plane: np.ndarray,
    offset_yx: tuple[float, float],
    shape_yx: tuple[int, int],
    order: int,
    fill: float,
) -> np.ndarray:
    """``out[j, i] = plane[j + offset_y, i + offset_x]`` (interpolated with spline ``order``)."""
    if order == 0:
        offset_yx = (float(np.round(offset_yx[0])), float(np.round(offset_yx[1])))
    shifted: np.ndarray = ndimage.affine_transform(
        plane,
        np.ones(2),
        offset=offset_yx,
        output_shape=shape_yx,
        order=order,
        mode="constant",
        cval=fill,
    )
    return shifted


def resample_stack(stack: np.ndarray, layout: SeriesLayout) -> np.ndarray:
    """The (z, y, x) source slices in ``stack`` (one per kept file) onto ``layout``'s rectilinear
    grid, float32: linear along the normal between the two nearest source slices, each slice
    shifted in its plane by its drift (gantry tilt), bilinear in-plane: dcm2niix's gantry
    tilt correction (each slice shifted in-plane), generalised to uneven spacing. Points outside
    every source slice take the stack's minimum (air on CT)."""
    size_x, size_y, size_z = layout.grid_size
    shift_x, shift_y = layout.grid_shift
    sx, sy = layout.pixel_spacing_xy
    heights = np.asarray(layout.heights)
    fill = float(stack.min())
    out = np.empty((size_z, size_y, size_x), dtype=np.float32)
    for m in range(size_z):
        k, w = _slice_bracket(heights, m * layout.slice_spacing)
        plane = np.zeros((size_y, size_x), dtype=np.float32)
        for index, weight in ((k, 1.0 - w), (k + 1, w)):
            if weight <= 0.0:
                continue
            u, v = layout.offsets[index]
            offset = (shift_y - v / sy, shift_x - u / sx)
            plane += weight * _shift_plane(
                stack[index].astype(np.float32), offset, (size_y, size_x), 1, fill
            )
        out[m] = plane
    return out


def onto_source_slices(
    array: np.ndarray, layout: SeriesLayout | None, *, is_mask: bool
) -> np.ndarray:
    """An array on the model's grid, (z, y, x) or (c, z, y, x), mapped onto the kept source
    slices: (n_files, rows, columns) (or with the leading c). The identity for series that were
    not resampled; otherwise nearest neighbour (``is_mask``) or linear, the inverse of
    :func:`resample_stack`."""
    if layout is None or not layout.resample:
        return array
    if array.ndim == 4:
        return np.stack([onto_source_slices(a, layout, is_mask=is_mask) for a in array])
    shift_x, shift_y = layout.grid_shift
    sx, sy = layout.pixel_spacing_xy
    out = np.zeros((len(layout.files), layout.rows, layout.columns), dtype=array.dtype)
    order = 0 if is_mask else 1
    grid_heights = np.arange(array.shape[0]) * layout.slice_spacing
    for k, height in enumerate(layout.heights):
        u, v = layout.offsets[k]
        offset = (v / sy - shift_y, u / sx - shift_x)
        if is_mask:
            m = int(np.clip(round(height / layout.slice_spacing), 0, array.shape[0] - 1))
            plane = array[m]
        else:
            m, w = _slice_bracket(grid_heights, height)
            plane = array[m].astype(np.float32)
            if w > 0:
                plane = (1.0 - w) * plane + w * array[m + 1]
        out[k] = _shift_plane(plane, offset, (layout.rows, layout.columns), order, 0)
    return out


def _read_file(path: Path, what: str) -> sitk.Image:
    try:
        return _as_volume(images.read_image(str(path)))
    except RuntimeError as exc:
        raise InvalidRequest(f"{what}: {path} is not an image SimpleITK can read: {exc}") from exc


def _as_volume(image: sitk.Image) -> sitk.Image:
    if images.components_per_pixel(image) != 1:
        raise InvalidRequest("multi-component (colour or vector) images are not model inputs")
    if images.dimension(image) == 2:
        image = images.join_series([image])
    if images.dimension(image) != 3:
        raise InvalidRequest(f"expected a 3D volume, got {images.dimension(image)} dimensions")
    return image


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        images.size(a) == images.size(b)
        and np.allclose(images.spacing(a), images.spacing(b), atol=tol)
        and np.allclose(images.origin(a), images.origin(b), atol=tol)
        and np.allclose(images.direction(a), images.direction(b), atol=tol)
    )


def onto_grid(image: sitk.Image, reference: sitk.Image, *, is_mask: bool) -> sitk.Image:
    """``image`` resampled onto ``reference``'s grid (identity transform, physical space)."""
    pixel = sitk.sitkUInt16 if is_mask else sitk.sitkFloat32
    if same_grid(image, reference):
        return images.cast(image, pixel) if images.pixel_id(image) != pixel else image
    interpolator = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
    return sitk.Resample(image, reference, images.identity_transform(), interpolator, 0.0, pixel)


def array_onto_grid(
    array: np.ndarray, geometry: sitk.Image, reference: sitk.Image, *, is_mask: bool
) -> np.ndarray:
    """Like :func:`onto_grid` for a (z, y, x) array laid out on ``geometry``."""
    image = sitk.GetImageFromArray(array)
    images.copy_geometry(image, geometry)
    return sitk.GetArrayFromImage(onto_grid(image, reference, is_mask=is_mask))


def to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A (z, y, x) array (or (c, z, y, x) as a vector image) in ``reference``'s geometry."""
    if array.ndim == 4:
        image = sitk.GetImageFromArray(np.moveaxis(array, 0, -1), isVector=True)
    else:
        image = sitk.GetImageFromArray(array)
    images.set_geometry(
        image,
        origin=images.origin(reference),
        spacing=images.spacing(reference),
        direction=images.direction(reference),
    )
    return image


def bounding_box(
    mask: np.ndarray, padding_xyz: tuple[int, int, int]
) -> tuple[slice, slice, slice] | None:
    """The (z, y, x) slices of ``mask``'s bounding box grown by ``padding_xyz`` voxels, clipped to
    the volume; ``None`` when the mask is empty."""
    coords = np.nonzero(mask)
    if len(coords[0]) == 0:
        return None
    pad_zyx = padding_xyz[::-1]
    out = []
    for axis, idx in enumerate(coords):
        lo = max(int(idx.min()) - pad_zyx[axis], 0)
        hi = min(int(idx.max()) + 1 + pad_zyx[axis], mask.shape[axis])
        out.append(slice(lo, hi))
    return out[0], out[1], out[2]


def intersect_boxes(
    a: tuple[slice, slice, slice] | None, b: tuple[slice, slice, slice] | None
) -> tuple[slice, slice, slice] | None:
    out = []
    for sa, sb in zip(a or (), b or (), strict=True):
        lo, hi = max(sa.start, sb.start), min(sa.stop, sb.stop)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return out[0], out[1], out[2]
