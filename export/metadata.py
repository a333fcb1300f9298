"""Segment descriptions for a model's DICOM outputs, parsed from the model-serve spec.

Two forms are accepted (REFERENCE.md, "Spec file"):

* ``{path: <dcmqi JSON template>}`` (relative to the spec's folder), optionally beside inline
  keys that override the template's series-level values;
* the inline form: ``algorithm_name``, ``algorithm_version``, ``manufacturer``,
  ``series_description``, ``body_part_examined``, ``segment_names`` (each a SNOMED CT concept
  name such as ``"Liver"`` or ``"Right Kidney"``, or a dict with ``name``, ``label``, ``code``,
  ``scheme``, ``number``, ``tracking_id``, ``category``, ...).

Everything is checked here, at spec load time, so a bad spec fails start-up with a message naming
the model and the segment, instead of failing the first DICOM job. Display colours are
deterministic: the template's ``recommendedDisplayRGBValue``, else a fixed palette indexed by
label value.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.sr._concepts_dict import concepts as _SR_CONCEPTS
from pydicom.sr.codedict import codes

from nnunet_node.core.errors import ConfigError, ExportError

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

ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")
_SCT = "SCT"
_SCT_CONCEPTS: Mapping[str, Any] = _SR_CONCEPTS[_SCT]
# Laterality modifies the property type (PS3.16 CID 244 Laterality); it is not part of the concept.
_LATERALITY = {
    "left": ("7771000", "Left"),
    "right": ("24028007", "Right"),
    "bilateral": ("51440002", "Right and left"),
}
_LATERALITY_RE = re.compile(r"(?:^|[\s_\-])((?i:left|right|bilateral))(?=$|[\s_\-A-Z])")
_BODY_PART_RE = re.compile(r"^[A-Z0-9 _]{1,16}$")

_INLINE_KEYS = {
    "path",
    "algorithm_name",
    "algorithm_version",
    "algorithm_type",
    "manufacturer",
    "manufacturer_model_name",
    "series_description",
    "series_number",
    "body_part_examined",
    "content_label",
    "content_description",
    "content_creator_name",
    "segment_names",
}
_SEGMENT_KEYS = {
    "name",
    "label",
    "code",
    "scheme",
    "meaning",
    "number",
    "tracking_id",
    "category",
    "category_number",
    "description",
    "color",
    "colour",
    "type_modifier",
    "anatomic_region",
    "algorithm_type",
}


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
    raw: dict[str, Any] | str | None,
    *,
    base_dir: Path,
    model_id: str,
    labels: Iterable[int] | None = None,
) -> SegmentationMetadata:
    """Parse a model's ``metadata`` entry (a dcmqi template path or the inline form).

    ``labels`` (the model's label values, background excluded or not) are checked to all have a
    segment. Raises :class:`ConfigError` naming the model and the segment at fault.
    """
    where = f"model {model_id!r} metadata"
    if raw is None:
        raise ConfigError(f"{where}: missing (DICOM outputs need segment descriptions)")
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a mapping or a template path, got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - _INLINE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (allowed: {sorted(_INLINE_KEYS)})")

    if raw.get("path") is not None:
        values, segments = _from_template(raw["path"], base_dir, model_id, where)
        if "segment_names" in raw:
            raise ConfigError(f"{where}: give either 'path' or 'segment_names', not both")
    else:
        if "segment_names" not in raw:
            raise ConfigError(f"{where}: needs 'path' (a dcmqi template) or 'segment_names'")
        values, segments = {}, _from_inline(raw["segment_names"], model_id, where)
    for key in _INLINE_KEYS - {"path", "segment_names"}:
        if raw.get(key) is not None:
            values[key] = raw[key]

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


def _text(value: Any, what: str, where: str, *, max_len: int = 64) -> str:
    """A DICOM LO/SH-like string: non-empty, no backslash or control characters, at most max_len."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {what} must be a non-empty string, got {value!r}")
    value = value.strip()
    if len(value) > max_len or "\\" in value or any(ord(c) < 32 for c in value):
        raise ConfigError(
            f"{where}: {what} {value!r} must be at most {max_len} characters without '\\' "
            "or control characters"
        )
    return value


def _build(
    values: dict[str, Any], segments: dict[int, SegmentInfo], model_id: str, where: str
) -> SegmentationMetadata:
    if not segments:
        raise ConfigError(f"{where}: no segments described")
    algorithm_name = _text(values.get("algorithm_name", model_id), "algorithm_name", where)
    series_number = values.get("series_number", 900)
    try:
        series_number = int(series_number)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: series_number must be an integer, got {series_number!r}"
        ) from None
    if not 0 < series_number < 2**31:
        raise ConfigError(f"{where}: series_number must be positive, got {series_number}")
    body_part = values.get("body_part_examined")
    if body_part is not None:
        body_part = str(body_part).strip().upper()
        if not _BODY_PART_RE.match(body_part):
            raise ConfigError(
                f"{where}: body_part_examined {body_part!r} must be at most 16 characters of "
                "A-Z, 0-9, space or underscore (a DICOM CS value, PS3.16 Annex L)"
            )
    algorithm_type = str(values.get("algorithm_type", "AUTOMATIC")).upper()
    if algorithm_type not in ALGORITHM_TYPES:
        raise ConfigError(f"{where}: algorithm_type must be one of {ALGORITHM_TYPES}")
    creator = values.get("content_creator_name")
    return SegmentationMetadata(
        model_id=model_id,
        algorithm_name=algorithm_name,
        algorithm_version=_text(values.get("algorithm_version", "1.0"), "algorithm_version", where),
        manufacturer=_text(values.get("manufacturer", "nnunet-node"), "manufacturer", where),
        manufacturer_model_name=_text(
            values.get("manufacturer_model_name", algorithm_name), "manufacturer_model_name", where
        ),
        series_description=_text(
            values.get("series_description", f"{algorithm_name} segmentation"),
            "series_description",
            where,
        ),
        series_number=series_number,
        segments=dict(sorted(segments.items())),
        algorithm_type=algorithm_type,
        body_part_examined=body_part,
        content_label=_content_label(values.get("content_label", "SEGMENTATION"), where),
        content_description=(
            _text(values["content_description"], "content_description", where)
            if values.get("content_description")
            else None
        ),
        content_creator_name=(_text(creator, "content_creator_name", where) if creator else None),
    )


def _content_label(value: Any, where: str) -> str:
    label = str(value).strip().upper().replace(" ", "_")
    if not re.match(r"^[A-Z0-9_]{1,16}$", label):
        raise ConfigError(f"{where}: content_label {value!r} must be a DICOM CS value (16 chars)")
    return label


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
    CID 7159/7194 (lesions, abnormal structures) -> Morphologically Altered Structure; CID 7166/7191
    (tissues) -> Tissue; other SNOMED CT concepts -> Anatomical Structure; other schemes -> Physical
    object."""
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


def _concept_from(value: Any, what: str, where: str) -> Concept:
    """A concept given as a SNOMED CT name, an SCT code value, or a dict (code, scheme, meaning)."""
    if isinstance(value, dict):
        code = value.get("code", value.get("value", value.get("CodeValue")))
        scheme = value.get("scheme", value.get("CodingSchemeDesignator", _SCT))
        meaning = value.get("meaning", value.get("name", value.get("CodeMeaning")))
        if code is None:
            raise ConfigError(f"{where}: {what} needs a 'code'")
        code = _text(code, f"{what} code", where, max_len=64)
        scheme = _text(scheme, f"{what} scheme", where, max_len=16)
        if meaning is None and scheme == _SCT:
            meaning = _sct_meaning(code)
        if meaning is None:
            raise ConfigError(f"{where}: {what} needs a 'meaning' for code {code!r}")
        return Concept(code, scheme, _text(meaning, f"{what} meaning", where))
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip().isdigit():
        meaning = _sct_meaning(value.strip())
        if meaning is None:
            raise ConfigError(f"{where}: {what}: SNOMED CT code {value!r} is unknown; give a dict")
        return Concept(value.strip(), _SCT, meaning)
    if isinstance(value, str):
        return _lookup_sct(value, what, where)
    raise ConfigError(f"{where}: {what} must be a concept name, a code or a dict, got {value!r}")


def _rgb(value: Any, what: str, where: str) -> tuple[int, int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        raise ConfigError(f"{where}: {what} must be three integers 0..255, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def _palette(label_value: int) -> tuple[int, int, int]:
    return PALETTE[(label_value - 1) % len(PALETTE)]


def _label_value(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: label number must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{where}: label number must be an integer, got {value!r}") from None
    if not 1 <= number <= 65535:
        raise ConfigError(f"{where}: label number must be 1..65535, got {number}")
    return number


def _from_inline(raw: Any, model_id: str, where: str) -> dict[int, SegmentInfo]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: segment_names must be a non-empty list")
    segments: dict[int, SegmentInfo] = {}
    for index, entry in enumerate(raw):
        seg_where = f"{where}, segment {index + 1}"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{seg_where}: expected a name or a mapping, got {entry!r}")
        seg_where = f"{where}, segment {index + 1} ({entry.get('label', entry.get('name'))!r})"
        unknown = sorted(set(entry) - _SEGMENT_KEYS)
        if unknown:
            raise ConfigError(
                f"{seg_where}: unknown keys {unknown} (allowed: {sorted(_SEGMENT_KEYS)})"
            )
        info = _inline_segment(entry, index, seg_where)
        if info.label_value in segments:
            raise ConfigError(f"{seg_where}: label number {info.label_value} is described twice")
        segments[info.label_value] = info
    return segments


def _inline_segment(entry: dict[str, Any], index: int, where: str) -> SegmentInfo:
    number = _label_value(entry.get("number", index + 1), where)
    name = entry.get("name")
    scheme = entry.get("scheme", _SCT)
    modifier = None
    if entry.get("code") is not None:
        meaning = entry.get("meaning", name)
        type_ = _concept_from(
            {"code": entry["code"], "scheme": scheme, "meaning": meaning}, "type", where
        )
        if name is None:
            name = type_.meaning
    else:
        if name is None:
            raise ConfigError(f"{where}: needs a 'name' or a 'code'")
        if scheme != _SCT:
            raise ConfigError(
                f"{where}: only SNOMED CT (SCT) names are looked up; "
                f"give 'code' for scheme {scheme!r}"
            )
        name = _text(name, "name", where)
        # Try the whole name first: some concepts carry their side ("Upper lobe of left lung").
        code = getattr(codes.SCT, _camel(name), None)
        if code is not None:
            type_ = Concept(str(code.value), _SCT, str(code.meaning))
        else:
            stem, modifier = _split_laterality(name)
            type_ = _lookup_sct(stem, "name", where)
    if entry.get("type_modifier") is not None:
        modifier = _concept_from(entry["type_modifier"], "type_modifier", where)
    label = _text(entry.get("label", name), "label", where)
    category_raw = entry.get("category", entry.get("category_number"))
    category = (
        _concept_from(category_raw, "category", where)
        if category_raw is not None
        else _default_category(type_)
    )
    colour_raw = entry.get("color", entry.get("colour"))
    rgb = _rgb(colour_raw, "color", where) if colour_raw is not None else _palette(number)
    algorithm_type = str(entry.get("algorithm_type", "AUTOMATIC")).upper()
    if algorithm_type not in ALGORITHM_TYPES:
        raise ConfigError(f"{where}: algorithm_type must be one of {ALGORITHM_TYPES}")
    return SegmentInfo(
        label_value=number,
        label=label,
        category=category,
        type=type_,
        rgb=rgb,
        tracking_id=_text(entry.get("tracking_id", label), "tracking_id", where),
        algorithm_type=algorithm_type,
        description=(
            _text(entry["description"], "description", where) if entry.get("description") else None
        ),
        type_modifier=modifier,
        anatomic_region=(
            _concept_from(entry["anatomic_region"], "anatomic_region", where)
            if entry.get("anatomic_region") is not None
            else None
        ),
    )


# --- the dcmqi template -------------------------------------------------------------------------


def _from_template(
    path: Any, base_dir: Path, model_id: str, where: str
) -> tuple[dict[str, Any], dict[int, SegmentInfo]]:
    """Read a dcmqi ``seg`` JSON template (https://qiicr.org/dcmqi/#/seg)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: 'path' must be a file path")
    file = Path(path).expanduser()
    if not file.is_absolute():
        file = base_dir / file
    where = f"{where} ({file})"
    try:
        template = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the template: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(template, dict):
        raise ConfigError(f"{where}: the template must be a JSON object")
    attributes = template.get("segmentAttributes")
    if not isinstance(attributes, list) or not attributes:
        raise ConfigError(f"{where}: 'segmentAttributes' must be a non-empty list")
    entries: list[Any] = []
    for item in attributes:
        entries.extend(item if isinstance(item, list) else [item])

    segments: dict[int, SegmentInfo] = {}
    algorithm_names: list[str] = []
    for index, entry in enumerate(entries):
        seg_where = f"{where}, segment {index + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{seg_where}: expected an object")
        seg_where = f"{where}, segment {index + 1} ({entry.get('SegmentLabel')!r})"
        if "labelID" not in entry:
            raise ConfigError(f"{seg_where}: missing 'labelID'")
        number = _label_value(entry["labelID"], seg_where)
        type_ = _template_code(entry, "SegmentedPropertyTypeCodeSequence", seg_where, required=True)
        category = _template_code(
            entry, "SegmentedPropertyCategoryCodeSequence", seg_where, required=True
        )
        assert type_ is not None and category is not None
        label = _text(entry.get("SegmentLabel", type_.meaning), "SegmentLabel", seg_where)
        colour = entry.get("recommendedDisplayRGBValue")
        algorithm_type = str(entry.get("SegmentAlgorithmType", "AUTOMATIC")).upper()
        if algorithm_type not in ALGORITHM_TYPES:
            raise ConfigError(f"{seg_where}: SegmentAlgorithmType must be one of {ALGORITHM_TYPES}")
        algorithm_name = entry.get("SegmentAlgorithmName")
        if algorithm_name:
            algorithm_names.append(_text(algorithm_name, "SegmentAlgorithmName", seg_where))
        if number in segments:
            raise ConfigError(f"{seg_where}: labelID {number} is described twice")
        segments[number] = SegmentInfo(
            label_value=number,
            label=label,
            category=category,
            type=type_,
            rgb=(
                _rgb(colour, "recommendedDisplayRGBValue", seg_where)
                if colour is not None
                else _palette(number)
            ),
            tracking_id=_text(
                entry.get("TrackingIdentifier", label), "TrackingIdentifier", seg_where
            ),
            algorithm_type=algorithm_type,
            algorithm_name=algorithm_names[-1] if algorithm_name else None,
            description=(
                _text(entry["SegmentDescription"], "SegmentDescription", seg_where)
                if entry.get("SegmentDescription")
                else None
            ),
            type_modifier=_template_code(
                entry, "SegmentedPropertyTypeModifierCodeSequence", seg_where
            ),
            anatomic_region=_template_code(entry, "AnatomicRegionSequence", seg_where),
        )

    values: dict[str, Any] = {}
    mapping = {
        "SeriesDescription": "series_description",
        "SeriesNumber": "series_number",
        "BodyPartExamined": "body_part_examined",
        "ContentLabel": "content_label",
        "ContentDescription": "content_description",
        "ContentCreatorName": "content_creator_name",
    }
    for key, name in mapping.items():
        if template.get(key) not in (None, ""):
            values[name] = template[key]
    if algorithm_names:
        values["algorithm_name"] = algorithm_names[0]
    return values, segments


def _template_code(
    entry: dict[str, Any], key: str, where: str, *, required: bool = False
) -> Concept | None:
    raw = entry.get(key)
    if raw is None:
        if required:
            raise ConfigError(f"{where}: missing {key!r}")
        return None
    if isinstance(raw, list):
        if len(raw) != 1:
            raise ConfigError(f"{where}: {key} must hold exactly one code")
        raw = raw[0]
    if not isinstance(raw, dict) or not {
        "CodeValue",
        "CodingSchemeDesignator",
        "CodeMeaning",
    } <= set(raw):
        raise ConfigError(f"{where}: {key} needs CodeValue, CodingSchemeDesignator and CodeMeaning")
    return Concept(
        _text(raw["CodeValue"], f"{key} CodeValue", where),
        _text(raw["CodingSchemeDesignator"], f"{key} CodingSchemeDesignator", where, max_len=16),
        _text(raw["CodeMeaning"], f"{key} CodeMeaning", where),
    )
