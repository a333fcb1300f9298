"""WADO-RS, the Studies Retrieve transaction (PS3.18 10.4): instances, metadata, frames, bulk data.

Everything is streamed: instance files go out in pieces of up to 4 MiB, metadata one instance at
a time, and every file read happens in Starlette's thread pool (a sync iterator given to
``StreamingResponse``), so a large study never blocks the event loop or sits in memory.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from nnunet_node.api.deps import ContextDep
from nnunet_node.api.dicomweb.common import check_uid, context_parts, instance_url, service_url
from nnunet_node.api.dicomweb.dicom_json import MEDIA_TYPE, MetadataCache
from nnunet_node.api.dicomweb.frames import BulkValue, read_frames
from nnunet_node.api.dicomweb.multipart import (
    closing_delimiter,
    encode_parts,
    multipart_content_type,
    new_boundary,
    part_header,
)
from nnunet_node.api.dicomweb.negotiate import (
    DICOM,
    EXPLICIT_LE,
    Delivery,
    bulk_content_type,
    frame_content_type,
    instance_delivery,
    wants_json,
)
from nnunet_node.core.errors import InvalidRequest, NotFound
from nnunet_node.storage.query import instance_refs

LOGGER = logging.getLogger(__name__)

router = APIRouter()

CHUNK = 4 << 20
"""Bytes per piece of a multipart response (see ``_instances_body``)."""
MAX_FRAMES_PER_REQUEST = 10_000


@dataclass(frozen=True)
class Located:
    """One stored instance a retrieve names."""

    study: str
    series: str
    sop: str
    transfer_syntax: str
    path: Path


def locate(
    factory: sessionmaker[Session],
    archive_root: Path,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> list[Located]:
    """The stored instances of a study, series or instance, in series and instance order
    (:func:`storage.query.instance_refs`); NotFound when there are none."""
    with factory() as session:
        if sop is not None:
            refs = instance_refs(session, "IMAGE", sop, study_uid=study, series_uid=series)
        elif series is not None:
            refs = instance_refs(session, "SERIES", series, study_uid=study)
        else:
            refs = instance_refs(session, "STUDY", study)
    if not refs:
        what = f"instance {sop}" if sop else (f"series {series}" if series else f"study {study}")
        raise NotFound(f"{what} is not in the archive" + (f" (study {study})" if series else ""))
    return [
        Located(
            r.study_instance_uid,
            r.series_instance_uid,
            r.sop_instance_uid,
            r.transfer_syntax_uid or EXPLICIT_LE,
            archive_root / r.path,
        )
        for r in refs
    ]


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(CHUNK):
            yield block


def _explicit_le(path: Path) -> bytes:
    """Re-encode an Implicit VR Little Endian file as Explicit VR Little Endian (lossless)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def _instances_body(
    items: list[Located], deliveries: list[Delivery], boundary: str
) -> Iterator[bytes]:
    """The multipart body, in pieces of about :data:`CHUNK` bytes: whole parts (header and
    file) are gathered until a piece is that large, and a larger file is read in pieces of that
    size. Each piece is one step of Starlette's thread pool and one write to the connection,
    so fewer, larger pieces cost less per byte (64 KiB pieces took ~3x the CPU per series)."""
    pending: list[bytes] = []
    size = 0
    for item, delivery in zip(items, deliveries, strict=True):
        ts = item.transfer_syntax if delivery is Delivery.AS_STORED else EXPLICIT_LE
        try:
            if delivery is Delivery.AS_STORED:
                chunks: Iterator[bytes] = _file_chunks(item.path)
                first = next(chunks, b"")
            else:
                first, chunks = _explicit_le(item.path), iter(())
        except OSError:
            LOGGER.error("WADO-RS: %s is indexed but its file is unreadable", item.path)
            continue  # the response has started: leave the part out rather than break it
        pending += (part_header(boundary, f"{DICOM}; transfer-syntax={ts}"), first)
        size += len(first)
        for block in chunks:  # a file larger than CHUNK
            yield b"".join(pending)
            pending, size = [block], len(block)
        if size >= CHUNK:
            yield b"".join(pending)
            pending, size = [], 0
    pending.append(closing_delimiter(boundary))
    yield b"".join(pending)


async def _retrieve(
    request: Request, context: Any, study: str, series: str | None, sop: str | None
) -> StreamingResponse:
    _, factory, archive = context_parts(context)
    items = await run_in_threadpool(locate, factory, archive.root, study, series, sop)
    accept = request.headers.get("accept")
    deliveries = [instance_delivery(accept, item.transfer_syntax) for item in items]
    boundary = new_boundary()
    return StreamingResponse(
        _instances_body(items, deliveries, boundary),
        media_type=multipart_content_type(DICOM, boundary),
    )


def _metadata_body(items: list[Located], base: str, cache: MetadataCache) -> Iterator[bytes]:
    yield b"["
    first = True
    for item in items:
        bulk_base = f"{instance_url(base, item.study, item.series, item.sop)}/bulk"
        try:
            model = cache.model(item.path, item.sop, bulk_base)
        except Exception as exc:
            LOGGER.error("WADO-RS metadata: cannot read %s: %s", item.path, exc)
            continue
        yield (b"" if first else b",") + model
        first = False
    yield b"]"


METADATA_CACHE = ".metadata"
"""The folder, under the archive's, of the cached JSON models (dicom_json.MetadataCache)."""


async def _metadata(
    request: Request, context: Any, study: str, series: str | None, sop: str | None
) -> StreamingResponse:
    wants_json(request.headers.get("accept"))
    _, factory, archive = context_parts(context)
    items = await run_in_threadpool(locate, factory, archive.root, study, series, sop)
    cache = MetadataCache(archive.root / METADATA_CACHE)
    return StreamingResponse(
        _metadata_body(items, service_url(request), cache), media_type=MEDIA_TYPE
    )


def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(n) for n in frames.split(",") if n.strip()]
    except ValueError as exc:
        raise InvalidRequest(f"frame list {frames[:80]!r} is not comma-separated numbers") from exc
    if not numbers or len(numbers) > MAX_FRAMES_PER_REQUEST or min(numbers) < 1:
        raise InvalidRequest("frame numbers start at 1; list 1 to 10000 of them")
    return numbers


_MULTIPART_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "multipart/related body", "content": {"multipart/related": {}}},
    400: {"description": "Malformed UID or frame list"},
    404: {"description": "Unknown study, series, instance or frame"},
    406: {"description": "No acceptable representation"},
}
_JSON_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "DICOM JSON", "content": {MEDIA_TYPE: {}}},
    400: {"description": "Malformed UID"},
    404: {"description": "Unknown study, series or instance"},
    406: {"description": "Only application/dicom+json is served"},
}


@router.get("/studies/{study}", responses=_MULTIPART_RESPONSE, response_class=StreamingResponse)
async def retrieve_study(request: Request, context: ContextDep, study: str) -> StreamingResponse:
    """WADO-RS: every instance of a study as ``multipart/related; type="application/dicom"``."""
    return await _retrieve(request, context, check_uid(study, "StudyInstanceUID"), None, None)


@router.get(
    "/studies/{study}/series/{series}",
    responses=_MULTIPART_RESPONSE,
    response_class=StreamingResponse,
)
async def retrieve_series(
    request: Request, context: ContextDep, study: str, series: str
) -> StreamingResponse:
    """WADO-RS: every instance of a series."""
    return await _retrieve(
        request,
        context,
        check_uid(study, "StudyInstanceUID"),
        check_uid(series, "SeriesInstanceUID"),
        None,
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}",
    responses=_MULTIPART_RESPONSE,
    response_class=StreamingResponse,
)
async def retrieve_instance(
    request: Request, context: ContextDep, study: str, series: str, sop: str
) -> StreamingResponse:
    """WADO-RS: one instance."""
    return await _retrieve(
        request,
        context,
        check_uid(study, "StudyInstanceUID"),
        check_uid(series, "SeriesInstanceUID"),
        check_uid(sop, "SOPInstanceUID"),
    )


@router.get("/studies/{study}/metadata", responses=_JSON_RESPONSE, response_class=StreamingResponse)
async def retrieve_study_metadata(
    request: Request, context: ContextDep, study: str
) -> StreamingResponse:
    """WADO-RS: the metadata of every instance of a study (DICOM JSON, bulk data by URI)."""
    return await _metadata(request, context, check_uid(study, "StudyInstanceUID"), None, None)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    responses=_JSON_RESPONSE,
    response_class=StreamingResponse,
)
async def retrieve_series_metadata(
    request: Request, context: ContextDep, study: str, series: str
) -> StreamingResponse:
    """WADO-RS: the metadata of every instance of a series."""
    return await _metadata(
        request,
        context,
        check_uid(study, "StudyInstanceUID"),
        check_uid(series, "SeriesInstanceUID"),
        None,
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/metadata",
    responses=_JSON_RESPONSE,
    response_class=StreamingResponse,
)
async def retrieve_instance_metadata(
    request: Request, context: ContextDep, study: str, series: str, sop: str
) -> StreamingResponse:
    """WADO-RS: the metadata of one instance."""
    return await _metadata(
        request,
        context,
        check_uid(study, "StudyInstanceUID"),
        check_uid(series, "SeriesInstanceUID"),
        check_uid(sop, "SOPInstanceUID"),
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    responses=_MULTIPART_RESPONSE,
    response_class=StreamingResponse,
)
async def retrieve_frames(
    request: Request, context: ContextDep, study: str, series: str, sop: str, frames: str
) -> StreamingResponse:
    """WADO-RS: frames (1-based, comma-separated) as ``application/octet-stream`` parts."""
    numbers = _frame_numbers(frames)
    _, factory, archive = context_parts(context)
    (item,) = await run_in_threadpool(
        locate,
        factory,
        archive.root,
        check_uid(study, "StudyInstanceUID"),
        check_uid(series, "SeriesInstanceUID"),
        check_uid(sop, "SOPInstanceUID"),
    )
    content_type = frame_content_type(request.headers.get("accept"), item.transfer_syntax)
    _, data = await run_in_threadpool(read_frames, item.path, numbers)
    boundary = new_boundary()
    part_type = content_type.split(";")[0]
    body = encode_parts(boundary, [(content_type, [frame]) for frame in data])
    return StreamingResponse(body, media_type=multipart_content_type(part_type, boundary))


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/bulk/{tag}",
    responses=_MULTIPART_RESPONSE,
    response_class=StreamingResponse,
)
async def retrieve_bulk_data(
    request: Request, context: ContextDep, study: str, series: str, sop: str, tag: str
) -> StreamingResponse:
    """WADO-RS: the value of one top-level element named by a BulkDataURI of the metadata."""
    if len(tag) != 8 or not all(c in "0123456789abcdefABCDEF" for c in tag):
        raise InvalidRequest(f"{tag[:20]!r} is not an 8-digit hexadecimal tag")
    content_type = bulk_content_type(request.headers.get("accept"))
    _, factory, archive = context_parts(context)
    (item,) = await run_in_threadpool(
        locate,
        factory,
        archive.root,
        check_uid(study, "StudyInstanceUID"),
        check_uid(series, "SeriesInstanceUID"),
        check_uid(sop, "SOPInstanceUID"),
    )
    value = await run_in_threadpool(BulkValue, item.path, int(tag, 16))
    boundary = new_boundary()
    if value.encapsulated:
        content_type = f"{content_type}; transfer-syntax={value.transfer_syntax}"
    body = encode_parts(boundary, [(content_type, value.chunks())])
    return StreamingResponse(
        body, media_type=multipart_content_type(content_type.split(";")[0], boundary)
    )
