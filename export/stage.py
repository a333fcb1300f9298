"""One call for a stage's DICOM outputs: SEG, optional RTSTRUCT and fractional SEG, written beside
the stage's NIfTI files under the contract's names (``docs/reference-contract.md``):
``prediction[_suffix].dcm``, ``struct[_suffix].dcm`` and ``proba[_suffix].dcm``. This is
the only writer of them: the job runner calls it with the UIDs it derives from the job and
a callback that files each object in the archive."""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from nnunet_node.core.errors import ExportError
from nnunet_node.export.common import now_or, text_as_utf8
from nnunet_node.export.files import DicomKind, dicom_output_name, write_dataset
from nnunet_node.export.metadata import SegmentationMetadata
from nnunet_node.export.rtstruct import make_rtstruct
from nnunet_node.export.seg import make_binary_seg, make_fractional_seg

LOGGER = logging.getLogger(__name__)

ObjectUids = Callable[[DicomKind], tuple[str, str]]
"""``uids(kind) -> (SeriesInstanceUID, SOPInstanceUID)`` for ``kind`` ``seg``, ``rtstruct`` or
``fractional``: lets a caller make the UIDs reproducible (a retried job re-files the same
objects)."""

OnWritten = Callable[[Dataset, Path], None]
"""Called with each object right after its file is written (the runner files it in the archive);
an exception stops the stage there."""

_NAMES: dict[DicomKind, str] = {
    "seg": "SEG",
    "rtstruct": "RTSTRUCT",
    "fractional": "fractional SEG",
}


@dataclass(frozen=True)
class WrittenObject:
    """One DICOM object written: ``kind`` is ``seg``, ``rtstruct`` or ``fractional``."""

    kind: DicomKind
    path: Path
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class StageDicomOutputs:
    """Paths written (None where nothing was), every object in the order written, and why
    something was skipped."""

    segmentation: Path | None = None
    struct: Path | None = None
    fractional: Path | None = None
    notes: list[str] = field(default_factory=list)
    objects: list[WrittenObject] = field(default_factory=list)


def read_sources(paths: Sequence[str | os.PathLike[str]]) -> list[Dataset]:
    """The source images' headers (no pixel data: the writers need geometry and identifiers)."""
    out: list[Dataset] = []
    for path in paths:
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ExportError(f"cannot read source image {path}: {exc}") from exc
    return out


def write_stage_dicom(
    folder: Path,
    label_map: np.ndarray,
    sources: Sequence[Dataset] | Sequence[str | os.PathLike[str]],
    metadata: SegmentationMetadata,
    *,
    suffix: str | None = None,
    rtstruct: bool = False,
    probabilities: np.ndarray | None = None,
    probability_labels: Sequence[int] | None = None,
    content_datetime: dt.datetime | None = None,
    uids: ObjectUids | None = None,
    on_written: OnWritten | None = None,
    subject: str | None = None,
) -> StageDicomOutputs:
    """Write ``prediction[_suffix].dcm`` (binary SEG of ``label_map``), and when asked
    ``struct[_suffix].dcm`` (RTSTRUCT) and ``proba[_suffix].dcm`` (fractional SEG of
    ``probabilities``, one channel per label of ``probability_labels``, background excluded).

    ``label_map`` is (slices, rows, columns) and ``probabilities`` (labels, slices, rows,
    columns), both in the geometry of ``sources`` (one single-frame image per slice, headers or
    files). An empty label map writes neither SEG nor RTSTRUCT (empty probability maps no
    fractional SEG; ``docs/reference-contract.md``, "Response") and says so in ``notes``, each
    starting with ``subject`` (default: the model); so do notes on the sources' character set
    (text re-encoded as UTF-8). ``uids`` chooses each object's UIDs (default: new ones);
    ``on_written`` is called with each object after its file is written. All objects of a stage
    share one content time. Raises :class:`ExportError` for unreadable sources or probabilities
    without labels.
    """
    datasets: list[Dataset] = [s for s in sources if isinstance(s, Dataset)]
    if len(datasets) != len(sources):
        datasets = read_sources([s for s in sources if not isinstance(s, Dataset)])
        if len(datasets) != len(sources):
            raise ExportError("sources must be all datasets or all file paths")
    if probabilities is not None and probability_labels is None:
        raise ExportError("probability_labels are needed with probabilities")
    # Text in a form highdicom accepts (ISO 2022, GB18030, unknown sets: re-encoded as UTF-8).
    datasets, charset_warnings = text_as_utf8(datasets)
    when = now_or(content_datetime)  # one time for the stage's objects
    who = subject or f"model {metadata.model_id}"
    notes: list[str] = [f"{who}: source character set: {w}" for w in charset_warnings]
    objects: list[WrittenObject] = []

    def chosen(kind: DicomKind) -> tuple[str | None, str | None]:
        return uids(kind) if uids is not None else (None, None)

    def keep(ds: Dataset | None, kind: DicomKind, empty: str) -> Path | None:
        if ds is None:
            notes.append(f"{who}: empty {empty}, no {_NAMES[kind]} written")
            return None
        path = write_dataset(ds, folder / dicom_output_name(kind, suffix))
        if on_written is not None:
            on_written(ds, path)
        objects.append(WrittenObject(kind, path, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        return path

    series_uid, sop_uid = chosen("seg")
    seg = make_binary_seg(
        label_map,
        datasets,
        metadata,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        content_datetime=when,
    )
    seg_path = keep(seg, "seg", "label map")
    struct_path = None
    if rtstruct:
        series_uid, sop_uid = chosen("rtstruct")
        struct = make_rtstruct(
            label_map,
            datasets,
            metadata,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            content_datetime=when,
        )
        struct_path = keep(struct, "rtstruct", "label map")
    fractional_path = None
    if probabilities is not None:
        assert probability_labels is not None
        series_uid, sop_uid = chosen("fractional")
        fractional = make_fractional_seg(
            probabilities,
            probability_labels,
            datasets,
            metadata,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            content_datetime=when,
        )
        fractional_path = keep(fractional, "fractional", "probability maps")
    for note in notes:
        LOGGER.info(note)
    return StageDicomOutputs(seg_path, struct_path, fractional_path, notes, objects)
