"""Segment descriptions for a model's DICOM outputs, from the model's ``metadata`` entry.

``core.spec`` validates the entry (:class:`~nnunet_node.core.spec.MetadataEntry`; the two forms
of ``docs/reference-contract.md``, "Spec file"):

* ``{path: <dcmqi JSON template>}`` (relative to the spec's folder), optionally beside inline
  keys that override the template's series-level values;
* the inline form: ``algorithm_name``, ``algorithm_version``, ``manufacturer``,
  ``series_description``, ``body_part_examined``, ``segment_names`` (each a SNOMED CT concept
  name such as ``"Liver"`` or ``"Right Kidney"``, or a mapping with ``name``, ``label``,
  ``code``, ``scheme``, ``number``, ``tracking_id``, ``category``, ...).

This module does what needs DICOM knowledge, at spec load time, so a bad spec fails start-up with
a message naming the model and the segment instead of failing the first DICOM job: it reads the
dcmqi template (:class:`~nnunet_node.core.spec.DcmqiTemplate`), looks SNOMED CT names and code
meanings up in pydicom's dictionary, picks a category for a type given without one, and fills
the defaults. Display colours are deterministic: the template's ``recommendedDisplayRGBValue``,
else a fixed palette indexed by label value.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import highdicom as hd
from pydantic import ValidationError
from pydicom.sr._concepts_dict import concepts as _SR_CONCEPTS
from pydicom.sr.codedict import codes

from nnunet_node.core.errors import ConfigError, ExportError
from nnunet_node.core.spec import (
    ConceptEntry,
    DcmqiCode,
    DcmqiTemplate,
    MetadataEntry,
    SegmentEntry,
    config_error,
    flatten_segment_attributes,
    segment_where,
)

LOGGER = logging.getLogger(__name__)

#: Fixed palette (RGB), indexed by ``(label - 1) % len``: distinct, readable on grey images.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)

_SCT = "SCT"
_SCT_CONCEPTS: Mapping[str, Any] = _SR_CONCEPTS[_SCT]
# Laterality modifies the property type (PS3.16 CID 244 Laterality); it is not part of the concept.
_LATERALITY = {
    "left": ("7771000", "Left"),
    "right": ("24028007", "Right"),
    "bilateral": ("51440002", "Right and left"),
}
_LATERALITY_RE = re.compile(r"(?:^|[\s_\-])((?i:left|right|bilateral))(?=$|[\s_\-A-Z])")


@dataclass(frozen=True)
class Concept:
    """A coded concept (Code Value, Coding Scheme Designator, Code Meaning), PS3.3 8.8."""

    value: str
    scheme: str
    meaning: str

    def to_coded(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(
            value=self.value, scheme_designator=self.scheme, meaning=self.meaning
        )


ANATOMICAL_STRUCTURE = Concept("91723000", _SCT, "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL = Concept("49755003", _SCT, "Morphologically Altered Structure")
TISSUE = Concept("85756007", _SCT, "Tissue")
PHYSICAL_OBJECT = Concept("260787004", _SCT, "Physical object")
ARTIFICIAL_INTELLIGENCE = Concept("123109", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class SegmentInfo:
    """What the outputs say about one label value of the model."""

    label_value: int
    label: str
    category: Concept
    type: Concept
    rgb: tuple[int, int, int]
    tracking_id: str
    algorithm_type: str = "AUTOMATIC"
    algorithm_name: str | None = None
    description: str | None = None
    type_modifier: Concept | None = None
    anatomic_region: Concept | None = None

    @property
    def cielab(self) -> hd.color.CIELabColor:
        return hd.color.CIELabColor.from_rgb(*self.rgb)


@dataclass(frozen=True)
class SegmentationMetadata:
    """Series-level values and per-label segment descriptions of one model's DICOM outputs."""

    model_id: str
    algorithm_name: str
    algorithm_version: str
    manufacturer: str
    manufacturer_model_name: str
    series_description: str
    series_number: int
    segments: Mapping[int, SegmentInfo]
    algorithm_type: str = "AUTOMATIC"
    body_part_examined: str | None = None
    content_label: str = "SEGMENTATION"
    content_description: str | None = None
    content_creator_name: str | None = None
    algorithm_family: Concept = field(default=ARTIFICIAL_INTELLIGENCE)

    def segment(self, label_value: int) -> SegmentInfo:
        """The description of ``label_value``; :class:`ExportError` when the metadata lacks it."""
        try:
            return self.segments[int(label_value)]
        except KeyError:
            raise ExportError(
                f"model {self.model_id!r}: label {int(label_value)} has no segment in the metadata "
                f"(described labels: {sorted(self.segments)})"
            ) from None


def parse_metadata(
    raw: MetadataEntry | Mapping[str, Any] | str | None,
    *,
    base_dir: Path,
    model_id: str,
    labels: Iterable[int] | None = None,
) -> SegmentationMetadata:
    """The segment descriptions of a model's ``metadata`` entry.

    ``raw`` is the validated entry, or the entry as the file gives it (a dcmqi template path or
    the inline form). ``base_dir`` is the spec file's folder (a template path is relative to it).
    ``labels`` (the model's label values, background included or not) are checked to all have a
    segment. Raises :class:`ConfigError` naming the model and the segment at fault.
    """
    where = f"model {model_id!r} metadata"
    if raw is None:
        raise ConfigError(f"{where}: missing (DICOM outputs need segment descriptions)")
    if isinstance(raw, MetadataEntry):
        entry = raw
    else:
        try:
            entry = MetadataEntry.model_validate(raw)
        except ValidationError as exc:
            raise config_error(exc, raw, where, schema=MetadataEntry) from None

    values: dict[str, Any] = {}
    if entry.path is not None:
        values, segments = _from_template(entry.path, base_dir, where)
    else:
        assert entry.segment_names is not None  # MetadataEntry requires one or the other
        segments = _from_inline(entry.segment_names, where)
    overrides = entry.model_dump(exclude={"path", "segment_names"}, exclude_none=True)
    values.update(overrides)

    meta = _build(values, segments, model_id, where)
    if labels is not None:
        wanted = sorted({int(v) for v in labels if int(v) != 0})
        missing = [v for v in wanted if v not in meta.segments]
        if missing:
            raise ConfigError(
                f"{where}: label(s) {missing} of the model have no segment "
                f"(described labels: {sorted(meta.segments)})"
            )
        extra = sorted(set(meta.segments) - set(wanted))
        if extra:
            LOGGER.warning("%s: segments for labels %s the model does not have", where, extra)
    return meta


def _build(
    values: dict[str, Any], segments: dict[int, SegmentInfo], model_id: str, where: str
) -> SegmentationMetadata:
    """Series-level values (validated by ``core.spec``) with this node's defaults."""
    if not segments:
        raise ConfigError(f"{where}: no segments described")
    algorithm_name = values.get("algorithm_name", model_id)
    return SegmentationMetadata(
        model_id=model_id,
        algorithm_name=algorithm_name,
        algorithm_version=values.get("algorithm_version", "1.0"),
        manufacturer=values.get("manufacturer", "nnunet-node"),
        manufacturer_model_name=values.get("manufacturer_model_name", algorithm_name),
        series_description=values.get("series_description", f"{algorithm_name} segmentation"[:64]),
        series_number=values.get("series_number", 900),
        segments=dict(sorted(segments.items())),
        algorithm_type=values.get("algorithm_type", "AUTOMATIC"),
        body_part_examined=values.get("body_part_examined"),
        content_label=values.get("content_label", "SEGMENTATION"),
        content_description=values.get("content_description"),
        content_creator_name=values.get("content_creator_name"),
    )


# --- the inline form --------------------------------------------------------------------------


def _camel(words: str) -> str:
    """``"upper lobe of lung"`` or ``"UpperLobeOfLung"`` -> ``"UpperLobeOfLung"`` (a keyword)."""
    parts = [p for p in re.split(r"[\s_\-]+", words.strip()) if p]
    return "".join(p[0].upper() + p[1:] for p in parts)


def _split_laterality(name: str) -> tuple[str, Concept | None]:
    match = _LATERALITY_RE.search(name)
    if not match:
        return name, None
    code, meaning = _LATERALITY[match.group(1).lower()]
    rest = (name[: match.start(1)] + " " + name[match.end(1) :]).strip(" _-")
    return rest, Concept(code, _SCT, meaning)


def _lookup_sct(name: str, what: str, where: str) -> Concept:
    """Find a SNOMED CT concept by name through pydicom's keyword dictionary (codes.SCT)."""
    keyword = _camel(name)
    try:
        code = getattr(codes.SCT, keyword)
    except AttributeError:
        close = difflib.get_close_matches(keyword, list(_SCT_CONCEPTS), n=5, cutoff=0.75)
        hint = f"; close matches: {close}" if close else ""
        raise ConfigError(
            f"{where}: {what}: {name!r} is not a SNOMED CT concept name known to pydicom "
            f"(keyword {keyword!r}){hint}; give 'code' and 'scheme' explicitly"
        ) from None
    return Concept(str(code.value), _SCT, str(code.meaning))


def _sct_meaning(value: str) -> str | None:
    for entries in _SCT_CONCEPTS.values():
        if value in entries:
            return str(entries[value][0])
    return None


def _default_category(type_: Concept) -> Concept:
    """Category for a type given without one, from the PS3.16 context groups that list the type:
    CID 7159/7194 (lesions, abnormal structures) -> Morphologically Altered Structure; CID
    7166/7191 (tissues) -> Tissue; other SNOMED CT concepts -> Anatomical Structure; other schemes
    -> Physical object."""
    if type_.scheme != _SCT:
        return PHYSICAL_OBJECT
    from pydicom.sr._cid_dict import cid_concepts

    def listed(cid: int) -> bool:
        for keyword in cid_concepts.get(cid, {}).get(_SCT, []):
            if type_.value in _SCT_CONCEPTS.get(keyword, {}):
                return True
        return False

    if listed(7159) or listed(7194):
        return MORPHOLOGICALLY_ABNORMAL
    if type_.value == TISSUE.value or listed(7166) or listed(7191):
        return TISSUE
    return ANATOMICAL_STRUCTURE


def _concept(entry: ConceptEntry, what: str, where: str) -> Concept:
    """A concept given as a SNOMED CT name, an SCT code value, or ``{code, scheme, meaning}``;
    an SCT code's meaning is looked up when it is not given."""
    if entry.lookup is not None:
        return _lookup_sct(entry.lookup, what, where)
    assert entry.code is not None  # ConceptEntry requires a code or a name to look up
    scheme = entry.scheme or _SCT
    meaning = entry.meaning
    if meaning is None and scheme == _SCT:
        meaning = _sct_meaning(entry.code)
        if meaning is None:
            raise ConfigError(
                f"{where}: {what} needs a 'meaning' for code {entry.code!r} (a SNOMED CT code "
                "pydicom does not know)"
            )
    if meaning is None:
        raise ConfigError(f"{where}: {what} needs a 'meaning' for code {entry.code!r}")
    return Concept(entry.code, scheme, meaning)


def _palette(label_value: int) -> tuple[int, int, int]:
    return PALETTE[(label_value - 1) % len(PALETTE)]


def _from_inline(entries: list[SegmentEntry], where: str) -> dict[int, SegmentInfo]:
    segments: dict[int, SegmentInfo] = {}
    for index, entry in enumerate(entries):
        seg_where = f"{where}, " + segment_where(
            index, {"label": entry.label if entry.label is not None else entry.name}
        )
        info = _inline_segment(entry, index, seg_where)
        if info.label_value in segments:
            raise ConfigError(f"{seg_where}: label number {info.label_value} is described twice")
        segments[info.label_value] = info
    return segments


def _inline_segment(entry: SegmentEntry, index: int, where: str) -> SegmentInfo:
    number = entry.number if entry.number is not None else index + 1
    name = entry.name
    modifier = None
    if entry.code is not None:
        type_ = _concept(
            ConceptEntry(code=entry.code, scheme=entry.scheme, meaning=entry.meaning or name),
            "type",
            where,
        )
        if name is None:
            name = type_.meaning
    else:
        assert name is not None  # SegmentEntry requires a name or a code
        # Try the whole name first: some concepts carry their side ("Upper lobe of left lung").
        code = getattr(codes.SCT, _camel(name), None)
        if code is not None:
            type_ = Concept(str(code.value), _SCT, str(code.meaning))
        else:
            stem, modifier = _split_laterality(name)
            type_ = _lookup_sct(stem, "name", where)
    if entry.type_modifier is not None:
        modifier = _concept(entry.type_modifier, "type_modifier", where)
    label = entry.label or name[:64]
    return SegmentInfo(
        label_value=number,
        label=label,
        category=(
            _concept(entry.category, "category", where)
            if entry.category is not None
            else _default_category(type_)
        ),
        type=type_,
        rgb=entry.color if entry.color is not None else _palette(number),
        tracking_id=entry.tracking_id or label,
        algorithm_type=entry.algorithm_type,
        description=entry.description,
        type_modifier=modifier,
        anatomic_region=(
            _concept(entry.anatomic_region, "anatomic_region", where)
            if entry.anatomic_region is not None
            else None
        ),
    )


# --- the dcmqi template -------------------------------------------------------------------------


def _from_template(
    path: str, base_dir: Path, where: str
) -> tuple[dict[str, Any], dict[int, SegmentInfo]]:
    """Read a dcmqi ``seg`` JSON template (https://qiicr.org/dcmqi/#/seg)."""
    file = Path(path).expanduser()
    if not file.is_absolute():
        file = base_dir / file
    where = f"{where} ({file})"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the template: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the template must be a JSON object")
    raw = {**raw, "segmentAttributes": flatten_segment_attributes(raw.get("segmentAttributes"))}
    try:
        template = DcmqiTemplate.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, raw, where, schema=DcmqiTemplate) from None

    segments: dict[int, SegmentInfo] = {}
    for index, entry in enumerate(template.segmentAttributes):
        seg_where = f"{where}, " + segment_where(index, {"label": entry.SegmentLabel})
        number = entry.labelID
        type_ = _code(entry.SegmentedPropertyTypeCodeSequence)
        label = entry.SegmentLabel or type_.meaning
        if number in segments:
            raise ConfigError(f"{seg_where}: labelID {number} is described twice")
        segments[number] = SegmentInfo(
            label_value=number,
            label=label,
            category=_code(entry.SegmentedPropertyCategoryCodeSequence),
            type=type_,
            rgb=(
                entry.recommendedDisplayRGBValue
                if entry.recommendedDisplayRGBValue is not None
                else _palette(number)
            ),
            tracking_id=entry.TrackingIdentifier or label,
            algorithm_type=entry.SegmentAlgorithmType,
            algorithm_name=entry.SegmentAlgorithmName,
            description=entry.SegmentDescription,
            type_modifier=_code(entry.SegmentedPropertyTypeModifierCodeSequence),
            anatomic_region=_code(entry.AnatomicRegionSequence),
        )

    # The template's series-level values, checked as the inline keys they stand for.
    series = {
        "series_description": template.SeriesDescription,
        "series_number": template.SeriesNumber,
        "body_part_examined": template.BodyPartExamined,
        "content_label": template.ContentLabel,
        "content_description": template.ContentDescription,
        "content_creator_name": template.ContentCreatorName,
    }
    names = [e.SegmentAlgorithmName for e in template.segmentAttributes if e.SegmentAlgorithmName]
    if names:
        series["algorithm_name"] = names[0]
    given = {k: v for k, v in series.items() if v is not None}
    try:
        values = MetadataEntry.model_validate({**given, "segment_names": ["x"]})
    except ValidationError as exc:
        raise config_error(exc, given, where, schema=MetadataEntry) from None
    return values.model_dump(exclude={"segment_names", "path"}, exclude_none=True), segments


@overload
def _code(code: DcmqiCode) -> Concept: ...
@overload
def _code(code: None) -> None: ...
def _code(code: DcmqiCode | None) -> Concept | None:
    if code is None:
        return None
    return Concept(code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)
