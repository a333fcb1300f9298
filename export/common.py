"""Checks and values shared by the SEG and RTSTRUCT writers."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from nnunet_node.core import charset
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
    out: list[Dataset] = []
    for ds in sources:
        new = Dataset({tag: ds[tag] for tag in ds.keys()})  # noqa: SIM118 (iter gives elements)
        if hasattr(ds, "file_meta"):
            new.file_meta = ds.file_meta
        for keyword in missing:
            if keyword not in new:
                setattr(new, keyword, "")
        out.append(new)
    return out


def checked_label_map(
    label_map: np.ndarray, sources: Sequence[Dataset], what: str
) -> tuple[np.ndarray, list[int]]:
    """``label_map`` (z, y, x; integers, or booleans taken as label 1) checked against its
    ``sources`` (:func:`check_sources`) and the label values present in it, ascending, 0 left out.

    :raises ExportError: the array and the sources disagree, or the map holds non-integer or
        negative values.
    """
    label_map = np.asarray(label_map)
    if label_map.dtype == np.bool_:
        label_map = label_map.astype(np.uint8)
    check_sources(label_map.shape, sources, what)
    return label_map, labels_present(label_map)


def labels_present(label_map: np.ndarray) -> list[int]:
    """The label values in ``label_map``, ascending, 0 (background) left out.

    :raises ExportError: the map holds non-integer or negative values.
    """
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


_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
"""The VRs whose values the Specific Character Set governs (PS3.5 6.1.2.3)."""
_SINGLE_VALUED_VRS = frozenset({"ST", "LT", "UT"})
_KEPT_AS_IS = frozenset({(), ("ISO_IR 6",), ("ISO_IR 100",), (charset.UTF8,)})
"""Sets whose decodable values are copied without re-encoding (highdicom accepts them)."""


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:  # private or unknown: not text we can judge
        return "UN"


def _raw_text_elements(ds: Dataset) -> list[tuple[int, str, bytes]]:
    out: list[tuple[int, str, bytes]] = []
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset gives elements)
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement) or not isinstance(elem.value, bytes):
            continue
        vr = elem.VR or _dictionary_vr(int(tag))
        if vr in _TEXT_VRS and (not elem.value.isascii() or b"\x1b" in elem.value):
            out.append((int(tag), vr, elem.value))
    return out


def _recode(ds: Dataset, declared: object, warnings: list[str]) -> tuple[Dataset, bool]:
    """A new dataset over ``ds``'s elements with every text value decoded from ``declared``
    (:func:`core.charset.decode`), items of sequences too; (dataset, any non-ASCII text)."""
    declared = ds.get("SpecificCharacterSet") or declared
    new = Dataset()
    non_ascii = False
    raw_text = {tag: (vr, raw) for tag, vr, raw in _raw_text_elements(ds)}
    for tag in ds.keys():  # noqa: SIM118
        if int(tag) == 0x00080005:
            continue
        if int(tag) in raw_text:
            vr, raw = raw_text[int(tag)]
            decoded = charset.decode(raw, declared, vr=vr)
            if decoded.warning:
                warnings.append(f"({int(tag) >> 16:04X},{int(tag) & 0xFFFF:04X}) {decoded.warning}")
            text = decoded.text
            value: object = text
            if vr not in _SINGLE_VALUED_VRS and "\\" in text:
                value = text.split("\\")
            new.add(DataElement(tag, vr, value))
            non_ascii = non_ascii or not text.isascii()
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            items = []
            for item in elem.value:
                recoded, item_non_ascii = _recode(item, declared, warnings)
                items.append(recoded)
                non_ascii = non_ascii or item_non_ascii
            new.add(DataElement(tag, "SQ", DicomSequence(items)))
        else:
            new.add(elem)
    return new, non_ascii


def text_as_utf8(sources: Sequence[Dataset]) -> tuple[list[Dataset], list[str]]:
    """The sources with their text in a form highdicom and dciodvfy accept (PS3.5 6.1).

    Sources in the default repertoire, ISO 8859-1 or UTF-8 whose values decode are returned as
    they are. Others (ISO 2022 code extensions such as ``\\ISO 2022 IR 87``, GB18030, an
    unknown or wrongly declared term) are replaced by new datasets with every text value decoded
    (:func:`core.charset.decode`, with its fallback) and Specific Character Set ``ISO_IR 192``
    (absent when every value is ASCII). Returns (datasets, warnings about the fallback); never
    raises for a character set, so no job fails after inference for one."""
    out: list[Dataset] = []
    warnings: list[str] = []
    for ds in sources:
        terms = tuple(charset.terms_of(ds.get("SpecificCharacterSet")))
        raw = _raw_text_elements(ds)
        if terms in _KEPT_AS_IS and all(
            charset.decode(value, terms, vr=vr).warning is None for _, vr, value in raw
        ):
            out.append(ds)
            continue
        new, non_ascii = _recode(ds, list(terms), warnings)
        if hasattr(ds, "file_meta"):
            new.file_meta = ds.file_meta
        if non_ascii:
            new.SpecificCharacterSet = charset.UTF8
        out.append(new)
    return out, sorted(set(warnings))
