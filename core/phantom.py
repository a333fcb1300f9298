"""Synthetic CT phantoms for tests, benchmarks and the demo model.

A phantom is CT-like noise (about 0 HU, standard deviation about 50) holding a sphere of about
+300 HU (label 1, radius 6 to 12 mm) and an axis-aligned cube of about +600 HU (label 2, side 8 to
16 mm) at random places that do not overlap, 40 to 64 voxels a side, spacing about 1 mm (in-plane
pixels may be non-square).

The objects are placed in voxel space scaled by the spacing, so ``direction`` only rotates the
whole volume in patient space: the labels stay exact whatever the orientation, which lets tests
make oblique or sagittal series and check contours and segmentations against known masks.

Voxel values are whole numbers of HU, so the NIfTI and the DICOM (int16 with RescaleIntercept)
forms of one phantom hold exactly the same voxels.

``python -m core.phantom --out DIR [--seed N]`` writes a demo study:
``DIR/nifti/image.nii.gz``, ``DIR/nifti/labels.nii.gz`` and ``DIR/dicom/ct/*.dcm``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from nnunet_node.core import images

LOGGER = logging.getLogger(__name__)

SPHERE_LABEL = 1
CUBE_LABEL = 2
LABEL_NAMES = {0: "background", SPHERE_LABEL: "sphere", CUBE_LABEL: "cube"}

SPHERE_HU = 300.0
CUBE_HU = 600.0
NOISE_SD = 50.0
SPHERE_RADIUS_MM = (6.0, 12.0)
CUBE_SIDE_MM = (8.0, 16.0)
SIDE_VOXELS = (40, 64)
# Default spacing ranges (mm): in-plane x and y drawn separately, so pixels are usually non-square.
INPLANE_SPACING_MM = (0.8, 1.2)
SLICE_SPACING_MM = (1.0, 1.5)

RESCALE_INTERCEPT = -1024.0
RESCALE_SLOPE = 1.0
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# A gap between the sphere and the cube, so that neither touches the other.
MIN_GAP_MM = 2.0


@dataclass
class Phantom:
    """One phantom volume and its ground truth.

    ``image`` and ``labels`` are numpy arrays in z, y, x order; ``spacing``, ``origin`` and
    ``direction`` are in SimpleITK order (x, y, z; ``direction`` is the row-major 3x3 matrix whose
    column j is the patient-space direction of index axis j).
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape, z, y, x."""
        z, y, x = self.image.shape
        return (int(z), int(y), int(x))


def _check_direction(direction: Sequence[float]) -> tuple[float, ...]:
    """Validate a 9-value direction: orthonormal and right-handed.

    A left-handed frame cannot survive a DICOM round trip: readers order slices along
    row x column (PS3.3 C.7.6.2.1.1), so they would hand back the volume flipped in z.
    """
    values = tuple(float(v) for v in direction)
    if len(values) != 9:
        raise ValueError(f"direction needs 9 values, got {len(values)}")
    matrix = np.array(values).reshape(3, 3)
    if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-6):
        raise ValueError(f"direction {values} is not orthonormal")
    if np.linalg.det(matrix) < 0:
        raise ValueError(f"direction {values} is left-handed; DICOM series cannot keep it")
    return values


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in spacing)
    if len(values) != 3 or any(not np.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"spacing needs three positive values (x, y, z mm), got {spacing}")
    return (values[0], values[1], values[2])


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(v) for v in shape)
    if len(values) != 3 or any(v < 8 for v in values):
        raise ValueError(f"shape needs three sizes of at least 8 voxels (z, y, x), got {shape}")
    return (values[0], values[1], values[2])


def _place_objects(
    rng: np.random.Generator, extent_xyz: np.ndarray, spacing_xyz: np.ndarray
) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Draw sphere centre and radius, cube centre and side (mm, voxel space x, y, z).

    Both objects lie inside the volume (one voxel of margin) and at least ``MIN_GAP_MM`` apart.
    When the volume is too small for large objects, the upper bounds shrink until they fit.
    """
    margin = spacing_xyz
    r_hi, s_hi = SPHERE_RADIUS_MM[1], CUBE_SIDE_MM[1]
    for attempt in range(2000):
        if attempt and attempt % 100 == 0:
            r_hi = max(SPHERE_RADIUS_MM[0], r_hi * 0.85)
            s_hi = max(CUBE_SIDE_MM[0], s_hi * 0.85)
        radius = float(rng.uniform(SPHERE_RADIUS_MM[0], r_hi))
        side = float(rng.uniform(CUBE_SIDE_MM[0], s_hi))
        lo_s, hi_s = radius + margin, extent_xyz - radius - margin
        lo_c, hi_c = side / 2 + margin, extent_xyz - side / 2 - margin
        if np.any(hi_s <= lo_s) or np.any(hi_c <= lo_c):
            continue
        sphere_c = rng.uniform(lo_s, hi_s)
        cube_c = rng.uniform(lo_c, hi_c)
        # Distance from the sphere centre to the nearest point of the cube.
        nearest = np.clip(sphere_c, cube_c - side / 2, cube_c + side / 2)
        if np.linalg.norm(sphere_c - nearest) >= radius + MIN_GAP_MM:
            return sphere_c, radius, cube_c, side
    raise ValueError(
        f"volume of {extent_xyz.round(1).tolist()} mm is too small for a sphere and a cube"
    )


def make_phantom(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
) -> Phantom:
    """Make the phantom of ``seed``; the same arguments always give the same phantom.

    ``shape`` is z, y, x (numpy order, as ``Phantom.image.shape``); by default each side is drawn
    from 40 to 64 voxels. ``spacing`` is x, y, z mm (SimpleITK order); by default x and y are drawn
    separately from 0.8 to 1.2 mm and z from 1.0 to 1.5 mm. ``direction`` is 9 values, SimpleITK
    order (default identity); it must be orthonormal and right-handed. The volume is centred on the
    patient-space origin (0, 0, 0), give or take a few millimetres.
    """
    rng = np.random.default_rng(seed)
    if shape is None:
        shape = (
            int(rng.integers(SIDE_VOXELS[0], SIDE_VOXELS[1] + 1)),
            int(rng.integers(SIDE_VOXELS[0], SIDE_VOXELS[1] + 1)),
            int(rng.integers(SIDE_VOXELS[0], SIDE_VOXELS[1] + 1)),
        )
    shape_zyx = _check_shape(shape)
    if spacing is None:
        spacing = (
            round(float(rng.uniform(*INPLANE_SPACING_MM)), 3),
            round(float(rng.uniform(*INPLANE_SPACING_MM)), 3),
            round(float(rng.uniform(*SLICE_SPACING_MM)), 3),
        )
    spacing_xyz = _check_spacing(spacing)
    direction_t = _check_direction(IDENTITY if direction is None else direction)

    size_xyz = np.array(shape_zyx[::-1], dtype=float)
    sp = np.array(spacing_xyz)
    extent = (size_xyz - 1) * sp
    sphere_c, radius, cube_c, side = _place_objects(rng, extent, sp)

    z, y, x = np.meshgrid(
        np.arange(shape_zyx[0]) * sp[2],
        np.arange(shape_zyx[1]) * sp[1],
        np.arange(shape_zyx[2]) * sp[0],
        indexing="ij",
    )
    labels = np.zeros(shape_zyx, dtype=np.uint8)
    in_sphere = (x - sphere_c[0]) ** 2 + (y - sphere_c[1]) ** 2 + (
        z - sphere_c[2]
    ) ** 2 <= radius**2
    half = side / 2
    in_cube = (
        (np.abs(x - cube_c[0]) <= half)
        & (np.abs(y - cube_c[1]) <= half)
        & (np.abs(z - cube_c[2]) <= half)
    )
    labels[in_sphere] = SPHERE_LABEL
    labels[in_cube] = CUBE_LABEL

    image = rng.normal(0.0, NOISE_SD, size=shape_zyx)
    image[in_sphere] += SPHERE_HU + rng.uniform(-20, 20)
    image[in_cube] += CUBE_HU + rng.uniform(-30, 30)
    image = np.round(image).astype(np.float32)

    # Centre the volume on the origin of patient space, with a small random shift.
    matrix = np.array(direction_t).reshape(3, 3)
    shift = rng.uniform(-5.0, 5.0, size=3)
    origin = -(matrix @ (extent / 2)) + shift
    return Phantom(
        image=image,
        labels=labels,
        spacing=spacing_xyz,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=direction_t,
    )


def _with_geometry(img: sitk.Image, ph: Phantom) -> sitk.Image:
    images.set_geometry(img, origin=ph.origin, spacing=ph.spacing, direction=ph.direction)
    return img


def to_sitk(ph: Phantom) -> tuple[sitk.Image, sitk.Image]:
    """Image (float32 HU) and label map (uint8) as SimpleITK images in the phantom's geometry."""
    image = _with_geometry(sitk.GetImageFromArray(ph.image.astype(np.float32)), ph)
    labels = _with_geometry(sitk.GetImageFromArray(ph.labels.astype(np.uint8)), ph)
    return image, labels


def write_nifti(ph: Phantom, image_path: Path, labels_path: Path | None = None) -> None:
    """Write the image (and the label map when ``labels_path`` is given) as NIfTI (or any format
    SimpleITK picks from the suffix)."""
    image, labels = to_sitk(ph)
    Path(image_path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(image_path), useCompression=True)
    if labels_path is not None:
        Path(labels_path).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(labels, str(labels_path), useCompression=True)


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2, VR DS)."""
    return format_number_as_ds(float(value))


def write_dicom_series(
    ph: Phantom,
    folder: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Demo",
    series_description: str = "Phantom CT",
    series_number: int = 1,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series, one file per slice, in z order.

    Geometry follows the Image Plane module (PS3.3 C.7.6.2): ImageOrientationPatient holds the
    direction of the rows (index x) then of the columns (index y); ImagePositionPatient is the
    centre of the first voxel of each slice; PixelSpacing is row spacing (between rows, y) then
    column spacing (between columns, x). Pixels are int16 with RescaleIntercept -1024 and
    RescaleSlope 1 (CT Image module, PS3.3 C.8.2.1). Files are Part 10, explicit VR little endian.
    Returns the paths, slice 0 first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    matrix = np.array(ph.direction).reshape(3, 3)
    row_dir, col_dir, slice_dir = matrix[:, 0], matrix[:, 1], matrix[:, 2]
    normal = np.cross(row_dir, col_dir)
    sx, sy, sz = ph.spacing
    origin = np.array(ph.origin)
    stored = np.round((ph.image - RESCALE_INTERCEPT) / RESCALE_SLOPE)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("phantom values do not fit int16 with the rescale used")
    stored = stored.astype(np.int16)
    nz, ny, nx = ph.shape

    paths: list[Path] = []
    for k in range(nz):
        position = origin + slice_dir * k * sz
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # Patient and study
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = date
        ds.StudyTime = time
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Phantom study"
        # Series and equipment
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.SeriesDate = date
        ds.SeriesTime = time
        ds.PatientPosition = "HFS"
        # Type 2C (PS3.3 C.7.3.1); a phantom has no side, so it is present and empty.
        ds.Laterality = ""
        ds.Manufacturer = "nnunet-node phantom"
        ds.ManufacturerModelName = "core.phantom"
        ds.SoftwareVersions = "1"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        # Image
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = date
        ds.ContentTime = time
        ds.AcquisitionDate = date
        ds.AcquisitionTime = time
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]
        ds.SliceThickness = _ds(sz)
        ds.SpacingBetweenSlices = _ds(sz)
        ds.SliceLocation = _ds(float(position @ normal))
        ds.KVP = "120"
        ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
        ds.RescaleSlope = _ds(RESCALE_SLOPE)
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()

        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    LOGGER.debug("wrote %d slices of series %s to %s", len(paths), series_uid, folder)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Write a demo study: NIfTI image and labels, and the DICOM CT series."""
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_node.core.phantom", description="Write a synthetic CT phantom study."
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    ph = make_phantom(args.seed)
    out: Path = args.out
    write_nifti(ph, out / "nifti" / "image.nii.gz", out / "nifti" / "labels.nii.gz")
    files = write_dicom_series(ph, out / "dicom" / "ct")
    print(
        f"phantom seed {args.seed}: shape z,y,x {ph.shape}, spacing x,y,z {ph.spacing} mm; "
        f"wrote {out / 'nifti'} and {len(files)} DICOM files in {out / 'dicom' / 'ct'}"
    )


if __name__ == "__main__":
    main()
