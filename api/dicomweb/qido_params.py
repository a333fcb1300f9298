"""QIDO-RS query parameters (PS3.18 8.3.4 and 10.6.1.2), parsed and checked before any SQL runs.

Attribute keys are keywords or 8-digit tags (``PatientID`` or ``00100020``); values keep the
C-FIND matching syntax of PS3.4 C.2.2.2 that :mod:`storage.matching` implements (``*``/``?``
wildcards, ``a-b`` ranges, UID lists), except that a UID list may also be comma-separated in a URL
(PS3.18 8.3.4.1), which is turned into the backslash form here. A key that is no DICOM attribute,
a malformed date range, or a bad ``limit``/``offset`` is a 400.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.tag import BaseTag

from nnunet_node.api.dicomweb.dicom_json import keyword_or_tag
from nnunet_node.core.errors import InvalidRequest

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
"""Without ``limit``, at most this many results (PS3.18 8.3.4.4 lets the origin server cap them)."""

IGNORED = frozenset({"emptyvaluematching", "multiplevaluematching", "charset"})
"""PS3.18 8.3.4 parameters accepted and not acted on (the defaults apply)."""

_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


@dataclass
class QidoParams:
    """A checked QIDO-RS request: matching keys by keyword, what to return, which page."""

    filters: dict[str, str] = field(default_factory=dict)
    includefields: set[str] = field(default_factory=set)
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    fuzzy: bool = False


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise InvalidRequest(f"{name} must be true or false, not {value[:40]!r}")


def _int(name: str, value: str, *, maximum: int) -> int:
    try:
        number = int(value.strip())
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be a whole number, not {value[:40]!r}") from exc
    if number < 0 or number > maximum:
        raise InvalidRequest(f"{name} must be between 0 and {maximum}, got {number}")
    return number


_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
"""Value representations of bulk data: never a matching key (PS3.4 C.2.2.2) nor a QIDO-RS
result attribute (PS3.18 10.6.1.2.3 returns none of them; WADO-RS serves them)."""


def _keyword(key: str) -> tuple[str, str]:
    """A query key to (keyword, VR), or 400 naming it (also for bulk data: PixelData,
    whose VR "OB or OW" would be no valid VR of a DICOM JSON result, PS3.18 F.2.2)."""
    tag: BaseTag | None = keyword_or_tag(key)
    keyword = keyword_for_tag(tag) if tag is not None else ""
    if tag is None or not keyword:
        raise InvalidRequest(f"{key[:80]!r} is not a DICOM attribute keyword or tag")
    vr = dictionary_VR(tag)
    if _BULK_VRS.intersection(vr.split(" or ")):
        raise InvalidRequest(
            f"{keyword} is bulk data (VR {vr}): QIDO-RS neither matches nor returns it; "
            "WADO-RS serves it"
        )
    return keyword, vr


def _check_date_part(keyword: str, vr: str, part: str) -> None:
    if not part:
        return
    pattern = {"DA": _DA, "TM": _TM}[vr]
    if not pattern.match(part):
        raise InvalidRequest(f"{keyword}: {part[:40]!r} is not a valid {vr} value")
    if vr == "DA":
        try:
            dt.date(int(part[:4]), int(part[4:6]), int(part[6:8]))
        except ValueError as exc:
            raise InvalidRequest(f"{keyword}: {part} is not a calendar date") from exc


def _check_value(keyword: str, vr: str, value: str) -> str:
    """Check date/time ranges (PS3.4 C.2.2.2.5); make comma UID lists backslash lists."""
    if vr == "DT":
        # a hyphen may also start a UTC offset: check the characters only
        if not re.fullmatch(r"[0-9.+-]+", value):
            raise InvalidRequest(f"{keyword}: {value[:40]!r} is not a date-time or range")
        return value
    if vr in ("DA", "TM"):
        if value.count("-") > 1:
            raise InvalidRequest(f"{keyword}: {value[:40]!r} is not a date/time range")
        parts = value.split("-", 1)
        if len(parts) == 2 and not parts[0] and not parts[1]:
            raise InvalidRequest(f"{keyword}: a range needs at least one end")
        for part in parts:
            _check_date_part(keyword, vr, part)
        if len(parts) == 2 and parts[0] and parts[1] and vr == "DA" and parts[0] > parts[1]:
            raise InvalidRequest(f"{keyword}: range {value} ends before it starts")
        return value
    if vr == "UI":
        uids = [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]
        for uid in uids:
            if len(uid) > 64 or not re.fullmatch(r"[0-9.]+", uid):
                raise InvalidRequest(f"{keyword}: {uid[:80]!r} is not a UID")
        return "\\".join(uids)
    if vr == "SQ":
        raise InvalidRequest(f"{keyword} is a sequence; matching on sequences is not supported")
    return value


def parse_qido(params: Iterable[tuple[str, str]]) -> QidoParams:
    """Parse a query string's pairs; raises InvalidRequest naming the key at fault."""
    out = QidoParams()
    for raw_key, value in params:
        key = raw_key.strip()
        lowered = key.lower()
        if lowered == "limit":
            out.limit = _int("limit", value, maximum=MAX_LIMIT)
        elif lowered == "offset":
            out.offset = _int("offset", value, maximum=2**31 - 1)
        elif lowered == "fuzzymatching":
            out.fuzzy = _bool("fuzzymatching", value)
        elif lowered in IGNORED:
            continue
        elif lowered == "includefield":
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                if item.lower() == "all":
                    out.include_all = True
                else:
                    out.includefields.add(_keyword(item)[0])
        elif "." in key:
            raise InvalidRequest(f"{key[:80]!r}: matching inside sequences is not supported")
        else:
            keyword, vr = _keyword(key)
            if keyword in out.filters:
                raise InvalidRequest(f"{keyword} is given more than once")
            out.filters[keyword] = _check_value(keyword, vr, value)
    return out
