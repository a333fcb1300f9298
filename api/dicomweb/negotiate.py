"""Accept header negotiation for WADO-RS (PS3.18 8.7).

Instances are served as stored (their transfer syntax named in each part's ``Content-Type``) when
the client accepts ``transfer-syntax=*``, names the stored syntax, or names none; an instance stored
in Implicit VR Little Endian is re-encoded as Explicit VR Little Endian (lossless) when that is what
the client asks for. Anything else the node cannot produce is 406 Not Acceptable: it does not
decompress or compress pixel data.
"""

from __future__ import annotations

from enum import Enum

from nnunet_node.api.dicomweb.frames import frame_media_type, is_native
from nnunet_node.api.dicomweb.multipart import MediaType, split_accept
from nnunet_node.core.errors import NotAcceptable

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DICOM = "application/dicom"
OCTET = "application/octet-stream"
JSON_TYPES = ("application/dicom+json", "application/json")


class Delivery(Enum):
    AS_STORED = "as stored"
    TO_EXPLICIT_LE = "to explicit VR little endian"


def _part_type(entry: MediaType) -> tuple[str, str | None]:
    """(part media type, transfer syntax) of one Accept entry; ``multipart/related`` unwrapped."""
    if entry.type == "multipart/related":
        return (entry.param("type") or "*/*").lower(), entry.param("transfer-syntax")
    return entry.type, entry.param("transfer-syntax")


def _types_match(offered: str, wanted: str) -> bool:
    if wanted in ("*/*", "*"):
        return True
    if wanted.endswith("/*"):
        return offered.split("/")[0] == wanted[:-2]
    return offered == wanted


def instance_delivery(accept: str | None, stored_ts: str) -> Delivery:
    """How to send an instance stored in ``stored_ts``; raises NotAcceptable."""
    for entry in split_accept(accept):
        part_type, ts = _part_type(entry)
        if not _types_match(DICOM, part_type):
            continue
        if ts in (None, "*", stored_ts):
            return Delivery.AS_STORED
        if ts == EXPLICIT_LE and stored_ts == IMPLICIT_LE:
            return Delivery.TO_EXPLICIT_LE
    raise NotAcceptable(
        f"cannot serve an instance stored as {stored_ts} in any accepted form "
        "(accepted: application/dicom as stored, or transfer-syntax=*)"
    )


def frame_content_type(accept: str | None, stored_ts: str) -> str:
    """The part ``Content-Type`` for frames stored in ``stored_ts``; raises NotAcceptable.

    Native frames are ``application/octet-stream`` (PS3.18 8.7.3.5.3, Explicit VR Little Endian
    bytes); compressed frames go out as stored, under their image media type or, when the client
    asked for ``application/octet-stream; transfer-syntax=*`` (OHIF's default), under that type
    with the transfer syntax named.
    """
    native = is_native(stored_ts)
    image_type = frame_media_type(stored_ts)
    for entry in split_accept(accept):
        part_type, ts = _part_type(entry)
        if native:
            if _types_match(OCTET, part_type) and ts in (None, "*", EXPLICIT_LE, stored_ts):
                return f"{OCTET}; transfer-syntax={EXPLICIT_LE}"
            continue
        if ts not in (None, "*", stored_ts):
            continue
        if part_type == OCTET and ts is not None:
            return f"{OCTET}; transfer-syntax={stored_ts}"
        if part_type != OCTET and _types_match(image_type, part_type):
            return f"{image_type}; transfer-syntax={stored_ts}"
    what = "uncompressed" if native else f"compressed ({stored_ts})"
    raise NotAcceptable(
        f"the frames are {what}; accept application/octet-stream"
        + ("" if native else f" with transfer-syntax=* or {image_type}")
    )


def bulk_content_type(accept: str | None) -> str:
    """Bulk data values go out as ``application/octet-stream`` parts (PS3.18 8.7.3.5.1)."""
    for entry in split_accept(accept):
        part_type, _ = _part_type(entry)
        if _types_match(OCTET, part_type):
            return OCTET
    raise NotAcceptable("bulk data is served as application/octet-stream")


def wants_json(accept: str | None) -> None:
    """Metadata and searches answer DICOM JSON only; raise NotAcceptable otherwise."""
    for entry in split_accept(accept):
        if any(_types_match(t, entry.type) for t in JSON_TYPES):
            return
    raise NotAcceptable("only application/dicom+json is served (no XML)")
