"""The DICOM JSON Model (PS3.18 Annex F) for QIDO-RS results, WADO-RS metadata and STOW-RS answers.

pydicom writes the model (``Dataset.to_json_dict``); this module decides what goes inline and what
is referred to by a ``BulkDataURI`` (PS3.18 F.2.6): pixel data always, and any other top-level
binary value (OB, OD, OF, OL, OV, OW, UN) that was too large to read (files are read with
``defer_size``, so pixel data and other large binary values never enter memory for a metadata
request). Sequences and text are always inline, however large: a SEG's Segment Sequence or an
RTSTRUCT's ROI Contour Sequence behind a BulkDataURI is something a viewer cannot open.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from nnunet_node.storage.headers import is_valid_uid

LOGGER = logging.getLogger(__name__)

MEDIA_TYPE = "application/dicom+json"
PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float, Pixel Data
DEFER_BYTES = 4096
"""Values longer than this are not read for metadata and become bulk data."""
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def tag_hex(tag: int) -> str:
    return f"{int(tag):08X}"


def dataset_to_json(ds: Dataset, *, bulk_base: str | None = None) -> dict[str, Any]:
    """The JSON model of ``ds``; top-level deferred or pixel values become ``bulk_base/<tag>``.

    Without ``bulk_base`` such values are left out (QIDO-RS answers carry no bulk data).
    Sequences and text are written inline whole, however large: PS3.18 F.2.6 keeps bulk data
    for binary values, and a viewer needs a SEG's or an RTSTRUCT's sequences in the metadata.
    """
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        if tag.group == 0x0002 or tag.element == 0x0000:
            continue  # File Meta and group lengths are not part of the model (PS3.18 F.2.1)
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None:
            continue
        # a deferred sequence or text is read now and written inline
        deferred = (
            isinstance(raw, RawDataElement) and raw.value is None and _stored_vr(raw) in BINARY_VRS
        )
        if deferred or int(tag) in PIXEL_DATA_TAGS:
            if bulk_base is None:
                continue
            vr = raw.VR or ("OB" if int(tag) in PIXEL_DATA_TAGS else "UN")
            if isinstance(raw, RawDataElement) and int(raw.length) == 0xFFFFFFFF:
                vr = "OB"  # encapsulated pixel data
            out[tag_hex(tag)] = {"vr": vr, "BulkDataURI": f"{bulk_base}/{tag_hex(tag)}"}
            continue
        elem: DataElement = ds[tag]
        try:
            out[tag_hex(tag)] = elem.to_json_dict(
                bulk_data_element_handler=None, bulk_data_threshold=2**62
            )
        except Exception as exc:  # a malformed value in a stored file must not hide the rest
            LOGGER.warning("leaving out %s from the JSON model: %s", tag_hex(tag), exc)
    return out


def _stored_vr(raw: RawDataElement) -> str:
    """The VR of a deferred element: as stored (explicit VR) or from the data dictionary
    (implicit VR); UN for a private or unknown tag."""
    if raw.VR:
        return str(raw.VR)
    try:
        return str(pydicom.datadict.dictionary_VR(raw.tag))
    except KeyError:
        return "UN"


def read_metadata(path: Path, *, bulk_base: str | None) -> dict[str, Any]:
    """The JSON model of one stored instance, reading only the values under ``DEFER_BYTES``."""
    ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
    return dataset_to_json(ds, bulk_base=bulk_base)


_BULK_PLACEHOLDER = "\u0000bulk"
"""Stands for the instance's bulk data URL base in a cached model (the URL depends on the host
the request named); it cannot occur in a real value, where NUL is not allowed."""
_BULK_PLACEHOLDER_JSON = json.dumps(_BULK_PLACEHOLDER)[1:-1].encode()


class MetadataCache:
    """The JSON model of each stored instance, kept on disk once built (WADO-RS metadata).

    Building the model reads the file with pydicom and converts every element (~1.5 ms per CT
    instance); a viewer asks for every series' metadata each time a study opens, so the model
    is built on first request and kept under ``folder`` as ``<SOP Instance UID>.<size>.<mtime
    ns>.json``: a re-sent instance (new file, new size or time) is built again, its old model
    removed. The cache is no record: it is not fsynced, and deleting it loses nothing.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def model(self, path: Path, sop_instance_uid: str, bulk_base: str) -> bytes:
        """The model of the file ``path`` as JSON bytes, BulkDataURIs under ``bulk_base``.
        Raises OSError or pydicom's errors when the file cannot be read."""
        stat = path.stat()
        cached = self.folder / f"{sop_instance_uid}.{stat.st_size}.{stat.st_mtime_ns}.json"
        try:
            data = cached.read_bytes()
        except OSError:
            data = self._build(path, cached, sop_instance_uid)
        base = json.dumps(bulk_base)[1:-1].encode()
        return data.replace(_BULK_PLACEHOLDER_JSON, base)

    def _build(self, path: Path, cached: Path, sop_instance_uid: str) -> bytes:
        model = read_metadata(path, bulk_base=_BULK_PLACEHOLDER)
        data = json.dumps(model, separators=(",", ":")).encode("utf-8")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for old in self.folder.glob(f"{sop_instance_uid}.*.json"):
                old.unlink(missing_ok=True)
            temporary = cached.with_suffix(f".{uuid.uuid4().hex}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, cached)
        except OSError as exc:  # a cache that cannot be written only costs time
            LOGGER.warning("WADO-RS metadata cache: cannot write %s: %s", cached, exc)
        return data


@dataclass(frozen=True)
class StoredRef:
    """One instance stored by STOW-RS, for the Referenced SOP Sequence."""

    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str
    study_instance_uid: str = ""


@dataclass(frozen=True)
class FailedRef:
    """One part STOW-RS did not store, for the Failed SOP Sequence; UIDs empty if unreadable."""

    sop_class_uid: str
    sop_instance_uid: str
    reason: int
    message: str = ""


def store_response(
    stored: Iterable[StoredRef], failed: Iterable[FailedRef], *, study_url: str | None
) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I) as DICOM JSON.

    A Failed SOP Sequence item whose SOP Class or Instance UID could not be read, or is not a
    valid UID (PS3.5 9.1: a part refused for exactly that), holds that element empty. The SOP
    Instance Reference Macro (PS3.3 Table 10-11) makes both Type 1, so no choice is fully
    conformant: an empty value keeps every item's shape (a client that looks for the element
    finds it and reads "unknown"), keeps the response a valid dataset (echoing the value back
    would put an invalid UI value in it, which strict DICOM JSON readers refuse), and the
    item's Failure Reason still says why the part failed. The log line of the refusal quotes
    the value as sent."""
    ds = Dataset()
    ds.RetrieveURL = study_url or ""
    failed_items = []
    for failure in failed:
        item = Dataset()
        item.ReferencedSOPClassUID = _valid_or_empty(failure.sop_class_uid)
        item.ReferencedSOPInstanceUID = _valid_or_empty(failure.sop_instance_uid)
        item.FailureReason = failure.reason
        failed_items.append(item)
    stored_items = []
    for success in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = success.sop_class_uid
        item.ReferencedSOPInstanceUID = success.sop_instance_uid
        item.RetrieveURL = success.retrieve_url
        stored_items.append(item)
    if failed_items:
        ds.FailedSOPSequence = failed_items
    if stored_items:
        ds.ReferencedSOPSequence = stored_items
    return ds.to_json_dict()


def _valid_or_empty(uid: str) -> str:
    return uid if is_valid_uid(uid) else ""


_NUMBER_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"})
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
"""Text VRs whose value is never split at backslashes (PS3.5 6.2: VM 1 by definition)."""


def _number(vr: str, value: Any) -> int | float:
    if vr in ("FL", "FD") or (vr == "DS" and not float(value).is_integer()):
        return float(value)
    return int(float(value)) if isinstance(value, str) and vr == "DS" else int(value)


@functools.lru_cache(maxsize=1024)
def _tag_and_vr(keyword: str) -> tuple[str, str] | None:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None:
        return None
    return tag_hex(tag), pydicom.datadict.dictionary_VR(tag)


_SEQUENCE, _NUMBER, _PERSON, _SINGLE, _MULTI = range(5)


@functools.lru_cache(maxsize=256)
def _json_plan(keys: tuple[str, ...]) -> tuple[tuple[str, str, str, int], ...]:
    """The returned keys once resolved: (keyword, tag as 8 hex digits, VR, how its values are
    written), in the order given; private, unknown, Specific Character Set and Query/Retrieve
    Level keys left out."""
    plan = []
    for key in keys:
        if key.startswith("_") or key in ("SpecificCharacterSet", "QueryRetrieveLevel"):
            continue
        known = _tag_and_vr(key)
        if known is None:
            continue
        name, vr = known
        if vr == "SQ":
            mode = _SEQUENCE
        elif vr in _NUMBER_VRS:
            mode = _NUMBER
        elif vr in _SINGLE_TEXT_VRS:
            mode = _SINGLE
        else:
            mode = _PERSON if vr == "PN" else _MULTI
        plan.append((key, name, vr, mode))
    return tuple(plan)


def row_to_json(row: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The JSON model of an index row (:mod:`storage.query`), for QIDO-RS results.

    The same answer as ``storage.query.to_dataset(row, keys).to_json_dict()`` (a unit test holds
    them equal) without building pydicom elements, which cost ten times more per result: an
    instance search answers 100 or 1000 of them. Keys the row lacks are zero-length
    (PS3.18 F.2.5), multi-valued text splits at backslashes, IS/US are numbers (F.2.3). The keys
    are resolved once per list of keys (:func:`_json_plan`), not once per row.
    """
    out: dict[str, Any] = {}
    non_ascii = False
    for keyword, name, vr, mode in _json_plan(tuple(keys)):
        if mode == _SEQUENCE:
            out[name] = {"vr": vr, "Value": []}
            continue
        value = row.get(keyword)
        values: list[Any] = []
        for item in value if isinstance(value, list | tuple) else (value,):
            if item is None or item == "":
                continue
            if isinstance(item, str) and mode >= _PERSON and mode != _SINGLE:
                values.extend(item.split("\\") if "\\" in item else (item,))
            else:
                values.append(item)
        if not values:
            out[name] = {"vr": vr}
            continue
        if mode == _NUMBER:
            out[name] = {"vr": vr, "Value": [_number(vr, v) for v in values]}
        elif mode == _PERSON:
            out[name] = {"vr": vr, "Value": [person_name_json(str(v)) for v in values]}
        else:
            out[name] = {"vr": vr, "Value": [str(v) for v in values]}
        if not non_ascii:
            non_ascii = any(isinstance(v, str) and not v.isascii() for v in values)
    if non_ascii:
        out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return out


PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def person_name_json(value: str) -> dict[str, str]:
    """One person name as its component groups (PS3.18 F.2.2; PS3.5 6.2.1.1: alphabetic,
    ideographic and phonetic groups separated by ``=``); empty groups are left out."""
    groups = value.split("=")[: len(PN_GROUPS)]
    return {name: group for name, group in zip(PN_GROUPS, groups, strict=False) if group}


def keyword_or_tag(key: str) -> BaseTag | None:
    """``PatientID`` or ``00100020`` to a tag; ``None`` if the dictionary has no such attribute."""
    key = key.strip()
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        return Tag(int(key, 16))
    try:
        tag = Tag(key)
    except (ValueError, TypeError):
        return None
    return tag if pydicom.datadict.dictionary_has_tag(tag) else None
