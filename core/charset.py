"""Text values under a Specific Character Set (0008,0005): decoding with a documented fallback,
and choosing the set an answer is written in (PS3.5 6.1, PS3.3 C.12.1.1.2, PS3.18 F.2).

pydicom knows the Defined Terms (single-byte sets, ISO 2022 code extensions with escape
sequences, UTF-8, GB18030, GBK) and does the decoding. What this module adds is one rule for
values that cannot be decoded as declared:

- an **unknown term** (a typo such as ``ISO_IR100`` is first corrected to ``ISO_IR 100``), or
- bytes that are **not valid** in the declared set (a wrongly declared set)

are decoded as UTF-8 when they are valid UTF-8 (the most common mislabel), otherwise as ISO 8859-1
(``ISO_IR 100``, which decodes any byte), and :class:`Decoded` carries a warning that says so.
Decoding therefore never fails, and no value is silently replaced by ``?``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.charset import ESC, convert_encodings, decode_bytes, python_encoding
from pydicom.valuerep import PersonName

UTF8 = "ISO_IR 192"
"""The Defined Term for UTF-8: what the node writes whenever a value is not plain ASCII."""
LATIN1 = "ISO_IR 100"
_PN_DELIMITERS = {0x5E, 0x3D}  # ^ and =: each resets an ISO 2022 code extension (PS3.5 6.1.2.5.3)
_TEXT_DELIMITERS = {0x5C, 0x09, 0x0A, 0x0C, 0x0D}
_ISO_IR = re.compile(r"^ISO[ _-]?IR[ _-]?(\d+)$")
_ISO_2022 = re.compile(r"^ISO[ _-]?2022[ _-]?IR[ _-]?(\d+)$")


@dataclass(frozen=True)
class Decoded:
    """A decoded value, and a warning when the fallback decided it (module docstring)."""

    text: str
    warning: str | None = None


def terms_of(value: Any) -> list[str]:
    """The Defined Terms of a Specific Character Set value (str, bytes, list or MultiValue);
    an empty first term (``\\ISO 2022 IR 87``) is kept: it names the default repertoire."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    items = value.split("\\") if isinstance(value, str) else [str(v) for v in value]
    terms = [item.strip(" \x00") for item in items]
    while terms and not terms[-1]:
        terms.pop()
    return terms


def _known(term: str) -> str | None:
    """The Defined Term as pydicom knows it, after correcting common misspellings; None when
    unknown."""
    if not term or term in python_encoding:
        return term
    upper = term.upper().strip()
    for pattern, form in ((_ISO_2022, "ISO 2022 IR {}"), (_ISO_IR, "ISO_IR {}")):
        match = pattern.match(upper)
        if match and form.format(match.group(1)) in python_encoding:
            return form.format(match.group(1))
    return upper if upper in python_encoding else None


def python_encodings(terms: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """(Python codec names for ``terms``, the terms that are not Defined Terms). Codecs are
    None when any term is unknown; no terms mean the default repertoire (ASCII, read as
    ISO 8859-1 as pydicom does)."""
    known = [_known(term) for term in terms]
    unknown = [term for term, k in zip(terms, known, strict=True) if k is None]
    if unknown:
        return None, unknown
    if not terms:
        return ["iso8859"], []
    return convert_encodings([k or "" for k in known]), []


def _fallback(raw: bytes, why: str) -> Decoded:
    try:
        return Decoded(raw.decode("utf-8"), f"{why}: read as UTF-8")
    except UnicodeDecodeError:
        return Decoded(raw.decode("latin-1"), f"{why}: read as ISO 8859-1 ({LATIN1})")


def decode(raw: bytes, charset: Any, *, vr: str = "LO") -> Decoded:
    """Decode one element value (all its values, backslash-separated) declared in ``charset``
    (the dataset's Specific Character Set, any form :func:`terms_of` takes). Never raises."""
    text = raw.rstrip(b"\x00 ") if vr != "UT" else raw.rstrip(b"\x00")
    if text.isascii() and ESC not in text:
        return Decoded(text.decode("ascii"))
    terms = terms_of(charset)
    encodings, unknown = python_encodings(terms)
    if encodings is None:
        return _fallback(text, f"unknown Specific Character Set {', '.join(map(repr, unknown))}")
    declared = "\\".join(terms) or "the default repertoire"
    if ESC not in text:
        # Without escape sequences only the first set is in use (PS3.5 6.1.2.5.3).
        try:
            return Decoded(text.decode(encodings[0]))
        except (UnicodeDecodeError, LookupError):
            return _fallback(text, f"not valid {declared}")
    try:
        if vr == "PN":
            value = str(PersonName(text, encodings=encodings))
        else:
            value = decode_bytes(text, encodings, _TEXT_DELIMITERS)
    except (UnicodeDecodeError, LookupError, ValueError):
        return _fallback(text, f"not valid {declared}")
    if "\ufffd" in value:  # pydicom replaced what it could not decode
        return _fallback(text, f"not valid {declared}")
    return Decoded(value)


def can_encode(texts: Iterable[str], charset: Any) -> bool:
    """Whether every character of every text has a code in one of ``charset``'s sets (with
    ISO 2022 code extensions, each character may come from any of the sets named)."""
    terms = terms_of(charset)
    encodings, _ = python_encodings(terms)
    if encodings is None:
        return False
    if not terms or terms[0] in ("", "ISO 2022 IR 6"):
        encodings = ["ascii", *encodings[1:]]  # the default repertoire is ASCII only
    for text in texts:
        if text.isascii():
            continue
        for char in set(text):
            if char.isascii():
                continue
            if not any(_encodes(char, encoding) for encoding in encodings):
                return False
    return True


def _encodes(char: str, encoding: str) -> bool:
    try:
        char.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def answer_charset(texts: Sequence[str], requested: Any) -> str | list[str] | None:
    """The Specific Character Set to answer in: the requester's when it can encode every text
    (PS3.4 C.4.1.1.3.2: the response uses the request's character set), else UTF-8 when
    anything is not ASCII, else None (the default repertoire needs no attribute)."""
    terms = terms_of(requested)
    if terms and can_encode(texts, terms):
        return terms[0] if len(terms) == 1 else terms
    if all(text.isascii() for text in texts):
        return None
    return UTF8
