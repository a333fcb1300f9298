"""Checks and values shared by the SEG and RTSTRUCT writers."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from core.errors import ExportError


def software_version() -> str:
    """Our version, for SoftwareVersions of the General Equipment module (PS3.3 C.7.5.1)."""
    try:
        return f"nnunet-node {importlib.metadata.version('nnunet-node')}"
    except importlib.metadata.PackageNotFoundError:
        return "nnunet-node"


def check_sources(shape: tuple[int, ...], sources: Sequence[Dataset], what: str) -> None:
    """The (z, y, x) array must match the source series: one single-frame image per z, same size,
    one series and one frame of reference (the objects reference it, PS3.3 C.7.4.1)."""
    if len(shape) != 3:
        raise ExportError(f"{what}: expected a (z, y, x) array, got shape {shape}")
    if len(sources) == 0:
        raise ExportError(f"{what}: no source images")
    if len(sources) != shape[0]:
        raise ExportError(
            f"{what}: the array has {shape[0]} slices but {len(sources)} source images were given"
        )
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in sources}
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in sources}
    if len(series) != 1 or "" in series:
        raise ExportError(f"{what}: the source images must come from one series")
    if len(frames) != 1 or "" in frames:
        raise ExportError(f"{what}: the source images must share one FrameOfReferenceUID")
    for index, ds in enumerate(sources):
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ExportError(
                f"{what}: source image {index} is multi-frame; single-frame series only"
            )
        if (int(ds.Rows), int(ds.Columns)) != (shape[1], shape[2]):
            raise ExportError(
                f"{what}: source image {index} is {ds.Rows}x{ds.Columns}, "
                f"the array's slices are {shape[1]}x{shape[2]}"
            )
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise ExportError(f"{what}: source image {index} lacks {keyword}")


def labels_present(label_map: np.ndarray) -> list[int]:
    if not np.issubdtype(label_map.dtype, np.integer) and label_map.dtype != np.bool_:
        raise ExportError(f"label map must hold integers, got {label_map.dtype}")
    values = np.unique(label_map)
    if values.size and values[0] < 0:
        raise ExportError("label map holds negative values")
    return [int(v) for v in values if v != 0]


def stable_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (same parts, same UID), under the 2.25 root (PS3.5 B.2)."""
    return str(generate_uid(prefix=None, entropy_srcs=list(parts)))


def now_or(value: dt.datetime | None) -> dt.datetime:
    return value if value is not None else dt.datetime.now()
