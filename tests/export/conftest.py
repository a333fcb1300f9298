"""Source series for the export tests: core.phantom CT series in three geometries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from export_helpers import Series

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.export.metadata import SegmentationMetadata, parse_metadata


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


# SimpleITK order: column j is the patient direction of index axis j (x, y, z).
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Sagittal: rows run anterior->posterior (+Y), columns head->feet (-Z), slices left->right (-X).
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
OBLIQUE = tuple(float(v) for v in (_rotation((1.0, 2.0, 0.5), 33.0)).ravel())


def _series(
    tmp: Path, name: str, seed: int, spacing: tuple[float, float, float], direction
) -> Series:
    ph = make_phantom(seed, shape=(30, 44, 40), spacing=spacing, direction=direction)
    paths = write_dicom_series(ph, tmp / name, series_description=f"Phantom {name}")
    return Series(name, ph, [pydicom.dcmread(p) for p in paths], paths)


@pytest.fixture(scope="session")
def series_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Series]:
    tmp = tmp_path_factory.mktemp("export-sources")
    return {
        # non-square pixels: x (columns) 0.7 mm, y (rows) 1.1 mm
        "axial": _series(tmp, "axial", 3, (0.7, 1.1, 1.25), AXIAL),
        "sagittal": _series(tmp, "sagittal", 5, (1.2, 0.8, 1.0), SAGITTAL),
        "oblique": _series(tmp, "oblique", 7, (0.9, 1.15, 1.3), OBLIQUE),
    }


@pytest.fixture(scope="session")
def axial(series_set: dict[str, Series]) -> Series:
    return series_set["axial"]


@pytest.fixture(scope="session")
def phantom_metadata() -> SegmentationMetadata:
    return parse_metadata(
        {
            "algorithm_name": "phantom",
            "algorithm_version": "1.0",
            "series_description": "Phantom segmentation",
            "body_part_examined": "Abdomen",
            "segment_names": [
                {"name": "Sphere", "code": "S-SPH", "scheme": "99NNODE", "label": "sphere"},
                {"name": "Cube", "code": "S-CUB", "scheme": "99NNODE", "label": "cube"},
                "Right Kidney",
            ],
        },
        base_dir=Path("."),
        model_id="phantom",
    )
