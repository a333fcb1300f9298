"""Reading single frames and bulk data values out of stored files, without loading the rest.

The file is parsed with ``defer_size`` so pixel data is not read; a native (uncompressed) frame is
then one ``seek`` and ``read`` at its offset, an encapsulated frame is found through pydicom's
fragment parser (PS3.5 A.4) from the start of the value. Deflated files (PS3.5 A.5) are the one
case read whole, as their offsets do not map onto the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.encaps import get_frame
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from nnunet_node.core.errors import ClientError, NotAcceptable, NotFound

LOGGER = logging.getLogger(__name__)

PIXEL_DATA = Tag(0x7FE00010)
NATIVE_LITTLE_ENDIAN = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}

# PS3.18 8.7.3.5.3 (Table 8.7.3-5): the media type of a frame in each compressed transfer syntax.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}


@dataclass(frozen=True)
class PixelInfo:
    transfer_syntax: str
    number_of_frames: int
    native: bool
    """Uncompressed little endian: frames are served as ``application/octet-stream`` as stored."""


class BulkValue:
    """Where one top-level element's value lies in a file, read lazily in chunks."""

    def __init__(self, path: Path, tag: int) -> None:
        ds = _read_deferred(path)
        raw = ds.get_item(Tag(tag), keep_deferred=True)
        if raw is None:
            raise NotFound(f"the instance has no element {tag:08X}")
        self.path = path
        self.transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        self.vr = raw.VR or "UN"
        self._inline: bytes | None = None
        self._offset = 0
        self._length = 0
        deflated = self.transfer_syntax == str(DeflatedExplicitVRLittleEndian)
        unread = raw if isinstance(raw, RawDataElement) else None
        self.encapsulated = unread is not None and _undefined(unread)
        if unread is not None and unread.value is None and not self.encapsulated and not deflated:
            self._offset, self._length = int(unread.value_tell or 0), int(unread.length)
        else:
            value = ds[Tag(tag)].value
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, bytes | bytearray):
                raise NotFound(f"element {tag:08X} holds no bulk data")
            self._inline = bytes(value)

    def chunks(self, size: int = 1 << 16) -> Iterator[bytes]:
        """The value's bytes in chunks, read from the file as the response is sent."""
        if self._inline is not None:
            yield self._inline
            return
        remaining = self._length
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            while remaining > 0:
                block = fh.read(min(size, remaining))
                if not block:
                    break
                remaining -= len(block)
                yield block


def _undefined(raw: RawDataElement) -> bool:
    return int(raw.length) == 0xFFFFFFFF


def _read_deferred(path: Path) -> pydicom.Dataset:
    """The dataset with values over 256 bytes left in the file (all of it if deflated)."""
    ds = pydicom.dcmread(path, defer_size=256)
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == str(DeflatedExplicitVRLittleEndian):
        ds = pydicom.dcmread(path)
    return ds


def _frame_count(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def read_frames(path: Path, numbers: list[int]) -> tuple[PixelInfo, list[bytes]]:
    """:func:`_read_frames`, with a malformed pixel module (no Rows, too few fragments) as 404."""
    try:
        return _read_frames(path, numbers)
    except ClientError:
        raise
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise NotFound(f"the instance's pixel data cannot be cut into frames: {exc}") from exc


def _read_frames(path: Path, numbers: list[int]) -> tuple[PixelInfo, list[bytes]]:
    """The listed frames (1-based, PS3.18 10.4.1.1.5) of the instance at ``path``.

    Native frames come back as stored; with Bits Allocated 1 (binary SEG) each frame is cut out
    of the bit stream and starts on a byte boundary. Encapsulated frames come back compressed.
    Raises NotFound for an instance without pixel data or a frame number past the last.
    """
    ds = _read_deferred(path)
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if raw is None:
        raise NotFound("the instance has no pixel data")
    ts = str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    count = _frame_count(ds)
    bad = [n for n in numbers if n < 1 or n > count]
    if bad:
        raise NotFound(f"frame {bad[0]} does not exist; the instance has {count} frame(s)")
    unread = raw if isinstance(raw, RawDataElement) else None
    encapsulated = unread is not None and _undefined(unread)
    if ts == str(ExplicitVRBigEndian):
        raise NotAcceptable("frames of big endian instances are not served; retrieve the instance")
    if encapsulated:
        info = PixelInfo(ts, count, native=False)
        if unread is None or unread.value is not None or ts == str(DeflatedExplicitVRLittleEndian):
            data = ds.PixelData  # pydicom reads undefined-length values whole
            return info, [get_frame(data, n - 1, number_of_frames=count) for n in numbers]
        with open(path, "rb") as fh:
            frames = []
            for n in numbers:
                fh.seek(int(unread.value_tell or 0))
                frames.append(get_frame(fh, n - 1, number_of_frames=count))
        return info, frames
    info = PixelInfo(ts, count, native=True)
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    frame_bits = rows * cols * samples * bits
    offset: int | None = None
    inline = None
    if unread is not None and unread.value is None and ts != str(DeflatedExplicitVRLittleEndian):
        offset = int(unread.value_tell or 0)
    else:
        inline = bytes(ds.PixelData)
    frames = []
    with open(path, "rb") as fh:
        for n in numbers:
            start_bit = (n - 1) * frame_bits
            first, last = start_bit // 8, -(-(start_bit + frame_bits) // 8)
            if offset is None:
                chunk = (inline or b"")[first:last]
            else:
                fh.seek(offset + first)
                chunk = fh.read(last - first)
            if bits % 8 == 0:
                frames.append(chunk)
            else:
                frames.append(_realign_bits(chunk, start_bit % 8, frame_bits))
    return info, frames


def _realign_bits(chunk: bytes, offset: int, count: int) -> bytes:
    """``count`` bits starting ``offset`` bits into ``chunk`` (PS3.5 8.1.1: little bit order)."""
    bits = np.unpackbits(np.frombuffer(chunk, dtype=np.uint8), bitorder="little")
    return np.packbits(bits[offset : offset + count], bitorder="little").tobytes()


def frame_media_type(transfer_syntax: str) -> str:
    return FRAME_MEDIA_TYPES.get(transfer_syntax, "application/octet-stream")


def is_native(transfer_syntax: str | UID) -> bool:
    return str(transfer_syntax) in NATIVE_LITTLE_ENDIAN
