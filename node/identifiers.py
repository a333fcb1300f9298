"""C-FIND response identifiers encoded directly from index rows (PS3.5 7.1, PS3.4 C.4.1.1.3.2).

:func:`encode_identifier` writes the bytes that :func:`storage.query.to_dataset` followed by
pydicom's encoder (pynetdicom encodes a handler's Dataset with ``dsutils.encode``) would give,
element for element, without building a Dataset: the requested keys in tag order, each row value
(or an empty value), the Query/Retrieve Level, and the Specific Character Set the answer is
written in (:func:`core.charset.answer_charset`). What pydicom does that matters to the bytes,
and is done the same here:

- texts of the VRs that a Specific Character Set governs (SH, LO, ST, LT, UC, UT, PN; PS3.5
  6.1.2.3) are encoded in the answer's set; every other string VR in ISO 8859-1 (pydicom's
  default for them);
- an odd-length value is padded to even length with a space, a UI value with a NUL (PS3.5 6.2);
- a person name loses its empty trailing component groups (``Doe^John=`` -> ``Doe^John``),
  a UID its surrounding spaces; an empty key has a zero-length value (an SQ key, an empty
  sequence).

It answers None, and the caller takes pydicom's path, for what it does not do: a Specific
Character Set with code extensions (ISO 2022 escape sequences: pydicom switches sets within a
value) or more than one term, a value an encoding cannot hold (pydicom then fails, or replaces
characters with a warning), a VR it does not know (an ambiguous one, ``US or SS``), a value of
a type the row does not normally hold, and any transfer syntax but Implicit or Explicit VR
Little Endian (the only ones the node accepts for Query/Retrieve). tests/node/test_identifiers.py
compares the bytes with pydicom's for every level, VR and character set.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.charset import python_encoding
from pydicom.datadict import DicomDictionary

from nnunet_node.core.charset import answer_charset
from nnunet_node.storage.query import response_key

# Explicit VR with a 4-byte Value Length after 2 reserved bytes (PS3.5 7.1.2, Table 7.1-1).
_LONG_LENGTH = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR"})
_LONG_LENGTH |= {"UT", "UV"}
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
"""VRs whose values the Specific Character Set governs (PS3.5 6.1.2.3)."""
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
"""The other string VRs: ISO 8859-1 bytes (the default repertoire is ASCII)."""
_TEXT_VRS = _CHARSET_VRS | _STRING_VRS

_SINGLE_BYTE_OR_STATELESS = (
    "ISO_IR 6",
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 126",
    "ISO_IR 127",
    "ISO_IR 138",
    "ISO_IR 144",
    "ISO_IR 148",
    "ISO_IR 166",
    "ISO_IR 192",
    "GB18030",
    "GBK",
)
_CODECS: dict[str | None, str] = {None: "latin_1"}
_CODECS.update({term: python_encoding[term] for term in _SINGLE_BYTE_OR_STATELESS})
"""The answer's Specific Character Set -> the Python codec of its texts, for the sets encoded
here (one term, no code extensions: a value encodes as a whole as group by group)."""

_BINARY = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "AT"})
"""Binary VRs: US holds a row value (Rows, Columns); the others only ever come back empty."""

_CHARSET_TAG = 0x00080005
_LEVEL_TAG = 0x00080052


@dataclass(frozen=True)
class _Slot:
    tag: int
    keyword: str
    vr: str
    implicit: bytes
    """Group and element, little endian (the Value Length follows)."""
    explicit: bytes
    """Group, element and VR (and the reserved bytes of a 4-byte length)."""


def _slot(tag: int, keyword: str, vr: str) -> _Slot:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    explicit = head + vr.encode("ascii") + (b"\x00\x00" if vr in _LONG_LENGTH else b"")
    return _Slot(tag, keyword, vr, head, explicit)


_CHARSET_SLOT = _slot(_CHARSET_TAG, "SpecificCharacterSet", "CS")
_LEVEL_SLOT = _slot(_LEVEL_TAG, "QueryRetrieveLevel", "CS")


@functools.lru_cache(maxsize=1024)
def _layout(keys: tuple[str, ...]) -> tuple[_Slot, ...] | None:
    """The response's elements in tag order (the charset and level slots among them), or None
    when a key's VR is not one encoded here."""
    slots = [_CHARSET_SLOT, _LEVEL_SLOT]
    seen = {_CHARSET_TAG, _LEVEL_TAG}
    for key in keys:
        spec = response_key(key)
        if spec is None:
            continue
        keyword, tag, vr = spec
        if tag in seen:
            continue
        if vr not in _TEXT_VRS and vr not in _LONG_LENGTH and vr not in _BINARY:
            return None  # e.g. "US or SS": pydicom resolves it from other elements
        seen.add(tag)
        slots.append(_slot(tag, keyword, vr))
    return tuple(sorted(slots, key=lambda slot: slot.tag))


class _Refuse(Exception):
    """A value this encoder leaves to pydicom."""


def _text(value: Any, vr: str) -> str:
    """A row value as the string pydicom would write (see the module docstring)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        text = "\\".join(value)
    elif vr == "IS" and isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        raise _Refuse
    if vr == "UI":
        return "\\".join(part.strip() for part in text.split("\\"))
    if vr == "PN":
        return "\\".join(_trim_groups(name) for name in text.split("\\"))
    return text


def _trim_groups(name: str) -> str:
    groups = name.split("=")
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _value(slot: _Slot, value: Any, codec: str) -> bytes:
    vr = slot.vr
    if vr in _TEXT_VRS:
        data = _text(value, vr).encode(codec if vr in _CHARSET_VRS else "latin_1")
    elif vr == "US" and isinstance(value, int) and not isinstance(value, bool):
        data = struct.pack("<H", value)
    else:
        raise _Refuse
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def _element(slot: _Slot, data: bytes, implicit: bool) -> bytes:
    if implicit:
        return slot.implicit + struct.pack("<I", len(data)) + data
    if slot.vr in _LONG_LENGTH:
        return slot.explicit + struct.pack("<I", len(data)) + data
    if len(data) > 0xFFFF:
        raise _Refuse
    return slot.explicit + struct.pack("<H", len(data)) + data


def encode_identifier(
    row: Mapping[str, Any],
    keys: Sequence[str],
    level: str,
    *,
    requested_charset: Any = None,
    implicit_vr: bool = True,
) -> bytes | None:
    """The C-FIND response identifier of ``row`` for the requested ``keys`` at Query/Retrieve
    Level ``level``, encoded in Implicit (``implicit_vr``) or Explicit VR Little Endian: the bytes
    ``pynetdicom.dsutils.encode(to_dataset(row, keys, requested_charset=...) + level)`` gives.
    None where this encoder leaves the identifier to pydicom (module docstring); never raises
    for a row value."""
    layout = _layout(tuple(keys))
    if layout is None:
        return None
    values: list[Any] = []
    texts: list[str] = []
    for slot in layout:
        value = None if slot.vr == "SQ" else row.get(slot.keyword)
        if value is None or value == "" or value == []:
            value = None
        elif isinstance(value, str):
            texts.append(value)
        values.append(value)
    answer = answer_charset(texts, requested_charset)
    codec = _CODECS.get(answer) if not isinstance(answer, list) else None
    if codec is None:
        return None
    parts: list[bytes] = []
    try:
        for slot, value in zip(layout, values, strict=True):
            if slot is _CHARSET_SLOT:
                if answer is None:
                    continue
                value = answer
            elif slot is _LEVEL_SLOT:
                value = level
            data = b"" if value is None else _value(slot, value, codec)
            parts.append(_element(slot, data, implicit_vr))
    except (_Refuse, UnicodeError, struct.error, OverflowError):
        return None
    return b"".join(parts)


# --- request identifiers ------------------------------------------------------------------------


@dataclass(frozen=True)
class FindIdentifier:
    """What the node reads from a C-FIND request's identifier (PS3.4 C.4.1.1.3.1)."""

    level: str
    """Query/Retrieve Level as sent (checked by the caller)."""
    charset: str | None
    """Specific Character Set as sent (backslash-separated terms), None when absent."""
    keys: list[str]
    """The keywords of the identifier's keys, in tag order: each is returned."""
    matching: dict[str, str]
    """Keyword -> query value (empty: universal matching) of each key but sequences."""


_NOT_MATCHED = ("QueryRetrieveLevel", "SpecificCharacterSet")
_UNDEFINED_LENGTH = 0xFFFFFFFF


def read_find_identifier(data: bytes, *, implicit_vr: bool = True) -> FindIdentifier | None:
    """The keys of a C-FIND identifier encoded in Implicit (``implicit_vr``) or Explicit VR
    Little Endian (PS3.5 7.1), read without pydicom: what node/handlers.py's ``query_keys``
    and ``retrieve_level`` take from pydicom's Dataset of it, up to spaces and NULs around
    values (which matching ignores, PS3.4 C.2.2.2). Private elements are skipped as pydicom
    names none of them.

    None, and the caller decodes with pydicom, for whatever this reader does not handle: a
    value that is not plain ASCII or holds an escape sequence (its Specific Character Set then
    decides), an element of
    undefined length, a binary value that is not empty, a tag missing from the data dictionary
    (group lengths, repeating groups), a VR that differs from the dictionary's or is
    ambiguous, a repeated tag, or bytes that do not parse."""
    elements: list[tuple[int, str, str, bytes]] = []
    offset, end_of_data = 0, len(data)
    try:
        while offset < end_of_data:
            group, number = struct.unpack_from("<HH", data, offset)
            tag = group << 16 | number
            entry = DicomDictionary.get(tag)
            if implicit_vr:
                vr = entry[0] if entry is not None else ""
                (length,) = struct.unpack_from("<I", data, offset + 4)
                start = offset + 8
            else:
                vr = data[offset + 4 : offset + 6].decode("ascii")
                if vr in _LONG_LENGTH:
                    (length,) = struct.unpack_from("<I", data, offset + 8)
                    start = offset + 12
                else:
                    (length,) = struct.unpack_from("<H", data, offset + 6)
                    start = offset + 8
            offset = start + length
            if length == _UNDEFINED_LENGTH or offset > end_of_data:
                return None
            if group % 2:
                continue  # private: no keyword, neither returned nor matched
            if entry is None or vr != entry[0]:
                return None
            elements.append((tag, entry[4], vr, data[start:offset]))
    except (struct.error, UnicodeDecodeError):
        return None
    elements.sort(key=lambda element: element[0])
    if len({element[0] for element in elements}) != len(elements):
        return None
    level, charset = "", None
    keys: list[str] = []
    matching: dict[str, str] = {}
    for _tag, keyword, vr, raw in elements:
        if vr == "SQ":
            keys.append(keyword)
            continue
        if not raw:
            text = ""
        elif vr in _TEXT_VRS and raw.isascii() and b"\x1b" not in raw:
            text = raw.decode("ascii")  # no escape sequence: ISO 2022 sets are 7-bit too
        else:
            return None  # pydicom decodes it (a character set, a binary value)
        if keyword == "QueryRetrieveLevel":
            level = text.strip(" \x00")
        elif keyword == "SpecificCharacterSet":
            charset = text.strip(" \x00") or None
        if keyword in _NOT_MATCHED or not keyword:
            continue
        keys.append(keyword)
        matching[keyword] = text.rstrip(" \x00")
    return FindIdentifier(level, charset, keys, matching)
