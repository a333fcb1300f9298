"""Jobs, which the reference lacks: queue without waiting, status, history, cancel."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from nnunet_node.api.deps import ContextDep, JobServiceDep, client_address
from nnunet_node.api.errors import responses
from nnunet_node.api.routes.infer import REQUEST_BODY, JsonObject
from nnunet_node.api.views import DispatchView, JobView
from nnunet_node.core.errors import InvalidRequest, NotFound
from nnunet_node.storage.jobs import MAX_PAGE
from nnunet_node.storage.models import JobStatus

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])


class JobCreated(BaseModel):
    job_id: str
    status: str
    url: str


class JobPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[JobView]


@router.post(
    "",
    status_code=202,
    response_model=JobCreated,
    openapi_extra=REQUEST_BODY,
    responses=responses(400, 401, 429),
)
async def create_job(body: JsonObject, jobs: JobServiceDep, request: Request) -> JSONResponse:
    """Queue an inference job (same body as /infer) and answer 202 with its id at once."""
    client = client_address(request)
    job_id = await run_in_threadpool(lambda: jobs.submit(body, source="http", client=client))
    url = f"/jobs/{job_id}"
    return JSONResponse(
        JobCreated(job_id=job_id, status="queued", url=url).model_dump(),
        status_code=202,
        headers={"Location": url},
    )


_TIME = Query(
    description="ISO 8601 date-time (without an offset: UTC)",
    json_schema_extra={"format": "date-time"},
)


def _instant(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 date-time, naive read as UTC. Parsed here rather than by pydantic, which would
    also take a bare number as a Unix time."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise InvalidRequest(f"{name}: {value!r} is not an ISO 8601 date-time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _once(request: Request, repeatable: tuple[str, ...]) -> None:
    """Raise InvalidRequest when a query parameter that takes one value is given several times
    (``?model=a&model=b``: FastAPI would keep the last, and filter by it without a word)."""
    names = [name for name, _ in request.query_params.multi_items() if name not in repeatable]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            raise InvalidRequest(f"{name}: given {names.count(name)} times; give one value")


@router.get("", response_model=JobPage, responses=responses(400, 401, 429))
async def list_jobs(
    request: Request,
    jobs: JobServiceDep,
    status: Annotated[list[JobStatus] | None, Query(description="Repeat for several")] = None,
    model: Annotated[str | None, Query(description="Id, name or alias of any stage")] = None,
    source: Annotated[
        Literal["http", "dimse", "stow"] | None, Query(description="http, dimse or stow")
    ] = None,
    patient_id: str | None = None,
    study_uid: Annotated[str | None, Query(description="StudyInstanceUID")] = None,
    route: Annotated[str | None, Query(description="Routing rule name")] = None,
    created_after: Annotated[str | None, _TIME] = None,
    created_before: Annotated[str | None, _TIME] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> dict[str, Any]:
    """Job history, newest first, filtered and paged; total counts every match."""
    _once(request, repeatable=("status",))
    items, total = await run_in_threadpool(
        lambda: jobs.list(
            status=[s.value for s in status] if status else None,
            model=model,
            source=source,
            patient_id=patient_id,
            study_instance_uid=study_uid,
            route_name=route,
            created_after=_instant(created_after, "created_after"),
            created_before=_instant(created_before, "created_before"),
            limit=limit,
            offset=offset,
        )
    )
    views = [JobView.of(j) for j in items]
    return {"total": total, "limit": limit, "offset": offset, "items": views}


@router.get("/{job_id}", response_model=JobView, responses=responses(401, 404, 429))
async def get_job(job_id: str, jobs: JobServiceDep) -> JobView:
    """A job: status, progress per stage, result, outputs, dispatches, timings."""
    return JobView.of(await run_in_threadpool(jobs.get, job_id))


@router.post("/{job_id}/cancel", response_model=JobView, responses=responses(401, 404, 409, 429))
async def cancel_job(job_id: str, jobs: JobServiceDep) -> JobView:
    """Cancel a queued job, or ask a running one to stop; 409 once it has finished."""
    return JobView.of(await run_in_threadpool(jobs.cancel, job_id))


@router.post(
    "/{job_id}/dispatches/{dispatch_id}/retry",
    response_model=DispatchView,
    responses=responses(401, 404, 409, 429),
)
async def retry_dispatch(
    job_id: str,
    dispatch_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    context: ContextDep,
) -> DispatchView:
    """Send a job's results to a destination again (a failed or pending dispatch; 409 if sent)."""

    def retry() -> DispatchView:
        job = context.job_service.get(job_id)
        if all(d.id != dispatch_id for d in job.dispatches):
            raise NotFound(f"job {job_id!r} has no dispatch {dispatch_id}")
        context.dispatcher.retry(dispatch_id)
        record = next(d for d in context.job_service.get(job_id).dispatches if d.id == dispatch_id)
        return DispatchView.of(record)

    return await run_in_threadpool(retry)
