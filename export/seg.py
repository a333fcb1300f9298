"""DICOM Segmentation objects (PS3.3 A.51) with highdicom: binary label maps and fractional
(probability) maps, in the geometry of the stage's own source series.

highdicom fills what viewers need to place the segments: ReferencedSeriesSequence, a per-frame
DerivationImageSequence/SourceImageSequence, FrameOfReferenceUID and a per-frame
ReferencedSegmentNumber. Segment numbers are consecutive from 1 (PS3.3 C.8.20.2: "shall start at 1
and increase by 1"), so they are the present label values in ascending order, not the label values
themselves; the segment's label, codes and tracking ID say which label it is.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from nnunet_node.core.errors import ExportError
from nnunet_node.export.common import (
    check_sources,
    checked_label_map,
    now_or,
    software_version,
    stable_uid,
    text_as_utf8,
    with_type2_defaults,
)
from nnunet_node.export.metadata import SegmentationMetadata, SegmentInfo

LOGGER = logging.getLogger(__name__)

#: PS3.3 C.8.20.2.3: MaximumFractionalValue of a FRACTIONAL SEG with 8-bit pixels.
MAX_FRACTIONAL_VALUE = 255


def make_binary_seg(
    label_map: np.ndarray,
    source_datasets: Sequence[Dataset],
    metadata: SegmentationMetadata,
    *,
    series_number: int | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: dt.datetime | None = None,
) -> Dataset | None:
    """A BINARY Segmentation (PS3.3 A.51, C.8.20) with one segment per label value present.

    ``label_map``: integer or boolean array (z, y, x), one slice per item of ``source_datasets``
    (single-frame images of one series and frame of reference, in the same z order); segment
    number = label value, described by ``metadata``. ``series_number``, the UIDs and
    ``content_datetime`` default to new ones (the job passes values derived from its id).
    Returns None when the map is empty: no object is written then. Raises :class:`ExportError`
    when the array and the sources disagree, or a label has no segment in ``metadata``."""
    what = f"model {metadata.model_id!r} SEG"
    label_map, labels = checked_label_map(label_map, source_datasets, what)
    if not labels:
        LOGGER.info("model %s: empty label map, no SEG written", metadata.model_id)
        return None
    infos = [metadata.segment(v) for v in labels]
    # Remap label values to consecutive segment numbers; a label map keeps memory at one byte/voxel.
    lut = np.zeros(max(labels) + 1, dtype=np.uint16 if len(labels) > 255 else np.uint8)
    lut[labels] = np.arange(1, len(labels) + 1)
    segment_map = lut[label_map]
    return _segmentation(
        segment_map,
        hd.seg.SegmentationTypeValues.BINARY,
        infos,
        source_datasets,
        metadata,
        series_number=series_number if series_number is not None else metadata.series_number,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        content_datetime=content_datetime,
    )


def make_fractional_seg(
    probabilities: np.ndarray,
    labels: Sequence[int],
    source_datasets: Sequence[Dataset],
    metadata: SegmentationMetadata,
    *,
    series_number: int | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: dt.datetime | None = None,
) -> Dataset | None:
    """A FRACTIONAL SEG of type PROBABILITY (PS3.3 C.8.20.2.3), MaximumFractionalValue 255.

    ``probabilities`` is (labels, z, y, x) with values in 0..1, one channel per foreground label in
    ``labels``, slices in the z order of ``source_datasets``. Stored values are round(p * 255), so
    read-back is within 1/510 of the input. Labels whose map rounds to zero everywhere get no
    segment; None when none is left. Raises :class:`ExportError` for a shape that does not match
    the sources, repeated or background labels, or values outside 0..1 (NaN included).
    """
    probabilities = np.asarray(probabilities)
    what = f"model {metadata.model_id!r} fractional SEG"
    if probabilities.ndim != 4:
        raise ExportError(
            f"{what}: expected (labels, z, y, x) probabilities, got {probabilities.shape}"
        )
    if len(labels) != probabilities.shape[0]:
        hint = (
            " (leave out the background channel)" if len(labels) + 1 == len(probabilities) else ""
        )
        raise ExportError(
            f"{what}: {probabilities.shape[0]} probability channels but {len(labels)} labels{hint}"
        )
    if len(set(labels)) != len(labels) or any(int(v) <= 0 for v in labels):
        raise ExportError(f"{what}: labels must be distinct foreground values, got {list(labels)}")
    check_sources(probabilities.shape[1:], source_datasets, what)
    if not np.issubdtype(probabilities.dtype, np.floating):
        raise ExportError(
            f"{what}: probabilities must be floating point, got {probabilities.dtype}"
        )
    if not np.all(np.isfinite(probabilities)):
        raise ExportError(f"{what}: probabilities hold NaN or infinite values")
    low, high = float(probabilities.min()), float(probabilities.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ExportError(f"{what}: probabilities must lie in 0..1, found {low:.4g}..{high:.4g}")

    threshold = 0.5 / MAX_FRACTIONAL_VALUE
    keep = [i for i in range(len(labels)) if float(probabilities[i].max()) >= threshold]
    if not keep:
        LOGGER.info(
            "model %s: empty probability maps, no fractional SEG written", metadata.model_id
        )
        return None
    infos = [metadata.segment(int(labels[i])) for i in keep]
    stack = np.clip(np.moveaxis(probabilities[keep], 0, -1), 0.0, 1.0).astype(np.float32)
    return _segmentation(
        stack,
        hd.seg.SegmentationTypeValues.FRACTIONAL,
        infos,
        source_datasets,
        metadata,
        series_number=series_number if series_number is not None else metadata.series_number + 1,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        content_datetime=content_datetime,
        description_suffix="probability",
    )


def _segment_description(
    number: int, info: SegmentInfo, metadata: SegmentationMetadata, source_series_uid: str
) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=info.algorithm_name or metadata.algorithm_name,
        version=metadata.algorithm_version,
        family=Code(
            metadata.algorithm_family.value,
            metadata.algorithm_family.scheme,
            metadata.algorithm_family.meaning,
        ),
    )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=info.label,
        segmented_property_category=info.category.to_coded(),
        segmented_property_type=info.type.to_coded(),
        algorithm_type=info.algorithm_type,
        algorithm_identification=(algorithm if info.algorithm_type != "MANUAL" else None),
        # Same source series and label, same tracking UID: re-runs track the same finding.
        tracking_uid=stable_uid(source_series_uid, metadata.model_id, str(info.label_value)),
        tracking_id=info.tracking_id,
        anatomic_regions=[info.anatomic_region.to_coded()] if info.anatomic_region else None,
        display_color=info.cielab,
    )
    # No constructor argument for these two (docs/facts.md, "DICOM outputs"): PS3.3 C.8.20.2 and
    # C.8.20.4.
    if info.type_modifier is not None:
        # nested in the type item (PS3.3 C.8.20.2, Segment Description Macro)
        description.SegmentedPropertyTypeCodeSequence[
            0
        ].SegmentedPropertyTypeModifierCodeSequence = [info.type_modifier.to_coded()]
    if info.description:
        description.SegmentDescription = info.description
    return description


def _segmentation(
    pixel_array: np.ndarray,
    segmentation_type: hd.seg.SegmentationTypeValues,
    infos: list[SegmentInfo],
    sources: Sequence[Dataset],
    metadata: SegmentationMetadata,
    *,
    series_number: int,
    series_instance_uid: str | None,
    sop_instance_uid: str | None,
    content_datetime: dt.datetime | None,
    description_suffix: str | None = None,
) -> Dataset:
    when = now_or(content_datetime)
    sources, _ = text_as_utf8(sources)  # a no-op where the caller did it already
    source_series_uid = str(sources[0].SeriesInstanceUID)
    descriptions = [
        _segment_description(i + 1, info, metadata, source_series_uid)
        for i, info in enumerate(infos)
    ]
    series_description = metadata.series_description
    if description_suffix:
        series_description = f"{series_description} ({description_suffix})"[:64]
    try:
        seg = hd.seg.Segmentation(
            source_images=with_type2_defaults(sources),
            pixel_array=pixel_array,
            segmentation_type=segmentation_type,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid or generate_uid(),
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=1,
            manufacturer=metadata.manufacturer,
            manufacturer_model_name=metadata.manufacturer_model_name,
            software_versions=software_version(),
            device_serial_number=metadata.model_id[:64],
            series_description=series_description,
            content_label=metadata.content_label,
            content_description=metadata.content_description,
            content_creator_name=metadata.content_creator_name,
            content_date=when.date(),
            content_time=when.time().replace(microsecond=0),
            series_date=when.date(),
            series_time=when.time().replace(microsecond=0),
            # Used only by FRACTIONAL objects (PS3.3 C.8.20.2.3).
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=MAX_FRACTIONAL_VALUE,
        )
    except (ValueError, TypeError) as exc:
        raise ExportError(f"model {metadata.model_id!r}: cannot build the SEG: {exc}") from exc
    # highdicom stamps the instance creation with its own clock; use ours so runs are comparable.
    seg.InstanceCreationDate = DA(when.date())
    seg.InstanceCreationTime = TM(when.time().replace(microsecond=0))
    if metadata.body_part_examined:
        seg.BodyPartExamined = metadata.body_part_examined
    return seg
