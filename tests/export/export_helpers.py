"""Helpers of the export tests: the validator, comparisons, and an RTSTRUCT rasteriser."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from skimage.draw import polygon

from nnunet_node.core.phantom import Phantom
from tests.peer_tools import tool


@dataclass
class Series:
    name: str
    phantom: Phantom
    datasets: list[Dataset]  # in the z order of phantom.labels
    paths: list[Path]


def dciodvfy(path: Path) -> list[str]:
    """Run dicom3tools' validator on a file; return its error lines (warnings are allowed)."""
    proc = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]


_VOLATILE_VRS = {"UI", "DA", "TM", "DT"}


def blank_volatile(ds: Dataset) -> dict[str, Any]:
    """The dataset as DICOM JSON with every UID, date and time blanked: what must not change
    between two runs on the same input."""

    def walk(node: dict[str, Any]) -> dict[str, Any]:
        for element in node.values():
            if element.get("vr") in _VOLATILE_VRS:
                element.pop("Value", None)
            elif element.get("vr") == "SQ":
                for item in element.get("Value", []):
                    walk(item)
        return node

    return walk(ds.to_json_dict())


def rasterise_rtstruct(
    rt: Dataset, roi_number: int, sources: list[Dataset], *, plane_tolerance_mm: float = 1e-3
) -> np.ndarray:
    """Fill the ROI's contours back onto the source grid (even-odd rule), checking on the way that
    each contour lies in the plane of the image its ContourImageSequence names."""
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    first = sources[0]
    mask = np.zeros((len(sources), int(first.Rows), int(first.Columns)), dtype=bool)
    (roi_contour,) = [r for r in rt.ROIContourSequence if r.ReferencedROINumber == roi_number]
    for contour in roi_contour.ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        (image_ref,) = contour.ContourImageSequence
        k = index[image_ref.ReferencedSOPInstanceUID]
        ds = sources[k]
        points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        assert len(points) == int(contour.NumberOfContourPoints)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_dir, col_dir = iop[:3], iop[3:]
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        delta = points - ipp
        off_plane = np.abs(delta @ np.cross(row_dir, col_dir))
        assert off_plane.max() <= plane_tolerance_mm, f"contour off its plane by {off_plane.max()}"
        cols = delta @ row_dir / col_spacing
        rows = delta @ col_dir / row_spacing
        rr, cc = polygon(rows, cols, shape=mask.shape[1:])
        filled = np.zeros(mask.shape[1:], dtype=bool)
        filled[rr, cc] = True
        mask[k] ^= filled
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def rasterise_with_sitk(rt: Dataset, roi_number: int, reference: Any) -> np.ndarray:
    """Fill the ROI's contours onto the grid of a SimpleITK image (even-odd rule), mapping points
    with SimpleITK's own physical-to-index transform: a check of the contour geometry that shares
    nothing with the DICOM Image Plane arithmetic of the writer."""
    size_x, size_y, size_z = reference.GetSize()
    mask = np.zeros((size_z, size_y, size_x), dtype=bool)
    (roi_contour,) = [r for r in rt.ROIContourSequence if r.ReferencedROINumber == roi_number]
    for contour in roi_contour.ContourSequence:
        points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        index = np.array(
            [reference.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points]
        )
        k = round(float(index[0, 2]))
        assert np.abs(index[:, 2] - k).max() < 1e-4, "contour not on an image plane"
        rr, cc = polygon(index[:, 1], index[:, 0], shape=mask.shape[1:])
        filled = np.zeros(mask.shape[1:], dtype=bool)
        filled[rr, cc] = True
        mask[k] ^= filled
    return mask
