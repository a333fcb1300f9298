"""The schema of ``model-serve-spec.yaml``: one pydantic model of the whole file, read once.

The file keeps the reference server's format (``model_folder`` and ``models``, see
``docs/reference-contract.md``) and adds this node's ``destinations``, ``routes`` and ``peers``::

    SpecFile
    ├── model_folder: str                      (relative to the spec file's folder)
    ├── models: [ModelEntry]
    │   ├── id, name, aliases, rel_path | totalseg_task, min_mem (MiB), default_args, queue
    │   └── metadata: MetadataEntry            (a dcmqi template path, or the inline form)
    │       └── segment_names: [SegmentEntry]  (a SNOMED CT name, or a mapping)
    │           └── category, type_modifier, anatomic_region: ConceptEntry
    ├── destinations: {name: DestinationEntry} (ae_title, host, port, max_attempts, retry_delay_s,
    │                                           tls)
    ├── routes: [RouteEntry]                   (match, nnunet_id, args, destinations, quiet_seconds,
    │                                           queue)
    └── peers: [PeerEntry]                     (ae_title, host, port, tls, operations, check_host)

    DcmqiTemplate                              (the JSON file a metadata ``path`` names)
    └── segmentAttributes: [DcmqiSegment]      (codes: DcmqiCode)

This module checks what the file itself can say is wrong: types, ranges, unknown keys, DICOM value
rules (AE titles PS3.5 6.2, LO and CS values PS3.5 6.2), attribute keywords, regular expressions,
and the references inside the file (a rule's destinations, unique rule names and AE titles). What
needs another layer's knowledge is checked by that layer when it turns its part into working
objects, still at start-up: ``inference.spec`` resolves model folders and checks ``default_args``
against the request model; ``export.metadata`` looks SNOMED CT names up and reads dcmqi templates;
``pipeline.routing`` checks a rule's ``args`` against the request model and its models against
the registry. Every problem becomes one :class:`~nnunet_node.core.errors.ConfigError` whose
message names the model (by id), the segment (by number and label), the rule (by name) or the
destination, then the key: see :func:`config_error`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.datadict import dictionary_VR, keyword_dict

from nnunet_node.core.errors import ConfigError, validation_message
from nnunet_node.core.settings import check_queue_name

DEFAULT_MIN_MEM_MIB = 4000
"""``min_mem`` when a model does not give it: MiB of free GPU memory a job needs."""

NODE_FILLED_FIELDS = frozenset({"study_path", "output_dir"})
"""Request fields the node fills in itself for a job it makes from a routing rule."""

PER_REQUEST_FIELDS = NODE_FILLED_FIELDS | {"nnunet_id", "series_folders"}
"""Request fields that describe one request: a model's ``default_args`` cannot set them. A rule
names its model by its own ``nnunet_id`` key and may set ``series_folders`` (with ``{series}``
placeholders, e.g. to feed a cascade), but not :data:`NODE_FILLED_FIELDS`."""

ASSOCIATION_KEYS = ("called_ae", "calling_ae")
"""What a rule may match beside attribute keywords: the AE titles of the association."""

PeerOperation = Literal["store", "find", "get", "move"]
PEER_OPERATIONS: tuple[PeerOperation, ...] = ("store", "find", "get", "move")
"""What a declared peer may ask of the node: C-STORE, C-FIND, C-GET, C-MOVE (PS3.4 B, C)."""

ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")
"""Segment Algorithm Type (0062,0008) defined terms, PS3.3 C.8.20.2."""

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2 AE: no backslash or controls
_CS = re.compile(r"^[A-Z0-9 _]{1,16}$")  # PS3.5 6.2 CS


# --- value types -----------------------------------------------------------------------------


def _number_as_text(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _long_string(max_len: int) -> Callable[[Any], str]:
    def check(raw: Any) -> str:
        value = _number_as_text(raw)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"must be a non-empty string, got {value!r}")
        text = value.strip()
        if len(text) > max_len or "\\" in text or any(ord(c) < 32 for c in text):
            raise ValueError(
                f"{text!r} must be at most {max_len} characters without '\\' or control characters"
            )
        return text

    return check


LO = Annotated[str, BeforeValidator(_long_string(64))]
"""A DICOM LO-like value (PS3.5 6.2): non-empty, at most 64 characters, no backslash or controls;
numbers are taken as their text."""
SH16 = Annotated[str, BeforeValidator(_long_string(16))]
"""A coding scheme designator (SH, PS3.5 6.2): at most 16 characters."""


def _non_empty(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a non-empty string")
    return value


Name = Annotated[str, Field(strict=True), BeforeValidator(_non_empty)]
"""A non-empty string (no number taken as text)."""


def _cs(what: str) -> Any:
    def check(value: Any) -> str:
        text = str(value).strip().upper()
        if what == "content_label":
            text = text.replace(" ", "_")
        if not _CS.match(text) or (what == "content_label" and " " in text):
            raise ValueError(
                f"{value!r} must be at most 16 characters of A-Z, 0-9, space or underscore "
                "(a DICOM CS value, PS3.5 6.2)"
            )
        return text

    return check


def _upper_choice(value: Any) -> Any:
    return str(value).upper() if isinstance(value, str) else value


AlgorithmType = Annotated[
    Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"], BeforeValidator(_upper_choice)
]


def _label_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"label number must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"label number must be an integer, got {value!r}") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"label number must be 1..65535, got {number}")
    return number


LabelNumber = Annotated[int, BeforeValidator(_label_number)]
"""A label value of the model's output (1..65535; 0 is the background)."""


def _rgb(value: Any) -> tuple[int, int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        raise ValueError(f"must be three integers 0..255, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


RGB = Annotated[tuple[int, int, int], BeforeValidator(_rgb)]


def _ae_title(value: Any) -> str:
    text = str(value).strip() if isinstance(value, str) else value
    if not isinstance(text, str) or not _AE_TITLE.match(text):
        raise ValueError(
            f"{value!r} is not 1 to 16 printable characters without a backslash (PS3.5 6.2 AE)"
        )
    return text


AETitle = Annotated[str, BeforeValidator(_ae_title)]

Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{value!r} is not a number >= 0")
    return float(value)


Seconds = Annotated[float, BeforeValidator(_seconds)]
QueueName = Annotated[str, Field(strict=True), AfterValidator(check_queue_name)]
"""A job queue: 1 to 64 letters, digits, ``_ . -`` (a broker routing key everywhere)."""
"""A duration in seconds, >= 0 (an integer or a decimal number)."""


def _listify(value: Any) -> Any:
    """``None`` -> ``[]``, one string -> a list of it (the file may give one item bare)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


def _mapping_or_empty(value: Any) -> Any:
    return {} if value is None else value


class _Entry(BaseModel):
    """A part of the spec file: unknown keys are refused, the objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --- segment metadata ------------------------------------------------------------------------


class ConceptEntry(_Entry):
    """A coded concept as the spec writes it (PS3.3 8.8): a SNOMED CT concept name (``"Liver"``),
    an SCT code value (``"10200004"`` or a number), or a mapping ``{code, scheme, meaning}`` (also
    spelt ``value``/``CodeValue``, ``CodingSchemeDesignator``, ``name``/``CodeMeaning``).

    ``export.metadata`` turns it into a concept, looking names and SCT meanings up."""

    code: LO | None = Field(None, validation_alias=AliasChoices("code", "value", "CodeValue"))
    scheme: SH16 | None = Field(
        None, validation_alias=AliasChoices("scheme", "CodingSchemeDesignator")
    )
    meaning: LO | None = Field(
        None, validation_alias=AliasChoices("meaning", "CodeMeaning", "name")
    )
    lookup: Name | None = None
    """A SNOMED CT concept name to look up (the bare-string form)."""

    @model_validator(mode="before")
    @classmethod
    def _forms(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            return {"code": value.strip()} if value.strip().isdigit() else {"lookup": value}
        if isinstance(value, Mapping) and "lookup" in value:
            raise ValueError("unknown key 'lookup'")
        return value

    @model_validator(mode="after")
    def _has_code(self) -> ConceptEntry:
        if self.lookup is None and self.code is None:
            raise ValueError("needs a 'code'")
        return self


class SegmentEntry(_Entry):
    """One segment of the inline form: what one label value of the model's output is.

    Given bare as a string, it is ``{name: <string>}``: a SNOMED CT concept name, optionally with
    its side (``"Left kidney"``). With ``code`` the type is that code in ``scheme`` (default SCT);
    ``number`` defaults to the segment's position (1-based)."""

    name: Name | None = None
    label: LO | None = None
    code: LO | None = None
    scheme: SH16 = "SCT"
    meaning: LO | None = None
    number: LabelNumber | None = None
    tracking_id: LO | None = None
    category: ConceptEntry | None = Field(
        None, validation_alias=AliasChoices("category", "category_number")
    )
    description: LO | None = None
    color: RGB | None = Field(None, validation_alias=AliasChoices("color", "colour"))
    type_modifier: ConceptEntry | None = None
    anatomic_region: ConceptEntry | None = None
    algorithm_type: AlgorithmType = "AUTOMATIC"

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _named(self) -> SegmentEntry:
        if self.code is None:
            if self.name is None:
                raise ValueError("needs a 'name' or a 'code'")
            if self.scheme != "SCT":
                raise ValueError(
                    f"only SNOMED CT (SCT) names are looked up; give 'code' for scheme "
                    f"{self.scheme!r}"
                )
        return self


class MetadataEntry(_Entry):
    """A model's ``metadata``: the series-level values and segments of its DICOM outputs.

    Either ``path`` (a dcmqi ``seg`` JSON template, relative to the spec's folder; given bare as a
    string it is ``{path: <string>}``), whose series-level values the inline keys beside it
    override, or the inline form with ``segment_names``. Defaults (derived from the model id) are
    filled in by ``export.metadata``."""

    path: Name | None = None
    algorithm_name: LO | None = None
    algorithm_version: LO | None = None
    algorithm_type: AlgorithmType | None = None
    manufacturer: LO | None = None
    manufacturer_model_name: LO | None = None
    series_description: LO | None = None
    series_number: Annotated[int, Field(gt=0, lt=2**31)] | None = None
    body_part_examined: Annotated[str, BeforeValidator(_cs("body_part_examined"))] | None = None
    content_label: Annotated[str, BeforeValidator(_cs("content_label"))] | None = None
    content_description: LO | None = None
    content_creator_name: LO | None = None
    segment_names: list[SegmentEntry] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("segment_names", mode="before")
    @classmethod
    def _non_empty_list(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, list) or not value):
            raise ValueError("must be a non-empty list")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> MetadataEntry:
        if self.path is not None and self.segment_names is not None:
            raise ValueError("give either 'path' or 'segment_names', not both")
        if self.path is None and self.segment_names is None:
            raise ValueError("needs 'path' (a dcmqi template) or 'segment_names'")
        return self

    def as_document(self) -> dict[str, Any]:
        """What the spec file said (the keys it gave), as JSON-able data."""
        return self.model_dump(mode="json", exclude_unset=True)


# --- the dcmqi template (https://qiicr.org/dcmqi/#/seg) ---------------------------------------


class DcmqiCode(BaseModel):
    """A code of a dcmqi template: one item of a code sequence (PS3.3 8.8)."""

    model_config = ConfigDict(frozen=True)

    CodeValue: LO
    CodingSchemeDesignator: SH16
    CodeMeaning: LO

    @model_validator(mode="before")
    @classmethod
    def _one_item(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("must hold exactly one code")
            return value[0]
        return value


class DcmqiSegment(BaseModel):
    """One entry of a dcmqi template's ``segmentAttributes`` (other keys are dcmqi's own)."""

    model_config = ConfigDict(frozen=True)

    labelID: LabelNumber
    SegmentLabel: LO | None = None
    SegmentDescription: LO | None = None
    SegmentAlgorithmType: AlgorithmType = "AUTOMATIC"
    SegmentAlgorithmName: LO | None = None
    TrackingIdentifier: LO | None = None
    recommendedDisplayRGBValue: RGB | None = None
    SegmentedPropertyCategoryCodeSequence: DcmqiCode
    SegmentedPropertyTypeCodeSequence: DcmqiCode
    SegmentedPropertyTypeModifierCodeSequence: DcmqiCode | None = None
    AnatomicRegionSequence: DcmqiCode | None = None

    @model_validator(mode="before")
    @classmethod
    def _blank_is_absent(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: v for k, v in value.items() if v != ""}
        return value


class DcmqiTemplate(BaseModel):
    """A dcmqi ``seg`` JSON template: segments and the series-level values this node uses."""

    model_config = ConfigDict(frozen=True)

    segmentAttributes: list[DcmqiSegment]
    SeriesDescription: LO | None = None
    SeriesNumber: Annotated[int, Field(gt=0, lt=2**31)] | None = None
    BodyPartExamined: str | None = None
    ContentLabel: str | None = None
    ContentDescription: LO | None = None
    ContentCreatorName: LO | None = None

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        """dcmqi nests ``segmentAttributes`` as a list of lists (one per input file)."""
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if v != ""}
            value["segmentAttributes"] = flatten_segment_attributes(value.get("segmentAttributes"))
        return value

    @field_validator("segmentAttributes", mode="before")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty list")
        return value


def flatten_segment_attributes(value: Any) -> Any:
    """dcmqi's ``segmentAttributes``, a list of lists, as one list (anything else unchanged)."""
    if not isinstance(value, list):
        return value
    flat: list[Any] = []
    for item in value:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


# --- models ----------------------------------------------------------------------------------


class ModelEntry(_Entry):
    """One model of the spec: an nnU-Net results folder (``rel_path`` under ``model_folder``) or a
    TotalSegmentator task (``totalseg_task``, its weights under ``TOTALSEG_WEIGHTS_PATH``).

    ``id``, ``name`` and every alias name it; ``min_mem`` is MiB of free GPU memory a job needs;
    ``default_args`` are request fields merged under each request (checked against the request
    model by ``inference.spec``)."""

    id: Name
    name: Name | None = None
    aliases: Annotated[list[Name], BeforeValidator(_listify)] = []
    rel_path: Name | None = None
    min_mem: Annotated[StrictInt, Field(ge=0)] = DEFAULT_MIN_MEM_MIB
    default_args: Annotated[dict[str, Any], BeforeValidator(_mapping_or_empty)] = {}
    metadata: MetadataEntry | None = None
    totalseg_task: Name | None = None
    queue: QueueName | None = None
    """The job queue of this model's group: workers on the hosts that hold it listen on it."""

    @model_validator(mode="after")
    def _located(self) -> ModelEntry:
        if self.totalseg_task is None and self.rel_path is None:
            raise ValueError("rel_path must be a non-empty string (or give totalseg_task)")
        fixed = sorted(set(self.default_args) & PER_REQUEST_FIELDS)
        if fixed:
            raise ValueError(
                f"default_args cannot set {', '.join(fixed)} (per request only)",
            )
        return self


# --- destinations, peers and routing rules ---------------------------------------------------


class DestinationEntry(_Entry):
    """A peer AE the node sends to by C-STORE: a rule's results, or a C-MOVE's sub-operations
    (the AE titles of ``destinations`` are the only C-MOVE destinations, PS3.4 C.4.2.1.4.1)."""

    ae_title: AETitle
    host: Name
    port: Port
    max_attempts: Annotated[StrictInt, Field(ge=1)] = 5
    """Dispatch attempts before a dispatch is marked failed (it can be retried by hand)."""
    retry_delay_s: Seconds = 5.0
    """Seconds before the second attempt; doubled after each failure (at most 10 minutes)."""
    tls: StrictBool = False
    """Send over TLS (PS3.15 B.1); a peer entry with the same AE title may say so too."""


class PeerEntry(_Entry):
    """A declared DICOM peer (issue 16: access control in the manner of Orthanc's modalities).

    ``operations`` are what the peer may ask of the node (``store``: send C-STORE; ``find``,
    ``get``, ``move``: the query/retrieve services of PS3.4 C); ``host`` is where it connects from
    and listens; ``port`` where it accepts associations (needed to send to it, e.g. as a C-MOVE
    destination); ``tls``: associations with it use the Basic TLS Secure Transport Connection
    Profile (PS3.15 B.1). A peer without ``port`` only calls the node. ``check_host``: the peer is
    recognised only when it calls from the address ``host`` resolves to (node/access.py).

    A destination is a declared peer too (it may use every operation unless a peer entry with its
    AE title says otherwise)."""

    ae_title: AETitle
    host: Name
    port: Port | None = None
    tls: StrictBool = False
    operations: Annotated[frozenset[PeerOperation], BeforeValidator(_listify)] = frozenset(
        PEER_OPERATIONS
    )
    check_host: StrictBool = False


def _match_patterns(value: Any) -> dict[str, re.Pattern[str]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of attribute keyword -> regular expression")
    patterns: dict[str, re.Pattern[str]] = {}
    for keyword, pattern in value.items():
        keyword = str(keyword)
        if keyword not in ASSOCIATION_KEYS and keyword not in keyword_dict:
            raise ValueError(f"{keyword}: not a DICOM attribute keyword (nor called_ae/calling_ae)")
        if keyword in keyword_dict and dictionary_VR(keyword_dict[keyword]) == "SQ":
            raise ValueError(f"{keyword}: a sequence cannot be matched")
        if isinstance(pattern, bool) or not isinstance(pattern, str | int | float):
            raise ValueError(f"{keyword}: must be a regular expression (a string)")
        try:
            patterns[keyword] = re.compile(str(pattern))
        except re.error as exc:
            raise ValueError(f"{keyword}: bad regular expression {pattern!r}: {exc}") from None
    return patterns


def _model_names(value: Any) -> Any:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(m, str) and m for m in value):
        return tuple(value)
    raise ValueError("required, a model name or a list of them")


class RouteEntry(_Entry):
    """A routing rule: which series (``match``: attribute keyword -> regular expression matched in
    full), which model or cascade (``nnunet_id``), with which request fields (``args``), where the
    results go (``destinations``, names of the spec's destinations), and how long the series must
    be quiet before it runs (``quiet_seconds``, overriding ``NNUNET_NODE_SERIES_QUIET_S``)."""

    name: Annotated[Name, Field(max_length=64)]
    match: Annotated[dict[str, re.Pattern[str]], BeforeValidator(_match_patterns)] = {}
    nnunet_id: Annotated[str | tuple[str, ...], BeforeValidator(_model_names)]
    args: Annotated[dict[str, Any], BeforeValidator(_mapping_or_empty)] = {}
    destinations: Annotated[tuple[str, ...], BeforeValidator(_listify)] = ()
    quiet_seconds: Seconds | None = None
    rerun: StrictBool = True
    queue: QueueName | None = None
    """The job queue of its jobs (else their first model's that names one, else the default)."""

    def matches(self, attributes: Mapping[str, str]) -> bool:
        """Every pattern matches the whole value; an absent attribute counts as empty."""
        return all(p.fullmatch(attributes.get(k, "")) for k, p in self.match.items())

    def quiet_period(self, default_s: float) -> float:
        """Seconds without new instances after which the series is complete for this rule."""
        return default_s if self.quiet_seconds is None else self.quiet_seconds

    def request(self) -> dict[str, Any]:
        """The /infer request a matching series gets (the node adds paths and series)."""
        nnunet_id: str | list[str] = (
            list(self.nnunet_id) if isinstance(self.nnunet_id, tuple) else self.nnunet_id
        )
        return {"nnunet_id": nnunet_id, "is_dicom": True, **self.args}

    @field_validator("args")
    @classmethod
    def _not_node_filled(cls, args: dict[str, Any]) -> dict[str, Any]:
        for key in args:
            if key in NODE_FILLED_FIELDS or key == "nnunet_id":
                raise ValueError(f"{key}: set by the node for archive jobs")
        return args


class SpecFile(_Entry):
    """The whole ``model-serve-spec.yaml``, validated (see the module docstring for the tree)."""

    model_folder: Name | None = None
    models: Annotated[list[ModelEntry], BeforeValidator(_listify)] = []
    destinations: Annotated[dict[str, DestinationEntry], BeforeValidator(_mapping_or_empty)] = {}
    routes: Annotated[list[RouteEntry], BeforeValidator(_listify)] = []
    peers: Annotated[list[PeerEntry], BeforeValidator(_listify)] = []

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations_mapping(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, Mapping):
            raise ValueError("must be a mapping of name -> {ae_title, host, port}")
        return value

    @model_validator(mode="after")
    def _references(self) -> SpecFile:
        titles: dict[str, str] = {}
        for name, destination in self.destinations.items():
            if destination.ae_title in titles:
                raise ValueError(
                    f"destinations.{name}.ae_title: {destination.ae_title!r} is also used by "
                    f"{titles[destination.ae_title]}"
                )
            titles[destination.ae_title] = name
        peers: set[str] = set()
        for peer in self.peers:
            if peer.ae_title in peers:
                raise ValueError(f"peers[{peer.ae_title}]: the AE title is declared twice")
            peers.add(peer.ae_title)
        seen: set[str] = set()
        for route in self.routes:
            if route.name in seen:
                raise ValueError(f"routes[{route.name}]: the name is used by an earlier rule")
            seen.add(route.name)
            for target in route.destinations:
                if target not in self.destinations:
                    raise ValueError(
                        f"routes[{route.name}].destinations: {target!r} is not in destinations "
                        f"({sorted(self.destinations) or 'none defined'})"
                    )
        return self

    # --- reading ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, raw: Any) -> SpecFile:
        """Validate a parsed YAML document; :class:`ConfigError` names the place at fault."""
        if isinstance(raw, SpecFile):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError("model-serve spec: the top level must be a mapping")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise config_error(exc, raw, "model-serve spec", schema=cls) from None

    @classmethod
    def read(cls, path: Path) -> SpecFile:
        """Read and validate the file at ``path``.

        Raises :class:`ConfigError` when it is absent, is not YAML, or is not a valid spec."""
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"model-serve spec {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"model-serve spec {path} cannot be read: not valid YAML: {exc}"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"model-serve spec {path} cannot be read: {exc}") from exc
        return cls.parse(raw)


# --- error messages --------------------------------------------------------------------------

_NAMED_LISTS = {"models", "routes", "peers", "segment_names", "segmentAttributes"}


def _entity(collection: str, index: int, item: Any) -> str:
    """How a message names the ``index``-th item of a list of the file."""
    entry = item if isinstance(item, Mapping) else {}
    if collection == "models":
        model_id = entry.get("id")
        return f"model {model_id!r}" if isinstance(model_id, str) else f"models[{index}]"
    if collection == "routes":
        name = entry.get("name")
        return f"routes[{name}]" if isinstance(name, str) and name else f"routes[{index}]"
    if collection == "peers":
        title = entry.get("ae_title")
        return f"peers[{title}]" if isinstance(title, str) else f"peers[{index}]"
    return segment_where(index, item)


def segment_where(index: int, item: Any) -> str:
    """``segment 2 ('Cube')``: a segment by its position (1-based) and its label or name."""
    if isinstance(item, str):
        return f"segment {index + 1} ({item!r})"
    entry = item if isinstance(item, Mapping) else {}
    label = entry.get("label", entry.get("SegmentLabel", entry.get("name")))
    return f"segment {index + 1} ({label!r})"


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, Mapping):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def describe_location(loc: Sequence[Any], raw: Any) -> tuple[str, list[str]]:
    """Split a pydantic error location into the entity it names and the key path below it.

    ``("models", 0, "metadata", "segment_names", 1, "color")`` over the document ``raw`` gives
    ``("model 'phantom' metadata, segment 2 ('Cube')", ["color"])``."""
    where = ""
    keys: list[str] = []
    node = raw
    for i, part in enumerate(loc):
        child = _child(node, part)
        previous = loc[i - 1] if i else None
        following = loc[i + 1] if i + 1 < len(loc) else None
        if isinstance(part, int) and previous in _NAMED_LISTS:
            name = _entity(str(previous), part, child)
            nested = previous in ("segment_names", "segmentAttributes") and where
            where = f"{where}, {name}" if nested else name
            keys = []
        elif part in _NAMED_LISTS and isinstance(following, int):
            pass  # the item is named by the next part
        elif part == "metadata" and where.startswith("model ") and not keys:
            where = f"{where} metadata"
        else:
            keys.append(str(part))
        node = child
    return where, keys


def _unwrap(annotation: Any) -> Any:
    """The type inside ``Annotated[...]`` and ``X | None`` (a model member first)."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            annotation = (models or members)[0]
        else:
            return annotation


def _allowed_keys(schema: type[BaseModel], loc: Sequence[Any]) -> list[str] | None:
    """The keys the model at ``loc`` (below ``schema``) accepts, for an unknown-key message."""
    current: Any = schema
    for part in loc:
        current = _unwrap(current)
        origin = get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif origin in (list, tuple, frozenset, set):
            current = get_args(current)[0]
        elif origin is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return None
    names: list[str] = []
    for name, field in current.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.extend(str(choice) for choice in alias.choices)
        else:
            names.append(name)
    return sorted(set(names))


def config_error(
    exc: ValidationError, raw: Any, prefix: str, *, schema: type[BaseModel] | None = None
) -> ConfigError:
    """One :class:`ConfigError` for every problem of ``exc``, each naming its place in ``raw``.

    ``prefix`` names the file or part (``"model-serve spec"``, ``"model 'm' metadata"``);
    ``schema`` (the validated model class) lets an unknown key's message list the allowed keys."""
    problems: list[str] = []
    unknown: dict[tuple[Any, ...], list[str]] = {}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "extra_forbidden" and loc:
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        where, path = describe_location(loc, raw)
        problems.append(_join(where, path, validation_message(err)))
    for parent, keys in unknown.items():
        allowed = _allowed_keys(schema, parent) if schema is not None else None
        text = "unknown key(s) " + ", ".join(repr(k) for k in sorted(keys))
        if allowed:
            text += f" (allowed: {', '.join(allowed)})"
        where, path = describe_location(parent, raw)
        problems.insert(0, _join(where, path, text))
    return ConfigError(f"{prefix}: " + "; ".join(problems))


def _join(where: str, path: list[str], message: str) -> str:
    dotted = ".".join(path)
    if where and dotted:
        separator = "." if where.endswith("]") or where.startswith("destinations") else ": "
        place = f"{where}{separator}{dotted}"
    else:
        place = where or dotted
    return f"{place}: {message}" if place else message
