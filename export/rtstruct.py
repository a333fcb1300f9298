"""RT Structure Set objects (PS3.3 A.19) built with pydicom: highdicom has none, and rt-utils gets
the geometry of non-square pixels wrong (``docs/facts.md``, "DICOM outputs").

Contours are traced per image plane with ``skimage.measure.find_contours`` at level 0.5 on the
slice's binary mask, padded by one pixel so every contour closes. Each traced boundary (the outline
of an island, or of a hole in one) becomes its own CLOSED_PLANAR contour (PS3.3 C.8.8.6.1).
Convention for holes: a pixel belongs to the ROI when an odd number of the contours on its plane
enclose it (the even-odd rule, which most planning systems apply to nested contours; SlicerRT and
plastimatch read them this way). Points are mapped to patient coordinates with the source slice's
Image Plane attributes (PS3.3 C.7.6.2.1.1):

    P = ImagePositionPatient + column * PixelSpacing[1] * row_direction
                             + row * PixelSpacing[0] * column_direction

where ``row_direction`` and ``column_direction`` are the two halves of ImageOrientationPatient
(PixelSpacing is row spacing, then column spacing). Points therefore lie in the slice's plane, and
for axial series their z equals the slice's ImagePositionPatient z exactly.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds
from skimage import measure

from nnunet_node.core.errors import ExportError
from nnunet_node.export.common import (
    TYPE2_PATIENT_STUDY,
    checked_label_map,
    now_or,
    software_version,
    text_as_utf8,
)
from nnunet_node.export.metadata import ANATOMICAL_STRUCTURE, Concept, SegmentationMetadata

LOGGER = logging.getLogger(__name__)

#: scikit-image's ``find_contours(image, level)`` (unannotated there): the iso-lines of a 2-D
#: array at ``level``, each an (n, 2) array of (row, column) points, closed ones repeating their
#: first point last.
_find_contours = cast(Callable[[np.ndarray, float], list[np.ndarray]], measure.find_contours)

CONTOUR_DATA = Tag(0x3006, 0x0050)

#: PS3.3 C.8.8.5: the "Detached Study Management" class is what RT Referenced Study items name.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


def make_rtstruct(
    label_map: np.ndarray,
    source_datasets: Sequence[Dataset],
    metadata: SegmentationMetadata,
    *,
    series_number: int | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: dt.datetime | None = None,
) -> Dataset | None:
    """An RT Structure Set (PS3.3 A.19) with one ROI per label value present in ``label_map``.

    ``label_map``: integer or boolean array (z, y, x), one slice per item of ``source_datasets``
    (same z order). ROI Number = label value; each slice's mask is traced into CLOSED_PLANAR
    contours on that image's plane (ContourData in mm, patient coordinates, PS3.3 C.8.8.6), each
    referencing its image (ContourImageSequence). None when the map is empty. Raises
    :class:`ExportError` when the array and the sources disagree or a source's geometry
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) is unusable."""
    what = f"model {metadata.model_id!r} RTSTRUCT"
    label_map, labels = checked_label_map(label_map, source_datasets, what)
    if not labels:
        LOGGER.info("model %s: empty label map, no RTSTRUCT written", metadata.model_id)
        return None
    infos = [metadata.segment(v) for v in labels]
    slices = slices_by_label(label_map)
    planes = [_plane(ds, index, what) for index, ds in enumerate(source_datasets)]
    when = now_or(content_datetime)
    source_datasets, _ = text_as_utf8(source_datasets)  # a no-op where the caller did it already
    first = source_datasets[0]
    frame_uid = str(first.FrameOfReferenceUID)

    ds = Dataset()
    sop_uid = sop_instance_uid or generate_uid()
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    # Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): same patient, same study.
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
        elif keyword in TYPE2_PATIENT_STUDY:
            setattr(ds, keyword, "")
    # RT Series module (C.8.8.1): a new series in the source's study.
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = series_number if series_number is not None else metadata.series_number + 2
    ds.SeriesDescription = metadata.series_description
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    ds.OperatorsName = ""
    if metadata.body_part_examined:
        ds.BodyPartExamined = metadata.body_part_examined
    # Frame of Reference (C.7.4.1) and General Equipment (C.7.5.1) modules.
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Manufacturer = metadata.manufacturer
    ds.ManufacturerModelName = metadata.manufacturer_model_name
    ds.SoftwareVersions = software_version()
    # Structure Set module (C.8.8.5).
    ds.StructureSetLabel = metadata.algorithm_name[:16]
    ds.StructureSetName = metadata.series_description
    ds.StructureSetDescription = (
        f"{metadata.algorithm_name} {metadata.algorithm_version}; holes by the even-odd rule"
    )[:1024]
    ds.InstanceNumber = 1
    ds.StructureSetDate = when.strftime("%Y%m%d")
    ds.StructureSetTime = when.strftime("%H%M%S")
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(source_datasets)])

    rois, roi_contours, observations = [], [], []
    for value, info in zip(labels, infos, strict=True):
        contours = _contours_for_label(label_map, value, slices[value], planes, source_datasets)
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = info.label
        if info.description:
            roi.ROIDescription = info.description
        roi.ROIGenerationAlgorithm = info.algorithm_type
        roi.ROIGenerationDescription = f"{metadata.algorithm_name} {metadata.algorithm_version}"[
            :64
        ]
        rois.append(roi)

        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(info.rgb)
        roi_contour.ReferencedROINumber = value
        roi_contour.ContourSequence = DicomSequence(contours)
        roi_contours.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = value
        observation.ReferencedROINumber = value
        observation.ROIObservationLabel = info.label[:64]
        observation.RTROIIdentificationCodeSequence = DicomSequence([_code_item(info.type)])
        # PS3.3 C.8.8.8: ORGAN for anatomy; other kinds have no fitting defined term here.
        observation.RTROIInterpretedType = "ORGAN" if info.category == ANATOMICAL_STRUCTURE else ""
        observation.ROIInterpreter = ""
        observations.append(observation)
        LOGGER.debug("ROI %d (%s): %d contours", value, info.label, len(contours))
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)

    ds.file_meta = _file_meta(sop_uid)
    return ds


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _code_item(concept: Concept) -> Dataset:
    item = Dataset()
    item.CodeValue = concept.value
    item.CodingSchemeDesignator = concept.scheme
    item.CodeMeaning = concept.meaning
    return item


def _image_ref(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _referenced_frame(sources: Sequence[Dataset]) -> Dataset:
    """Referenced Frame of Reference > RT Referenced Study > RT Referenced Series > Contour Image
    (PS3.3 C.8.8.5): every image of the source series."""
    first = sources[0]
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence([_image_ref(ds) for ds in sources])
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _plane(ds: Dataset, index: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, column step, row step): patient-space position of pixel (0, 0) and the vectors
    from one column and from one row to the next (PS3.3 C.7.6.2.1.1)."""
    try:
        origin = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{what}: source image {index} has unusable geometry: {exc}") from None
    if origin.shape != (3,) or orientation.shape != (6,) or row_spacing <= 0 or column_spacing <= 0:
        raise ExportError(f"{what}: source image {index} has unusable geometry")
    row_direction, column_direction = orientation[:3], orientation[3:]
    return origin, row_direction * column_spacing, column_direction * row_spacing


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove points that lie on the straight line between their neighbours (exact: traced
    points sit on a half-pixel grid)."""
    if len(points) <= 4:
        return points
    prev = np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0)
    cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - points[:, 1]) - (
        points[:, 1] - prev[:, 1]
    ) * (nxt[:, 0] - points[:, 0])
    kept = points[np.abs(cross) > 1e-9]
    return kept if len(kept) >= 3 else points


def trace_slice(mask: np.ndarray) -> list[np.ndarray]:
    """Closed boundaries of a 2-D binary mask as (row, column) pixel coordinates, last point not
    repeating the first. Outlines of islands and of holes alike (even-odd rule)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    out = []
    for contour in _find_contours(padded, 0.5):
        if len(contour) < 4 or not np.allclose(contour[0], contour[-1]):
            continue  # cannot happen with the padding; guard anyway
        points = _drop_collinear(contour[:-1] - 1.0)
        if len(points) >= 3:
            out.append(points)
    return out


def slices_by_label(label_map: np.ndarray) -> dict[int, list[int]]:
    """For each label value, the slices that hold it (one counting pass per slice)."""
    out: dict[int, list[int]] = {}
    for k in range(label_map.shape[0]):
        counts = np.bincount(label_map[k].ravel())
        for value in np.flatnonzero(counts[1:]) + 1:
            out.setdefault(int(value), []).append(k)
    return out


def _contours_for_label(
    label_map: np.ndarray,
    value: int,
    slices: list[int],
    planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    sources: Sequence[Dataset],
) -> list[Dataset]:
    items: list[Dataset] = []
    number = 0
    for k in slices:
        mask = label_map[k] == value
        # Trace inside the bounding box only: large images, small structures.
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        r0, c0 = int(rows[0]), int(cols[0])
        box = mask[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1]
        origin, column_step, row_step = planes[k]
        for points in trace_slice(box):
            r = points[:, 0:1] + r0
            c = points[:, 1:2] + c0
            patient = origin + c * column_step + r * row_step
            number += 1
            item = Dataset()
            item.ContourImageSequence = DicomSequence([_image_ref(sources[k])])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(patient)
            item.ContourNumber = number
            item[CONTOUR_DATA] = _contour_data(patient)
            items.append(item)
    return items


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2): the shortest text that reads back as
    the same float when it fits (so an axial contour's z is the slice's z exactly), else rounded."""
    text = repr(float(value))
    if len(text) <= 16 and "n" not in text:  # not nan/inf
        return text
    text = f"{value:.10g}"  # at most 16 characters for any coordinate (|v| < 1e100)
    return text if len(text) <= 16 else format_number_as_ds(float(value))


def _contour_data(points: np.ndarray) -> RawDataElement:
    """ContourData (3006,0050) as an already-encoded element: pydicom would otherwise build and
    validate one DSfloat per value, which costs more than everything else here together. Written
    as is in Explicit VR Little Endian (the file's transfer syntax)."""
    data = "\\".join(_ds(v) for v in points.ravel()).encode("ascii")
    if len(data) % 2:
        data += b" "  # even length (PS3.5 7.1.1), DS padded with a space
    return RawDataElement(CONTOUR_DATA, "DS", len(data), data, 0, False, True)
