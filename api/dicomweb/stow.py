"""STOW-RS, the Studies Store transaction (PS3.18 10.5).

Each part of the ``multipart/related; type="application/dicom"`` body goes through
:meth:`storage.archive.Archive.ingest` (``source="stow"``), the path C-STORE takes, so that series
completion and routing treat both alike. Parts are ingested one by one as they arrive (the body is
never held whole) in a worker thread (ingest fsyncs and writes the index). A part that fails is
listed in the Failed SOP Sequence and costs no other part.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from nnunet_node.api.deps import ContextDep
from nnunet_node.api.dicomweb.common import (
    check_uid,
    context_parts,
    instance_url,
    service_url,
    study_url,
)
from nnunet_node.api.dicomweb.dicom_json import (
    MEDIA_TYPE,
    FailedRef,
    StoredRef,
    store_response,
)
from nnunet_node.api.dicomweb.multipart import Part, boundary_of, iter_parts, parse_media_type
from nnunet_node.api.dicomweb.negotiate import wants_json
from nnunet_node.core.errors import (
    InvalidDicom,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    WrongStudy,
)
from nnunet_node.storage.archive import Archive, IngestResult, read_header
from nnunet_node.storage.headers import is_valid_uid
from nnunet_node.storage.refusals import refusal_for

LOGGER = logging.getLogger(__name__)

router = APIRouter()

DICOM = "application/dicom"
INGEST_CONCURRENCY = 4
"""Parts of one request ingested at the same time."""


def _check_content_type(raw: str | None) -> bytes:
    if not raw:
        raise UnsupportedMediaType('send multipart/related; type="application/dicom"')
    media = parse_media_type(raw)
    part_type = (media.param("type") or DICOM).lower()
    if media.type != "multipart/related" or part_type != DICOM:
        raise UnsupportedMediaType(
            f'{raw[:100]!r} is not supported; send multipart/related; type="application/dicom" '
            "(PS3.18 10.5.1; the metadata and bulk data form is not supported)"
        )
    return boundary_of(media)


def _uids_of(part: Part) -> tuple[str, str]:
    """SOP Class and Instance UIDs of a failed part for its Failed SOP Sequence item, each
    empty where it cannot be read or is not a valid UID (PS3.5 9.1; the item then leaves it
    empty, :func:`api.dicomweb.dicom_json.store_response`). Read raw, without pydicom's value
    conversion: that would log a warning of its own for an invalid UID, after the node's
    refusal line."""
    try:
        source: Any = part.path if part.path is not None else io.BytesIO(part.data or b"")
        ds = pydicom.dcmread(
            source, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
        )
        return _raw_uid(ds, 0x00080016), _raw_uid(ds, 0x00080018)
    except Exception:
        return "", ""


def _raw_uid(ds: pydicom.Dataset, tag: int) -> str:
    """The UI element's value as sent if it is a valid UID, else empty."""
    element = ds.get_item(tag)  # the raw element: its value not converted, not checked
    value = element.value if element is not None else None
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
    text = text.rstrip("\x00 ")
    return text if is_valid_uid(text) else ""


def _store_part(archive: Archive, part: Part, study: str | None) -> IngestResult:
    """Ingest one part. Raises what ingest raises, :class:`InvalidDicom` for a part that is not
    DICOM and :class:`WrongStudy` for an instance of another study than the target's."""
    ctype = part.content_type
    if ctype is not None and ctype.type not in (DICOM, "application/octet-stream"):
        raise InvalidDicom(f"part of type {ctype.type}")
    payload = part.payload()
    if study is not None:
        header = read_header(payload)
        if header.study_instance_uid != study:
            raise WrongStudy(f"study {header.study_instance_uid} is not the target study {study}")
    return archive.ingest(payload, source="stow")


async def _ingest(
    archive: Archive, part: Part, study: str | None, base: str
) -> StoredRef | FailedRef:
    """One part to its Referenced or Failed SOP Sequence item; never raises. The Failure Reason
    is the one C-STORE would answer for the same failure (``storage/refusals.py``)."""
    try:
        result = await run_in_threadpool(_store_part, archive, part, study)
    except Exception as exc:
        refusal = refusal_for(exc)
        if refusal.expected:
            LOGGER.info(
                "STOW-RS part %d refused (0x%04X): %s", part.index, refusal.failure_reason, exc
            )
        else:
            LOGGER.exception("STOW-RS part %d failed", part.index)
        sop_class, sop = await run_in_threadpool(_uids_of, part)
        return FailedRef(
            sop_class, sop, refusal.failure_reason, str(exc) if refusal.expected else ""
        )
    finally:
        part.discard()
    url = instance_url(
        base, result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid
    )
    return StoredRef(result.sop_class_uid, result.sop_instance_uid, url, result.study_instance_uid)


async def _store(request: Request, context: Any, study: str | None) -> JSONResponse:
    settings, _, archive = context_parts(context)
    # The response is DICOM JSON (PS3.18 10.5.3): a client that accepts only XML gets 406 before
    # anything is stored, not a JSON answer it cannot read about instances it then sends again.
    wants_json(request.headers.get("accept"))
    boundary = _check_content_type(request.headers.get("content-type"))
    max_bytes = settings.max_upload_mb * 1024 * 1024
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"the request body is over the limit of {settings.max_upload_mb} MB")
    base = service_url(request)
    # A few parts are ingested at once, so that one part's fsyncs overlap the next one's; the
    # semaphore also bounds how many received parts wait in memory (or spill files).
    slots = asyncio.Semaphore(INGEST_CONCURRENCY)
    pending: list[asyncio.Task[StoredRef | FailedRef]] = []

    async def ingest(part: Part) -> StoredRef | FailedRef:
        try:
            return await _ingest(archive, part, study, base)
        finally:
            slots.release()

    broken: InvalidRequest | None = None
    oversized: PayloadTooLarge | None = None
    try:
        async for part in iter_parts(
            request.stream(), boundary, max_bytes=max_bytes, spill_dir=settings.uploads_dir
        ):
            await slots.acquire()
            pending.append(asyncio.create_task(ingest(part)))
    except PayloadTooLarge as exc:
        oversized = exc  # a body without Content-Length that passed the limit midway
    except InvalidRequest as exc:
        broken = exc  # a malformed or truncated tail: the whole parts before it still count
    finally:
        # Whatever ended the body (its end, a malformed tail, the size limit), the parts that
        # arrived whole are stored before the answer goes out.
        results = await asyncio.gather(*pending)
    headers: dict[str, str] = {}
    if oversized is not None:
        # PS3.18 10.5.3: 413 only when nothing was stored; otherwise the answer lists each part
        # stored and each failed, and one failure for the part the limit cut (the rest of the
        # body was not read).
        if not results:
            raise oversized
        message = (
            f"{oversized}: the body was cut after {len(results)} whole part(s); "
            "the part being received then and any after it were not read"
        )
        results.append(FailedRef("", "", refusal_for(oversized).failure_reason, message))
        headers["Warning"] = f'299 nnunet-node "{message}"'
    if broken is not None:
        if not results:
            raise broken
        reason = refusal_for(InvalidDicom(str(broken))).failure_reason  # cannot understand
        results.append(FailedRef("", "", reason, str(broken)))
    stored = [r for r in results if isinstance(r, StoredRef)]
    failed = [r for r in results if isinstance(r, FailedRef)]
    if not stored and not failed:
        raise InvalidRequest("the request holds no part")
    studies = {r.study_instance_uid for r in stored}
    target = study or (next(iter(studies)) if len(studies) == 1 else None)
    body = store_response(stored, failed, study_url=study_url(base, target) if target else None)
    # PS3.18 10.5.3: 200 all stored, 202 some stored, 409 none stored.
    status = 200 if not failed else (202 if stored else 409)
    LOGGER.info("STOW-RS: %d stored, %d failed", len(stored), len(failed))
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "All instances stored (Store Instances Response, DICOM JSON)"},
    202: {"description": "Some instances stored, some failed (FailedSOPSequence says why)"},
    409: {"description": "No instance stored (FailedSOPSequence says why)"},
    400: {"description": "Malformed multipart body"},
    413: {"description": "Body over the upload limit"},
    406: {"description": "Accept names no DICOM JSON (the response is application/dicom+json)"},
    415: {"description": 'Not multipart/related; type="application/dicom"'},
}


@router.post("/studies", responses=_RESPONSES, response_class=JSONResponse)
async def store_instances(request: Request, context: ContextDep) -> JSONResponse:
    """STOW-RS: store the instances of a ``multipart/related; type="application/dicom"`` body."""
    return await _store(request, context, None)


@router.post("/studies/{study}", responses=_RESPONSES, response_class=JSONResponse)
async def store_study_instances(request: Request, context: ContextDep, study: str) -> JSONResponse:
    """STOW-RS: store instances of one study; parts of other studies fail with 0xC409
    (``storage/refusals.py``)."""
    return await _store(request, context, check_uid(study, "StudyInstanceUID"))
