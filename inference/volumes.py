"""Reading series and putting volumes on one grid.

A series entry is a folder holding one DICOM series (read with GDCM, which sorts the slices along
their normal; the file order it returns is kept so exports reference the right source per slice),
an image file SimpleITK reads (NIfTI, NRRD, MHA/MHD), or a folder holding exactly one such file.
Other inputs of a stage are resampled onto the first input's grid in physical space with the
identity transform: linear for images, nearest neighbour for label maps and masks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_node.core.errors import InvalidRequest

LOGGER = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Series:
    """A volume as read, with the DICOM files in the order of its z axis (empty for image files)."""

    image: sitk.Image
    path: Path
    dicom_files: list[Path] = field(default_factory=list)

    @property
    def is_dicom(self) -> bool:
        return bool(self.dicom_files)


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in IMAGE_SUFFIXES)


def read_series(path: Path, *, what: str = "series") -> Series:
    """Read one series (see module doc); raise :class:`InvalidRequest` naming ``what`` and the
    path."""
    if path.is_file():
        return Series(_read_file(path, what), path)
    if not path.is_dir():
        raise InvalidRequest(f"{what}: {path} does not exist")
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if len(series_ids) > 1:
        raise InvalidRequest(
            f"{what}: {path} holds {len(series_ids)} DICOM series; point to a folder with one"
        )
    if len(series_ids) == 1:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_ids[0]))
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InvalidRequest(f"{what}: cannot read the DICOM series in {path}: {exc}") from exc
        return Series(_as_volume(image), path, [Path(f) for f in files])
    images = sorted(p for p in path.iterdir() if _is_image_file(p))
    if len(images) == 1:
        return Series(_read_file(images[0], what), images[0])
    if not images:
        raise InvalidRequest(f"{what}: {path} holds neither a DICOM series nor an image file")
    raise InvalidRequest(f"{what}: {path} holds {len(images)} image files; name one of them")


def _read_file(path: Path, what: str) -> sitk.Image:
    try:
        return _as_volume(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise InvalidRequest(f"{what}: {path} is not an image SimpleITK can read: {exc}") from exc


def _as_volume(image: sitk.Image) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidRequest("multi-component (colour or vector) images are not model inputs")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])
    if image.GetDimension() != 3:
        raise InvalidRequest(f"expected a 3D volume, got {image.GetDimension()} dimensions")
    return image


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def onto_grid(image: sitk.Image, reference: sitk.Image, *, is_mask: bool) -> sitk.Image:
    """``image`` resampled onto ``reference``'s grid (identity transform, physical space)."""
    pixel = sitk.sitkUInt16 if is_mask else sitk.sitkFloat32
    if same_grid(image, reference):
        return sitk.Cast(image, pixel) if image.GetPixelID() != pixel else image
    interpolator = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, pixel)


def array_onto_grid(
    array: np.ndarray, geometry: sitk.Image, reference: sitk.Image, *, is_mask: bool
) -> np.ndarray:
    """Like :func:`onto_grid` for a (z, y, x) array laid out on ``geometry``."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(geometry)
    return sitk.GetArrayFromImage(onto_grid(image, reference, is_mask=is_mask))


def to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A (z, y, x) array (or (c, z, y, x) as a vector image) in ``reference``'s geometry."""
    if array.ndim == 4:
        image = sitk.GetImageFromArray(np.moveaxis(array, 0, -1), isVector=True)
    else:
        image = sitk.GetImageFromArray(array)
    image.SetOrigin(reference.GetOrigin())
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
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
