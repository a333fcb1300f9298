"""A direct scan of a Part 10 file's data elements, for the few values the index keeps.

pydicom builds a Dataset of every element before the pixel data; at ~0.5 ms per CT header that
was the largest CPU cost of a C-STORE after the protocol itself. The index needs ~25 top-level
values, so this scan walks the element headers (PS3.5 7.1) up to the pixel data, where pydicom's
``stop_before_pixels`` stops, keeping the raw bytes of the wanted tags. Sequences of undefined
length are stepped over item by item (PS3.5 7.5).

It only answers when it is sure. :class:`NotSure` (Big Endian or deflated transfer syntaxes,
a wanted element of undefined length, tags out of order, malformed lengths...) sends the caller
to pydicom; ``None`` says the bytes given end before the scan could finish (a prefix of a file
still arriving); :class:`Truncated` says a whole file ends inside an element (pydicom would
quietly keep the part of the value it found).
"""

from __future__ import annotations

import struct

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_NOT_LITTLE_ENDIAN_EXPLICIT = {
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.95",  # JPIP Referenced Deflate
}
# VRs with a reserved field and a 4-byte length in Explicit VR (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(
    vr.encode()
    for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")
_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # tag, VR, 16-bit length (PS3.5 7.1.2)
_IMPLICIT_HEADER = struct.Struct("<HHI")  # tag, 32-bit length (PS3.5 7.1.3)


class NotSure(Exception):
    """The scan cannot vouch for its answer: read the file with pydicom."""


class Truncated(ValueError):
    """A whole file ends inside an element of its header."""


class _Short(Exception):
    """The bytes end inside an element."""


class Element:
    """A kept element: its VR as encoded (None in Implicit VR) and its raw value."""

    __slots__ = ("value", "vr")

    def __init__(self, vr: bytes | None, value: bytes) -> None:
        self.vr = vr
        self.value = value


def scan(
    data: bytes,
    wanted: frozenset[int],
    *,
    complete: bool,
    stop_after_wanted: bool = False,
    size: int | None = None,
    pixel_at: list[int] | None = None,
) -> tuple[str, dict[int, Element]] | None:
    """The transfer syntax and the wanted elements (``group << 16 | element``) of a Part 10
    file whose first bytes are ``data`` (all of it when ``complete``).

    Returns None when ``data`` is not complete and ends before the pixel data (before the first
    tag past the largest wanted one with ``stop_after_wanted``: tags ascend, PS3.5 7.1, so no
    wanted element can follow). Raises :class:`NotSure` when pydicom should decide,
    :class:`Truncated` for a complete ``data`` that ends inside an element.

    ``size``, the whole file's length in bytes (``len(data)`` when ``complete``), also checks
    that the pixel data element fits in the file: a defined length must end within it, and an
    encapsulated value (PS3.5 A.4) held in ``data`` must reach its Sequence Delimitation Item.
    A file cut inside its pixel data raises :class:`Truncated` (pydicom reads it without a word,
    and its frames would be short). Its pixels are not decoded.

    ``pixel_at``, when given, gets the offset of the pixel data element appended when the scan
    reaches it, for a later :func:`check_pixel_data` without scanning again."""
    if complete and size is None:
        size = len(data)
    try:
        if data[128:132] != b"DICM":
            raise NotSure("no DICM prefix")
        pos, transfer_syntax = _file_meta(data)
        if not transfer_syntax or transfer_syntax in _NOT_LITTLE_ENDIAN_EXPLICIT:
            raise NotSure(f"transfer syntax {transfer_syntax!r}")
        implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        last = max(wanted) if stop_after_wanted and wanted else None
        return transfer_syntax, _dataset(
            data, pos, implicit, wanted, complete, last, size, pixel_at
        )
    except _Short:
        if complete:
            raise Truncated("the file ends inside an element of its header") from None
        return None
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise NotSure(str(exc)) from exc


def _file_meta(data: bytes) -> tuple[int, str]:
    """Step over group 0002 (always Explicit VR Little Endian); return where the dataset starts
    and the Transfer Syntax UID."""
    pos, transfer_syntax = 132, ""
    while True:
        if pos + 6 > len(data):
            raise _Short
        group, element = _TAG.unpack_from(data, pos)
        if group != 0x0002:
            return pos, transfer_syntax
        value_pos, length = _explicit_length(data, pos)
        if length == _UNDEFINED:
            raise NotSure("File Meta Information element of undefined length")
        if value_pos + length > len(data):
            raise _Short
        if element == 0x0010:
            transfer_syntax = data[value_pos : value_pos + length].decode("ascii").strip("\x00 ")
        pos = value_pos + length


def _explicit_length(data: bytes, pos: int) -> tuple[int, int]:
    vr = data[pos + 4 : pos + 6]
    if len(vr) < 2:
        raise _Short
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise NotSure(f"not a VR: {vr!r}")
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Short
        return pos + 12, _U32.unpack_from(data, pos + 8)[0]
    if pos + 8 > len(data):
        raise _Short
    return pos + 8, _U16.unpack_from(data, pos + 6)[0]


def _element(data: bytes, pos: int, implicit: bool) -> tuple[bytes | None, int, int]:
    """The VR (None in Implicit VR), value position and value length of the element at pos."""
    if implicit:
        return None, pos + 8, _U32.unpack_from(data, pos + 4)[0]
    value_pos, length = _explicit_length(data, pos)
    return data[pos + 4 : pos + 6], value_pos, length


PIXEL_DATA_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))
"""Where pydicom's stop_before_pixels stops: (Float, Double Float) Pixel Data."""


def _dataset(
    data: bytes,
    pos: int,
    implicit: bool,
    wanted: frozenset[int],
    complete: bool,
    last: int | None = None,
    size: int | None = None,
    pixel_at: list[int] | None = None,
) -> dict[int, Element]:
    # The hot loop of every header scan: one struct call per element header, no helper calls.
    found: dict[int, Element] = {}
    previous = -1
    end = len(data)
    stop = 0xFFFFFFFF if last is None else last
    header = _IMPLICIT_HEADER.unpack_from if implicit else _EXPLICIT_HEADER.unpack_from
    u32 = _U32.unpack_from
    long_vrs = _LONG_VRS
    pixel_tags = PIXEL_DATA_TAGS
    while pos < end:
        if pos + 8 > end:
            raise _Short
        if implicit:
            group, element, length = header(data, pos)
            vr = None
        else:
            group, element, vr, length = header(data, pos)
        tag = group << 16 | element
        if tag in pixel_tags:
            if size is not None:
                _check_pixel_data(data, pos, implicit, size)
            if pixel_at is not None:
                pixel_at.append(pos)
            return found
        if tag > stop:
            return found
        if tag <= previous:
            raise NotSure(f"tag ({group:04X},{element:04X}) out of order")
        previous = tag
        value_pos = pos + 8
        if vr is not None:
            if vr in long_vrs:
                if pos + 12 > end:
                    raise _Short
                length = u32(data, pos + 8)[0]
                value_pos = pos + 12
            elif not (vr.isalpha() and vr.isupper()):
                raise NotSure(f"not a VR: {vr!r}")
        if length == _UNDEFINED:
            if tag in wanted:
                raise NotSure(f"({group:04X},{element:04X}) has an undefined length")
            # A UN of undefined length holds Implicit VR items (PS3.5 6.2.2).
            pos = _skip_items(data, value_pos, implicit or vr == b"UN")
            continue
        if value_pos + length > end:
            raise _Short
        if tag in wanted:
            if vr == b"SQ":
                raise NotSure(f"({group:04X},{element:04X}) is a sequence")
            found[tag] = Element(vr, data[value_pos : value_pos + length])
        pos = value_pos + length
    if not complete:
        raise _Short  # the pixel data, or more elements, may follow
    return found


def check_pixel_data(
    data: bytes, pos: int, transfer_syntax: str, size: int, *, expected: int | None = None
) -> None:
    """Raise :class:`Truncated` when the pixel data element at ``pos`` (where :func:`scan`
    found it, ``pixel_at``) of a file in ``transfer_syntax`` whose first bytes are ``data``
    does not fit in the file's ``size`` bytes (see :func:`scan`), or, with ``expected`` (the
    bytes native pixel data must hold), when its defined length is less; :class:`NotSure`
    when the bytes there are not an element header, or ``transfer_syntax`` is not one this
    module reads (big endian, deflated), as :func:`scan`."""
    if not transfer_syntax or transfer_syntax in _NOT_LITTLE_ENDIAN_EXPLICIT:
        raise NotSure(f"transfer syntax {transfer_syntax!r}")
    try:
        length = _check_pixel_data(data, pos, transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN, size)
        if expected is not None and length is not None and length < expected:
            raise Truncated(
                f"its pixel data holds {length} bytes where Rows, Columns, Samples per "
                f"Pixel, Number of Frames and Bits Allocated need {expected}"
            )
    except _Short:
        raise NotSure("the pixel data element header is not in the bytes given") from None
    except (struct.error, IndexError) as exc:
        raise NotSure(str(exc)) from exc


def _check_pixel_data(data: bytes, pos: int, implicit: bool, size: int) -> int | None:
    """Raise :class:`Truncated` when the pixel data element at ``pos`` does not fit in a file
    of ``size`` bytes whose first bytes are ``data``; return its defined length (None when
    undefined: encapsulated)."""
    _, value_pos, length = _element(data, pos, implicit)
    if length != _UNDEFINED:
        if value_pos + length > size:
            raise Truncated(
                f"the file ends inside its pixel data: {value_pos + length - size} of its "
                f"{length} bytes are missing"
            )
        return int(length)
    if size > len(data):
        return None  # an encapsulated value beyond the bytes given: not checked
    try:
        _skip_items(data, value_pos, True)
    except _Short:
        raise Truncated("the file ends inside its encapsulated pixel data") from None
    return None


def _skip_items(data: bytes, pos: int, implicit: bool) -> int:
    """Step over the items of a sequence of undefined length; return the position after its
    Sequence Delimitation Item."""
    while True:
        if pos + 8 > len(data):
            raise _Short
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        length = _U32.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise NotSure(f"({group:04X},{element:04X}) where an item was expected")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _skip_item_elements(data, pos, implicit)


def _skip_item_elements(data: bytes, pos: int, implicit: bool) -> int:
    """Step over the elements of an item of undefined length, to after its delimiter."""
    while True:
        if pos + 8 > len(data):
            raise _Short
        group, element = _TAG.unpack_from(data, pos)
        if group << 16 | element == _ITEM_END:
            return pos + 8
        vr, value_pos, length = _element(data, pos, implicit)
        if length == _UNDEFINED:
            pos = _skip_items(data, value_pos, implicit or vr == b"UN")
        else:
            pos = value_pos + length
