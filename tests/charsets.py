"""Synthetic person names in the character sets the node must read (PS3.5 6.1, Annex H-K),
and a way to give a Part 10 file any Specific Character Set with the name's encoded bytes.

The names are made up. ``expected`` is what the node must show for ``encoded`` under ``terms``;
for the unknown term it is the documented fallback (the bytes read as UTF-8).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom.valuerep import PersonName

PLACEHOLDER = "Placeholder^Name^Xyzzy"


@dataclass(frozen=True)
class CharsetCase:
    id: str
    terms: tuple[str, ...]
    expected: str
    encoded: bytes
    given_name_group: str
    """A component group of the name that a search for it finds (its ideographic one if any)."""

    @property
    def charset_value(self) -> bytes:
        return "\\".join(self.terms).encode("ascii")


def _pn(value: str, encodings: list[str]) -> bytes:
    return bytes(PersonName(value).encode(encodings))


_JP = "Yamada^Tarou=山田^太郎=やまだ^たろう"
_KR = "Hong^Gildong=洪^吉洞=홍^길동"
_CN = "Wang^Xiaodong=王^小东"
CASES = (
    CharsetCase(
        "ISO_IR 100",
        ("ISO_IR 100",),
        "Müller^Jürgen",
        "Müller^Jürgen".encode("latin-1"),
        "Müller^Jürgen",
    ),
    CharsetCase(
        "ISO_IR 192", ("ISO_IR 192",), "Ελληνικά^Ελένη", "Ελληνικά^Ελένη".encode(), "Ελληνικά^Ελένη"
    ),
    CharsetCase(
        "ISO 2022 IR 87",
        ("", "ISO 2022 IR 87"),
        _JP,
        _pn(_JP, ["iso8859", "iso2022_jp"]),
        "山田^太郎",
    ),
    CharsetCase(
        "ISO 2022 IR 149", ("", "ISO 2022 IR 149"), _KR, _pn(_KR, ["iso8859", "euc_kr"]), "洪^吉洞"
    ),
    CharsetCase("GB18030", ("GB18030",), _CN, _CN.encode("gb18030"), "王^小东"),
    CharsetCase("unknown term", ("ISO_IR 999",), "Núñez^José", "Núñez^José".encode(), "Núñez^José"),
)


def _replace_element(data: bytes, tag: int, vr: bytes, old: bytes, new: bytes) -> bytes:
    """Replace one Explicit VR Little Endian element (2-byte length) of value ``old``."""
    pad = b" " if len(new) % 2 else b""
    group, element = tag >> 16, tag & 0xFFFF
    before = struct.pack("<HH", group, element) + vr + struct.pack("<H", len(old)) + old
    after = struct.pack("<HH", group, element) + vr + struct.pack("<H", len(new + pad)) + new + pad
    assert data.count(before) == 1, f"element {tag:08X} with {old!r} not found once"
    return data.replace(before, after)


def recode(path: Path, case: CharsetCase, *, old_charset: bytes = b"ISO_IR 100") -> None:
    """Rewrite a file written with PatientName ``PLACEHOLDER`` and SpecificCharacterSet
    ``old_charset`` (Explicit VR Little Endian) to carry ``case``'s character set and name."""
    data = path.read_bytes()
    old_pn = PLACEHOLDER.encode() + (b" " if len(PLACEHOLDER) % 2 else b"")
    data = _replace_element(data, 0x00100010, b"PN", old_pn, case.encoded)
    old_cs = old_charset + (b" " if len(old_charset) % 2 else b"")
    data = _replace_element(data, 0x00080005, b"CS", old_cs, case.charset_value)
    path.write_bytes(data)
