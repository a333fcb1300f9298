"""The reference's inference endpoints: ``/infer``, ``/infer_file``, ``/download/{job_id}``
(``docs/reference-contract.md``).

Each request becomes a job row before anything runs; the work happens in the job workers and the
handler awaits the job without blocking the event loop, then answers the reference's synchronous
body (``job.result``), with ``job_id`` added.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from nnunet_node.api.deps import JobServiceDep, SettingsDep, client_address
from nnunet_node.api.errors import error_response, responses
from nnunet_node.api.uploads import MB, extract_archive, receive_multipart, study_root
from nnunet_node.core.errors import Conflict, InvalidRequest, PayloadTooLarge
from nnunet_node.inference.request import normalise
from nnunet_node.pipeline.jobs import JobService
from nnunet_node.storage.jobs import JobRecord

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["inference"])

REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}
        },
    }
}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["request", "file"],
                    "properties": {
                        "request": {
                            "type": "string",
                            "description": "The InferenceRequest as a JSON string, without "
                            "study_path (the extracted upload is the study).",
                        },
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A zip or tar (.tar, .tar.gz, .tgz) of the study.",
                        },
                    },
                }
            }
        },
    }
}

JsonObject = Annotated[dict[str, Any], Body()]


def finished_answer(view: JobRecord) -> JSONResponse:
    """The synchronous answer for a finished job: its result (200), or the failure (500; 409 for
    a job cancelled meanwhile), always with ``job_id``."""
    if view.status == "done" and view.result is not None:
        return JSONResponse({**view.result, "job_id": view.id})
    if view.status in ("cancelled", "superseded"):
        return error_response(409, view.error or f"job {view.status}", job_id=view.id)
    return error_response(500, view.error or "inference failed", job_id=view.id)


async def run_job(jobs: JobService, job_id: str) -> JSONResponse:
    return finished_answer(await jobs.wait(job_id))


@router.post("/infer", openapi_extra=REQUEST_BODY, responses=responses(400, 401, 429, 500))
async def infer(body: JsonObject, jobs: JobServiceDep, request: Request) -> JSONResponse:
    """Run one model or a cascade on a study folder and answer when the job has finished."""
    client = client_address(request)
    job_id = await run_in_threadpool(lambda: jobs.submit(body, source="http", client=client))
    return await run_job(jobs, job_id)


def _parse_upload_request(raw: str | None) -> dict[str, Any]:
    if raw is None:
        raise InvalidRequest("request: form field required (the InferenceRequest as JSON)")
    try:
        request = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request: not valid JSON ({exc.msg})") from exc
    if not isinstance(request, dict):
        raise InvalidRequest("request: must be a JSON object")
    if request.get("study_path") is not None:
        raise InvalidRequest("study_path: not allowed here: the uploaded archive is the study")
    if not request.get("series_folders"):
        raise InvalidRequest("series_folders: field required")
    return request


def _first_series(request: dict[str, Any]) -> str | None:
    folders = request.get("series_folders")
    first: Any = folders[0] if isinstance(folders, list) and folders else None
    if isinstance(first, list):
        first = first[0] if first else None
    return first if isinstance(first, str) and not first.startswith("from:") else None


def _extract_and_submit(
    jobs: JobService,
    request: dict[str, Any],
    archive: Path,
    folder: Path,
    max_bytes: int,
    client: str | None = None,
) -> str:
    """Extract ``archive`` into ``folder`` (removed again if anything fails) and queue the job."""
    try:
        root = extract_archive(archive, folder / "study", max_bytes=max_bytes)
        study = study_root(root, _first_series(request))
        return jobs.submit(request, source="http", study_path=study, client=client)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@router.post("/infer_file", openapi_extra=UPLOAD_BODY, responses=responses(400, 401, 413, 429, 500))
async def infer_file(request: Request, jobs: JobServiceDep, settings: SettingsDep) -> JSONResponse:
    """Run inference on an uploaded zip or tar of a study; the answer includes job_id."""
    max_upload = settings.max_upload_mb * MB
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_upload + MB:
        raise PayloadTooLarge(f"file: the upload is larger than {settings.max_upload_mb} MB")
    upload = await receive_multipart(
        request.headers.get("content-type", ""),
        request.stream(),
        settings.uploads_dir,
        max_bytes=max_upload,
    )
    try:
        body = _parse_upload_request(upload.fields.get("request"))
        # Model and shape errors answer 400 before the archive is unpacked.
        await run_in_threadpool(normalise, body, jobs.spec.registry)
        if upload.file_path is None:
            raise InvalidRequest("file: form field required (a zip or tar of the study)")
        folder = settings.uploads_dir / secrets.token_hex(16)
        job_id = await run_in_threadpool(
            _extract_and_submit,
            jobs,
            body,
            upload.file_path,
            folder,
            settings.max_extract_mb * MB,
            client_address(request),
        )
    finally:
        upload.discard()
    LOGGER.info("job %s: upload extracted to %s", job_id, folder)
    return await run_job(jobs, job_id)


@router.get(
    "/download/{job_id}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/zip": {}}, "description": "The job's outputs as a zip"},
        **responses(401, 404, 409, 429),
    },
)
async def download(job_id: str, jobs: JobServiceDep) -> FileResponse:
    """Stream a zip of a finished job's outputs (any source: HTTP, DIMSE, STOW)."""
    view = await run_in_threadpool(jobs.get, job_id)
    if not view.finished:
        raise Conflict(f"job {job_id!r} is {view.status}: outputs are ready once it has finished")
    path = await run_in_threadpool(jobs.zip_path, job_id)
    return FileResponse(path, media_type="application/zip", filename=f"{job_id}.zip")
