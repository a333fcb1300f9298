"""``multipart/related`` (RFC 2387) bodies for DICOMweb: parse uploads, write responses.

STOW-RS (PS3.18 10.5) sends one DICOM Part 10 file per part; WADO-RS (PS3.18 10.4) answers with
one part per instance, frame or bulk data value; ``/infer_file`` uploads are ``multipart/form-data``
(api/uploads.py reads them through :func:`iter_parts` too). Parsing streams: python-multipart's
parser is fed the request body chunk by chunk and a part is handed on as soon as it ends, so a
request holds at most one part (spilled to a temporary file past ``spill_bytes``) and is bounded by
``max_bytes``. A preamble before the first delimiter and an epilogue after the last are ignored
(RFC 2046 5.1.1); header parameters are parsed by python-multipart too.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from nnunet_node.core.errors import InvalidRequest, PayloadTooLarge

LOGGER = logging.getLogger(__name__)

CRLF = b"\r\n"
DEFAULT_SPILL_BYTES = 8 * 1024 * 1024
MAX_BOUNDARY_LENGTH = 70  # RFC 2046 5.1.1


@dataclass(frozen=True)
class MediaType:
    """A parsed ``Content-Type`` or ``Accept`` entry: ``type/subtype; name=value; ...``."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def essence(self) -> str:
        return self.type

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name.lower(), default)


def parse_media_type(value: str) -> MediaType:
    """Parse one media type with parameters (RFC 9110 8.3.1, RFC 2045 5.1: parameters in any
    order, quoted or not) by python-multipart's header parser; the type and parameter names are
    lower-cased, parameter values (a boundary is case-sensitive) are kept as sent."""
    media, params = parse_options_header(value)
    return MediaType(
        media.decode("latin-1").strip().lower(),
        {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()},
    )


def split_accept(value: str | None) -> list[MediaType]:
    """The entries of an ``Accept`` header, ``*/*`` when absent or empty (RFC 9110 12.5.1)."""
    if not value or not value.strip():
        return [MediaType("*/*")]
    entries: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
    entries.append("".join(current))
    return [parse_media_type(e) for e in entries if e.strip()]


@dataclass
class Part:
    """One body part: its headers (names lower-cased) and its bytes, in memory or in a file."""

    index: int
    headers: dict[str, str]
    data: bytes | None = None
    path: Path | None = None
    size: int = 0

    @property
    def content_type(self) -> MediaType | None:
        raw = self.headers.get("content-type")
        return parse_media_type(raw) if raw else None

    def payload(self) -> bytes | Path:
        """What :meth:`storage.archive.Archive.ingest` takes: the bytes, or the spill file."""
        if self.path is not None:
            return self.path
        return self.data or b""

    def read(self) -> bytes:
        if self.path is not None:
            return self.path.read_bytes()
        return self.data or b""

    def discard(self) -> None:
        """Remove the spill file, if any."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class _PartCollector:
    """Callbacks for python-multipart's parser that gather finished parts."""

    def __init__(
        self, spill_bytes: int, spill_dir: Path | None, max_part_bytes: int | None = None
    ) -> None:
        self.spill_bytes = spill_bytes
        self.max_part_bytes = max_part_bytes
        self.spill_dir = spill_dir
        self.finished: list[Part] = []
        self.ended = False
        self.count = 0
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._buffer = bytearray()
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._size = 0
        self._open = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._buffer = bytearray()
        self._size = 0
        self._open = True

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field = bytearray()
        self._value = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self._size += len(chunk)
        if self.max_part_bytes is not None and self._size > self.max_part_bytes:
            raise PayloadTooLarge(
                f"a part is over the limit of {self.max_part_bytes // (1024 * 1024)} MB"
            )
        if self._file is not None:
            self._file.write(chunk)
            return
        self._buffer += chunk
        if len(self._buffer) > self.spill_bytes:
            if self.spill_dir is not None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="multipart-", suffix=".part", dir=self.spill_dir)
            self._file = os.fdopen(fd, "wb")
            self._path = Path(name)
            self._file.write(self._buffer)
            self._buffer = bytearray()

    def _part_end(self) -> None:
        part = Part(index=self.count, headers=self._headers, size=self._size)
        if self._file is not None:
            self._file.close()
            part.path = self._path
            self._file = None
            self._path = None
        else:
            part.data = bytes(self._buffer)
        self._buffer = bytearray()
        self._open = False
        self.count += 1
        self.finished.append(part)

    def _end(self) -> None:
        self.ended = True

    @property
    def in_part(self) -> bool:
        return self._open

    def abort(self) -> None:
        """Drop the unfinished part (its spill file too) and any finished ones not yet taken."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        for part in self.finished:
            part.discard()
        self.finished.clear()


def boundary_of(content_type: MediaType) -> bytes:
    """The ``boundary`` parameter, checked against RFC 2046 (1 to 70 characters)."""
    boundary = content_type.param("boundary")
    if not boundary or len(boundary) > MAX_BOUNDARY_LENGTH:
        raise InvalidRequest("multipart/related needs a boundary parameter of 1 to 70 characters")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError as exc:
        raise InvalidRequest("the multipart boundary must be ASCII") from exc


class _Preamble:
    """Drops what comes before the first delimiter (RFC 2046 5.1.1: the preamble, to be
    ignored), which python-multipart's parser does not accept. The delimiter is ``--boundary``
    at the start of the body or after a CRLF (the CRLF belongs to the delimiter)."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"--" + boundary
        self.pending = b""
        self.at_start = True
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes from the first delimiter on (empty while it has not arrived)."""
        if self.done:
            return chunk
        data = self.pending + chunk
        if self.at_start:
            if data.startswith(self.delimiter):
                self.done = True
                return data
            if self.delimiter.startswith(data):
                self.pending = data  # perhaps the delimiter, still arriving
                return b""
            self.at_start = False
        found = data.find(CRLF + self.delimiter)
        if found >= 0:
            self.done = True
            return data[found + len(CRLF) :]
        self.pending = data[-(len(self.delimiter) + len(CRLF) - 1) :]  # may straddle chunks
        return b""


async def iter_parts(
    chunks: AsyncIterator[bytes],
    boundary: bytes,
    *,
    max_bytes: int,
    max_part_bytes: int | None = None,
    spill_bytes: int = DEFAULT_SPILL_BYTES,
    spill_dir: Path | None = None,
) -> AsyncIterator[Part]:
    """Yield each part of a ``multipart/related`` body (RFC 2046 5.1: preamble and epilogue
    ignored) as soon as its closing delimiter arrives.

    Raises :class:`PayloadTooLarge` once more than ``max_bytes`` arrived (or one part passed
    ``max_part_bytes``): every part that ended within the limit is yielded first, the part the
    limit cut is dropped (with its spill file).
    Raises :class:`InvalidRequest` for a body that is not multipart or ends inside a part (parts
    that ended before are yielded first, so the caller keeps what it stored).
    The caller owns yielded parts and calls :meth:`Part.discard` when done.
    """
    collector = _PartCollector(spill_bytes, spill_dir, max_part_bytes)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    preamble = _Preamble(boundary)
    received = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            over = received + len(chunk) > max_bytes
            if over:
                chunk = chunk[: max_bytes - received]  # parts that end within the limit count
            received += len(chunk)
            try:
                parser.write(preamble.feed(chunk))
            except MultipartParseError as exc:
                raise InvalidRequest(f"malformed multipart/related body: {exc}") from exc
            while collector.finished:
                yield collector.finished.pop(0)
            if collector.ended:
                break
            if over:
                raise PayloadTooLarge(
                    f"the request body is over the limit of {max_bytes // (1024 * 1024)} MB"
                )
        if not collector.ended:
            if collector.count == 0 and not collector.in_part:
                raise InvalidRequest("the body holds no multipart/related part with that boundary")
            raise InvalidRequest("the multipart/related body ends before its closing boundary")
    finally:
        collector.abort()


def new_boundary() -> str:
    return uuid.uuid4().hex


def multipart_content_type(part_type: str, boundary: str, **params: str) -> str:
    """The ``Content-Type`` of a ``multipart/related`` response (PS3.18 8.7.3.1)."""
    extra = "".join(f"; {name.replace('_', '-')}={value}" for name, value in params.items())
    return f'multipart/related; type="{part_type}"; boundary={boundary}{extra}'


def part_header(boundary: str, content_type: str, *, location: str | None = None) -> bytes:
    """The delimiter and headers before one part's bytes."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return CRLF + CRLF.join(line.encode("latin-1") for line in lines) + CRLF + CRLF


def closing_delimiter(boundary: str) -> bytes:
    return CRLF + f"--{boundary}--".encode("latin-1") + CRLF


def encode_parts(boundary: str, parts: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[bytes]:
    """Write a ``multipart/related`` body from (content type, byte chunks) pairs, lazily.

    Each part begins with CRLF + delimiter (RFC 2046 5.1.1: the CRLF before a delimiter belongs
    to the delimiter), so part data needs no trailing newline of its own.
    """
    for content_type, chunks in parts:
        yield part_header(boundary, content_type)
        yield from chunks
    yield closing_delimiter(boundary)
