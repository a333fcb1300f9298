"""Checks and values shared by the SEG and RTSTRUCT writers."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from nnunet_node.core.errors import ExportError


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


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
# highdicom copies from the first source image and that some senders leave out entirely.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def with_type2_defaults(sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources, with absent type 2 patient/study attributes present and empty (PS3.5 7.4.5).

    Images that lack one are replaced by new datasets over the same elements, so the caller's
    datasets are never modified (pydicom's copy.copy would share their element dictionary)."""
    missing = [k for k in TYPE2_PATIENT_STUDY if any(k not in ds for ds in sources)]
    if not missing:
        return list(sources)
    out = []
    for ds in sources:
        new = Dataset({tag: ds[tag] for tag in ds.keys()})  # noqa: SIM118 (iter gives elements)
        if hasattr(ds, "file_meta"):
            new.file_meta = ds.file_meta
        for keyword in missing:
            if keyword not in new:
                setattr(new, keyword, "")
        out.append(new)
    return out


def labels_present(label_map: np.ndarray) -> list[int]:
    if not np.issubdtype(label_map.dtype, np.integer) and label_map.dtype != np.bool_:
        raise ExportError(f"label map must hold integers, got {label_map.dtype}")
    if label_map.size == 0:
        return []
    low, high = int(label_map.min()), int(label_map.max())
    if low < 0:
        raise ExportError("label map holds negative values")
    if high < 2**16:  # counting is much faster than sorting for label maps
        return [int(v) for v in np.flatnonzero(np.bincount(label_map.ravel(), minlength=1)[1:]) + 1]
    return [int(v) for v in np.unique(label_map) if v != 0]


def stable_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (same parts, same UID), under the 2.25 root (PS3.5 B.2)."""
    return str(generate_uid(prefix=None, entropy_srcs=list(parts)))


def now_or(value: dt.datetime | None) -> dt.datetime:
    return value if value is not None else dt.datetime.now()
