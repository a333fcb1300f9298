"""Series as hospitals send them, built from phantoms (core/phantom.py): repeats, localizers, gaps,
uneven spacing, gantry tilt; and readers of what a SEG / RTSTRUCT references. Shared by the job,
HTTP and routed tests of the series geometry check."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.uid import generate_uid

from nnunet_node.core.phantom import (
    SPHERE_LABEL,
    Phantom,
    make_phantom,
    to_sitk,
    write_dicom_series,
)

SHAPE = (32, 32, 32)
SPACING = (1.2, 1.2, 1.5)


def phantom_series(folder: Path, seed: int, **kw: object) -> tuple[Phantom, list[Path]]:
    """A 32^3 phantom CT series (one window of the demo model's patch) in ``folder``."""
    ph = make_phantom(seed, shape=SHAPE, spacing=SPACING)
    return ph, write_dicom_series(ph, folder, **kw)  # type: ignore[arg-type]


def copy_instance(source: Path, target: Path, **changes: object) -> str:
    """A copy of ``source`` under a new SOPInstanceUID with ``changes`` (keywords); its UID."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(target, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def repeat_instance(source: Path, target: Path, instance_number: int, acquisition: int) -> str:
    """A true repeat of ``source``: same position, other pixels (+10 HU and some noise)."""
    ds = pydicom.dcmread(source)
    rng = np.random.default_rng(instance_number)
    pixels = ds.pixel_array.astype(np.int32) + 10 + rng.integers(-10, 10, ds.pixel_array.shape)
    return copy_instance(
        source,
        target,
        InstanceNumber=instance_number,
        AcquisitionNumber=acquisition,
        PixelData=pixels.astype(np.int16).tobytes(),
    )


def localizer(source: Path, target: Path, *, other_matrix: bool) -> str:
    """A localizer filed in the series: ImageType LOCALIZER with the same matrix and orientation
    (``other_matrix`` False), or a coronal image of 24x40 pixels without that ImageType."""
    if not other_matrix:
        return copy_instance(
            source,
            target,
            InstanceNumber=900,
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        )
    ds = pydicom.dcmread(source)
    pixels = np.full((24, 40), 1024, dtype=np.int16)
    return copy_instance(
        source,
        target,
        InstanceNumber=901,
        ImageOrientationPatient=["1", "0", "0", "0", "0", "-1"],
        Rows=24,
        Columns=40,
        PixelSpacing=["2", "2"],
        PixelData=pixels.tobytes(),
        ImagePositionPatient=[str(float(v)) for v in ds.ImagePositionPatient],
    )


def uneven_series(folder: Path, seed: int) -> tuple[Phantom, list[Path], list[int]]:
    """A phantom sampled every 0.5 mm, of which the slices kept have gaps of 1.5 and 2.0 mm in
    turn (an uneven but complete series). Returns the fine phantom, the kept files and their
    indices in it."""
    ph = make_phantom(seed, shape=(96, 32, 32), spacing=(1.2, 1.2, 0.5))
    scratch = folder.parent / f"{folder.name}-all"
    files = write_dicom_series(ph, scratch)
    keep, k, step = [], 0, 3
    while k < len(files):
        keep.append(k)
        k += step
        step = 4 if step == 3 else 3
    folder.mkdir(parents=True, exist_ok=True)
    kept = []
    for k in keep:
        kept.append(Path(shutil.move(files[k], folder / files[k].name)))
    shutil.rmtree(scratch)
    return ph, kept, keep


def tilted_series(folder: Path, seed: int, degrees: float) -> tuple[np.ndarray, list[Path]]:
    """A CT series of a phantom acquired with a gantry tilt of ``degrees``: axial slices whose
    positions move along the column direction by tan(degrees) per mm of table travel. Each slice
    samples the phantom at its own pixels' patient positions (linear). Returns the sphere's
    centroid in patient coordinates (mm, of the sphere's voxels in the phantom) and the files."""
    ph = make_phantom(seed, shape=SHAPE, spacing=SPACING)
    image, labels = to_sitk(ph)
    sx, sy, sz = ph.spacing
    step = np.array([0.0, sz * math.tan(math.radians(degrees)), sz])
    nz, ny, nx = ph.shape
    planes = np.empty(ph.image.shape, dtype=np.float32)
    for k in range(nz):
        reference = sitk.Image(nx, ny, 1, sitk.sitkFloat32)
        reference.SetSpacing((sx, sy, sz))
        reference.SetOrigin(tuple(np.asarray(ph.origin) + k * step))
        planes[k] = sitk.GetArrayFromImage(
            sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1000.0)
        )[0]
    length = float(np.linalg.norm(step))
    slice_dir = step / length
    direction = (1.0, 0.0, slice_dir[0], 0.0, 1.0, slice_dir[1], 0.0, 0.0, slice_dir[2])
    tilted = Phantom(
        np.round(planes), np.zeros_like(ph.labels), (sx, sy, length), ph.origin, direction
    )
    sphere = np.argwhere(ph.labels == SPHERE_LABEL)[:, ::-1]  # x, y, z indices
    centre = labels.TransformContinuousIndexToPhysicalPoint(sphere.mean(axis=0).tolist())
    return np.asarray(centre), write_dicom_series(tilted, folder)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def seg_references(seg: Dataset) -> tuple[set[str], set[str]]:
    """The SOPInstanceUIDs a SEG names in its ReferencedSeriesSequence, and those its frames name
    as their source images."""
    listed = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    frames = {
        str(source.ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for source in derivation.SourceImageSequence
    }
    return listed, frames


def rtstruct_references(rt: Dataset) -> tuple[set[str], set[str]]:
    """The SOPInstanceUIDs an RTSTRUCT lists under its frame of reference, and those its contours
    lie on."""
    listed = {
        str(image.ReferencedSOPInstanceUID)
        for frame in rt.ReferencedFrameOfReferenceSequence
        for study in frame.RTReferencedStudySequence
        for series in study.RTReferencedSeriesSequence
        for image in series.ContourImageSequence
    }
    contours = {
        str(image.ReferencedSOPInstanceUID)
        for roi in rt.ROIContourSequence
        for contour in roi.ContourSequence
        for image in contour.ContourImageSequence
    }
    return listed, contours


def seg_centroid(seg: Dataset, segment_number: int) -> np.ndarray:
    """The centroid (mm, patient coordinates) of a BINARY SEG's segment, from each frame's own
    plane position (PS3.3 C.7.6.16.2.3) and the shared orientation and pixel spacing."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    )
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    points = []
    for frame, plane in zip(seg.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number != segment_number:
            continue
        origin = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        rows, columns = np.nonzero(plane)
        points.append(
            origin
            + np.outer(columns * column_spacing, orientation[:3])
            + np.outer(rows * row_spacing, orientation[3:])
        )
    return np.concatenate(points).mean(axis=0)


def nifti_centroid(path: Path, label: int) -> np.ndarray:
    """The centroid (mm, patient coordinates) of ``label`` in a NIfTI label map."""
    image = sitk.ReadImage(str(path))
    voxels = np.argwhere(sitk.GetArrayFromImage(image) == label)[:, ::-1]
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(voxels.mean(axis=0).tolist()))
