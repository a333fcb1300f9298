"""One call for a stage's DICOM outputs: SEG, optional RTSTRUCT and fractional SEG, written beside
the stage's NIfTI files under the contract's names (``docs/reference-contract.md``)."""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from nnunet_node.core.errors import ExportError
from nnunet_node.export.common import now_or, text_as_utf8
from nnunet_node.export.files import dicom_output_name, write_dataset
from nnunet_node.export.metadata import SegmentationMetadata
from nnunet_node.export.rtstruct import make_rtstruct
from nnunet_node.export.seg import make_binary_seg, make_fractional_seg

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageDicomOutputs:
    """Paths written (None where nothing was), and why something was skipped."""

    segmentation: Path | None = None
    struct: Path | None = None
    fractional: Path | None = None
    notes: list[str] = field(default_factory=list)


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
) -> StageDicomOutputs:
    """Write ``prediction[_suffix].dcm`` (binary SEG), and when asked ``struct[_suffix].dcm``
    (RTSTRUCT) and ``proba[_suffix].dcm`` (fractional SEG of ``probabilities``, one channel per
    label of ``probability_labels``, background excluded). An empty label map writes neither SEG nor
    RTSTRUCT (``docs/reference-contract.md``, "Response": empty predictions skip DICOM export) and
    says so in notes.
    """
    datasets: list[Dataset] = [s for s in sources if isinstance(s, Dataset)]
    if len(datasets) != len(sources):
        datasets = read_sources([s for s in sources if not isinstance(s, Dataset)])
        if len(datasets) != len(sources):
            raise ExportError("sources must be all datasets or all file paths")
    # Text in a form highdicom accepts (ISO 2022, GB18030, unknown sets: re-encoded as UTF-8).
    datasets, charset_warnings = text_as_utf8(datasets)
    when = now_or(content_datetime)  # one time for the stage's objects
    notes: list[str] = [f"source character set: {w}" for w in charset_warnings]
    seg_path = struct_path = fractional_path = None

    seg = make_binary_seg(label_map, datasets, metadata, content_datetime=when)
    if seg is None:
        notes.append(f"model {metadata.model_id}: empty label map, no DICOM SEG written")
    else:
        seg_path = write_dataset(seg, folder / dicom_output_name("seg", suffix))
    if rtstruct:
        struct = make_rtstruct(label_map, datasets, metadata, content_datetime=when)
        if struct is None:
            notes.append(f"model {metadata.model_id}: empty label map, no RTSTRUCT written")
        else:
            struct_path = write_dataset(struct, folder / dicom_output_name("rtstruct", suffix))
    if probabilities is not None:
        if probability_labels is None:
            raise ExportError("probability_labels are needed with probabilities")
        fractional = make_fractional_seg(
            probabilities, probability_labels, datasets, metadata, content_datetime=when
        )
        if fractional is None:
            notes.append(f"model {metadata.model_id}: empty probability maps, no fractional SEG")
        else:
            fractional_path = write_dataset(
                fractional, folder / dicom_output_name("fractional", suffix)
            )
    for note in notes:
        LOGGER.info(note)
    return StageDicomOutputs(seg_path, struct_path, fractional_path, notes)
