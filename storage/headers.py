"""Reading what the index keeps from a Part 10 file's header, without its pixel data.

:func:`read_header` is the one place that turns a file's first bytes into a
:class:`storage.indexer.Header` and judges its UIDs (PS3.5 9.1). It has two readers:

- a direct scan of the elements (:mod:`core.dicomscan`) for the common case: Little Endian
  transfer syntaxes, ASCII values; ~10x faster than a pydicom Dataset, which matters on the
  C-STORE path (bench/bench_cstore.py);
- pydicom (``dcmread(stop_before_pixels=True)``) for everything else: other character sets,
  Big Endian, deflated datasets, anything the scan is not sure of. Text that is not plain ASCII
  is decoded by :func:`core.charset.decode` in the dataset's Specific Character Set, with its
  fallback (UTF-8, then ISO 8859-1) and a logged warning for an unknown or wrongly declared set.

tests/storage/test_headers.py checks that both give the same header.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from nnunet_node.core import charset, dicomscan
from nnunet_node.core.errors import InvalidDicom, shown_value
from nnunet_node.storage.indexer import Header
from nnunet_node.storage.models import Base, Patient, Series, Study

LOGGER = logging.getLogger(__name__)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_U16 = struct.Struct("<H")


def is_valid_uid(value: str) -> bool:
    """PS3.5 9.1: digits in dot-separated components, none empty, at most 64 characters.

    Leading zeros inside a component are tolerated (real devices send them); anything else
    (slashes, ``..``, letters, spaces) is refused, so a UID can never leave its folder.
    """
    return 0 < len(value) <= 64 and _UID.match(value) is not None


# Keyword -> column, per table. Values are only ever overwritten by a non-empty new value.
PATIENT_ATTRIBUTES = {
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
}
STUDY_ATTRIBUTES = {
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "StudyDescription": "study_description",
    "ReferringPhysicianName": "referring_physician_name",
}
SERIES_ATTRIBUTES = {
    "Modality": "modality",
    "SeriesDescription": "series_description",
    "BodyPartExamined": "body_part_examined",
    "SeriesDate": "series_date",
    "SeriesTime": "series_time",
    "FrameOfReferenceUID": "frame_of_reference_uid",
}
SERIES_INT_ATTRIBUTES = {"SeriesNumber": "series_number"}
INSTANCE_INT_ATTRIBUTES = {
    "InstanceNumber": "instance_number",
    "Rows": "rows",
    "Columns": "columns",
    "NumberOfFrames": "number_of_frames",
}


def _plain_ascii(raw: bytes) -> bool:
    """ASCII with no ISO 2022 escape sequence: text whatever the Specific Character Set (an
    escape switches to another character set, e.g. ISO 2022 IR 87, in 7-bit bytes)."""
    return raw.isascii() and b"\x1b" not in raw


def _raw(ds: Dataset, keyword: str) -> Any:
    """The element's value as read: bytes while pydicom has not converted it yet."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds.get_item(tag)
    return None if elem is None else elem.value


def _text(ds: Dataset, keyword: str) -> str:
    """A text value. ASCII values are taken straight from the raw bytes (pydicom's conversion
    cost more than the rest of the header parse); others are decoded by pydicom with the
    dataset's Specific Character Set. Multiple values stay backslash-separated."""
    raw = _raw(ds, keyword)
    if raw is None:
        return ""
    if isinstance(raw, bytes) and _plain_ascii(raw):
        return raw.decode("ascii").strip("\x00 ")
    if isinstance(raw, bytes):
        decoded = charset.decode(
            raw, _raw(ds, "SpecificCharacterSet"), vr=pydicom.datadict.dictionary_VR(keyword)
        )
        if decoded.warning:
            LOGGER.warning(
                "%s of %s: %s", keyword, _raw_text(ds, "SOPInstanceUID"), decoded.warning
            )
        return decoded.text.strip("\x00 ")
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value).strip("\x00 ")
    return str(value).strip("\x00 ")


def _raw_text(ds: Dataset, keyword: str) -> str:
    """The value as sent, without pydicom's value validation (hostile UIDs are ours to judge,
    and pydicom would log a warning of its own for each); bytes that are not ASCII are kept one
    character per byte (ISO 8859-1), so a message can quote them exactly."""
    raw = _raw(ds, keyword)
    if raw is None:
        return ""
    if isinstance(raw, bytes):
        return raw.decode("latin-1").strip("\x00 ")
    return str(raw).strip("\x00 ")


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        raw = _raw(ds, keyword)
        if isinstance(raw, bytes) and pydicom.datadict.dictionary_VR(keyword) == "IS":
            return int(raw.decode("ascii").strip("\x00 ")) if raw.strip(b"\x00 ") else None
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None


@functools.cache
def _column_length(model: type[Base], column: str) -> int | None:
    return getattr(model.__table__.c[column].type, "length", None) or None


def fit_column(model: type[Base], column: str, value: str) -> str:
    """Cut a value to its column's length: PostgreSQL refuses what SQLite would store."""
    return value[: _column_length(model, column)]


_UID_KEYWORDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")
_TEXT_KEYWORDS = (
    "PatientID",
    "IssuerOfPatientID",
    *PATIENT_ATTRIBUTES,
    *STUDY_ATTRIBUTES,
    *SERIES_ATTRIBUTES,
)
_PIXEL_KEYWORDS = ("SamplesPerPixel", "BitsAllocated")
_INT_KEYWORDS = (*SERIES_INT_ATTRIBUTES, *INSTANCE_INT_ATTRIBUTES, *_PIXEL_KEYWORDS)
NATIVE_SYNTAXES = frozenset(("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"))
"""Little-endian transfer syntaxes whose Pixel Data is native (not encapsulated, not deflated):
its length is known from the image's attributes (PS3.5 8.1.1, A.1-A.2)."""
_TAGS = {
    keyword: int(pydicom.datadict.tag_for_keyword(keyword))  # type: ignore[arg-type]
    for keyword in (*_UID_KEYWORDS, *_TEXT_KEYWORDS, *_INT_KEYWORDS)
}
_WANTED = frozenset(_TAGS.values())
_US_KEYWORDS = frozenset(k for k in _INT_KEYWORDS if pydicom.datadict.dictionary_VR(k) == "US")
SCAN_BYTES = 1 << 18
"""How much of a file :func:`read_header` reads to scan; the rest only when pydicom must."""


def _build(
    uid: Callable[[str], str],
    text: Callable[[str], str],
    integer: Callable[[str], int | None],
    transfer_syntax: str,
) -> Header:
    """The header from a reader's values; the UIDs judged (PS3.5 9.1), texts fit their columns."""
    uids = {keyword: uid(keyword) for keyword in _UID_KEYWORDS}
    for keyword, value in uids.items():
        if not value:
            raise InvalidDicom(f"{keyword} is missing")
        if not is_valid_uid(value):
            raise InvalidDicom(f"{keyword} {shown_value(value)} is not a valid UID (PS3.5 9.1)")
    header = Header(
        sop_instance_uid=uids["SOPInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=transfer_syntax if is_valid_uid(transfer_syntax) else "",
    )
    header.patient = {c: text(k)[:n] for k, c, n in _PATIENT_TEXT}
    header.study = {c: text(k)[:n] for k, c, n in _STUDY_TEXT}
    header.series = {c: text(k)[:n] for k, c, n in _SERIES_TEXT}
    header.series |= {c: integer(k) for k, c in SERIES_INT_ATTRIBUTES.items()}
    header.instance = {c: integer(k) for k, c in INSTANCE_INT_ATTRIBUTES.items()}
    header.pixel_bytes = _pixel_bytes(
        header.instance["rows"],
        header.instance["columns"],
        header.instance["number_of_frames"],
        integer("SamplesPerPixel"),
        integer("BitsAllocated"),
    )
    return header


def _pixel_bytes(
    rows: int | None,
    columns: int | None,
    frames: int | None,
    samples: int | None,
    bits: int | None,
) -> int | None:
    """The fewest bytes native Pixel Data may hold (see :attr:`Header.pixel_bytes`), or None.
    Colour counts 2 samples per pixel, not 3: YBR_FULL_422 shares Cb and Cr between two pixels
    (PS3.3 C.7.6.3.1.2), and the Photometric Interpretation is not read here."""
    if not rows or not columns or not samples or not bits:
        return None
    per_pixel = 1 if samples == 1 else 2
    return (rows * columns * (frames or 1) * per_pixel * bits + 7) // 8


def native_pixel_bytes(header: Header) -> int | None:
    """The fewest bytes the header's Pixel Data must hold (:attr:`Header.pixel_bytes`) when its
    transfer syntax keeps it native; None when that is not known (encapsulated or deflated
    pixel data, attributes missing)."""
    if header.transfer_syntax_uid not in NATIVE_SYNTAXES:
        return None
    return header.pixel_bytes


def check_pixel_length(data: bytes, pixel_at: int, header: Header, size: int) -> None:
    """Raise InvalidDicom when the Pixel Data element at ``pixel_at`` (an offset into ``data``,
    the first bytes of a file of ``size`` bytes) does not fit in the file or, native, holds
    fewer bytes than the image's attributes say (:func:`native_pixel_bytes`): a file cut short
    and then re-encoded with a consistent length, say, which would otherwise be filed as an
    image with rows missing. Nothing is raised where the bytes there are not sure."""
    try:
        dicomscan.check_pixel_data(
            data,
            pixel_at,
            header.transfer_syntax_uid,
            size,
            expected=native_pixel_bytes(header),
        )
    except dicomscan.NotSure:
        return
    except dicomscan.Truncated as exc:
        raise InvalidDicom(f"not a readable DICOM Part 10 file: {exc}") from exc


def _fitted(
    model: type[Base], attributes: dict[str, str]
) -> tuple[tuple[str, str, int | None], ...]:
    """(keyword, column, the column's length) for each attribute: what :func:`_build` cuts."""
    return tuple((k, c, _column_length(model, c)) for k, c in attributes.items())


_PATIENT_TEXT = _fitted(
    Patient,
    {"PatientID": "patient_id", "IssuerOfPatientID": "issuer_of_patient_id", **PATIENT_ATTRIBUTES},
)
_STUDY_TEXT = _fitted(Study, STUDY_ATTRIBUTES)
_SERIES_TEXT = _fitted(Series, SERIES_ATTRIBUTES)


def _scanned_header(
    data: bytes, *, complete: bool, size: int | None = None, pixel_at: list[int] | None = None
) -> Header | None:
    """The header by :func:`core.dicomscan.scan`; None when the bytes end too soon.
    ``size`` (the whole file's length) also checks that the pixel data fits in the file;
    ``pixel_at`` gets the pixel data element's offset (``scan``).
    Raises NotSure (pydicom must read it), Truncated or InvalidDicom (bad UIDs)."""
    at: list[int] = [] if pixel_at is None else pixel_at
    found = dicomscan.scan(data, _WANTED, complete=complete, size=size, pixel_at=at)
    if found is None:
        return None
    transfer_syntax, elements = found
    values: dict[str, bytes] = {}
    for keyword, tag in _TAGS.items():
        element = elements.get(tag)
        if element is None:
            continue
        if keyword in _US_KEYWORDS:  # binary: any byte may be >= 0x80 (Rows 400: 90 01)
            if element.vr not in (None, b"US", b"UN"):
                raise dicomscan.NotSure(f"{keyword} has VR {element.vr!r}")
        elif not _plain_ascii(element.value):
            raise dicomscan.NotSure(f"{keyword} is not plain ASCII: its character set decides")
        values[keyword] = element.value

    def text(keyword: str) -> str:
        return values.get(keyword, b"").decode("ascii").strip("\x00 ")

    def integer(keyword: str) -> int | None:
        raw = values.get(keyword)
        if raw is None:
            return None
        if keyword in _US_KEYWORDS:
            if len(raw) == 2:
                return int(_U16.unpack(raw)[0])
            if not raw:
                return None
            raise dicomscan.NotSure(f"{keyword} holds {len(raw)} bytes")
        try:
            return int(raw.decode("ascii").strip("\x00 ")) if raw.strip(b"\x00 ") else None
        except ValueError:
            return None

    header = _build(text, text, integer, transfer_syntax)
    if size is not None and at:
        check_pixel_length(data, at[0], header, size)
    return header


def read_header_pydicom(data: bytes | bytearray | Path | BinaryIO) -> Header:
    """The header by pydicom alone: what :func:`read_header` falls back to."""
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on bad bytes
        raise InvalidDicom(f"not a readable DICOM Part 10 file: {exc}") from exc
    try:
        transfer_syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "").strip("\x00 ")
        return _build(
            lambda k: _raw_text(ds, k),
            lambda k: _text(ds, k),
            lambda k: _int(ds, k),
            transfer_syntax,
        )
    except InvalidDicom:
        raise
    except Exception as exc:  # a value that cannot be decoded
        raise InvalidDicom(f"unreadable header: {exc}") from exc


def read_header(data: bytes | bytearray | Path | BinaryIO) -> Header:
    """Parse a Part 10 file's header (no pixel data) and check its UIDs, or raise InvalidDicom.

    The direct scan answers when it is sure; pydicom reads the rest (module docstring)."""
    if isinstance(data, Path):
        try:
            with open(data, "rb") as handle:
                prefix = handle.read(SCAN_BYTES)
                size = os.fstat(handle.fileno()).st_size
        except OSError as exc:
            raise InvalidDicom(f"cannot read {data.name}: {exc}") from exc
        complete = len(prefix) < SCAN_BYTES
    elif isinstance(data, bytes | bytearray):
        prefix, complete = bytes(data), True
        size = len(prefix)
    else:
        return read_header_pydicom(data)
    try:
        header = _scanned_header(prefix, complete=complete, size=size)
        if header is not None:
            return header
    except dicomscan.NotSure:
        pass
    except dicomscan.Truncated as exc:
        raise InvalidDicom(f"not a readable DICOM Part 10 file: {exc}") from exc
    # pydicom, on the bytes already read when they are the whole file
    if not complete:
        return read_header_pydicom(data)
    stream = io.BytesIO(prefix)
    header = read_header_pydicom(stream)
    end = stream.tell()
    if prefix[end : end + 4] in _PIXEL_TAGS:
        check_pixel_length(prefix, end, header, size)
    return header


# Where stop_before_pixels stops, encoded little and big endian.
_PIXEL_TAGS = frozenset(
    struct.pack(order, tag >> 16, tag & 0xFFFF)
    for order in ("<HH", ">HH")
    for tag in dicomscan.PIXEL_DATA_TAGS
)


def header_from_prefix(prefix: bytes, pixel_at: list[int] | None = None) -> Header | None:
    """The header, from the first bytes of a Part 10 file, when they hold it; None when they
    end too soon (pydicom would return what it read so far, a header missing the rest).
    ``pixel_at`` gets the pixel data element's offset when the node's own scan found it
    (:func:`core.dicomscan.check_pixel_data` checks it later without another scan)."""
    try:
        return _scanned_header(prefix, complete=False, pixel_at=pixel_at)
    except dicomscan.NotSure:
        if pixel_at is not None:
            pixel_at.clear()  # pydicom decides: the scan's word counts for nothing
    except InvalidDicom:
        return None  # the whole file decides
    stream = io.BytesIO(prefix)
    try:
        header = read_header_pydicom(stream)
    except InvalidDicom:
        return None  # perhaps only cut short: the whole file decides
    end = stream.tell()
    if prefix[end : end + 4] not in _PIXEL_TAGS:
        return None
    if pixel_at is not None:
        pixel_at.append(end)  # pydicom stopped at the pixel data element: checked there later
    return header
