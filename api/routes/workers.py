"""The workers that run jobs: the node's own threads, or worker processes on other hosts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from nnunet_node.api.deps import JobServiceDep
from nnunet_node.api.errors import responses
from nnunet_node.storage.jobs import as_utc

router = APIRouter(prefix="/workers", tags=["workers"])


class WorkerView(BaseModel):
    """A worker that is alive: its last heartbeat is at most ``NNUNET_NODE_JOB_LEASE_S`` old.
    Datetimes are UTC."""

    name: str
    host: str
    pid: int
    device: str
    queues: list[str]
    """The queues it takes jobs from (``["*"]``: the node itself, which runs every job)."""
    models: list[dict[str, Any]]
    """Predictors it holds loaded: ``model``, ``folds``, ``checkpoint``, ``tta``, ``device``."""
    current_job: str | None = None
    jobs_done: int
    model_loads: int
    """Predictors it has loaded from disk since it started (a warm cache hit loads none)."""
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None


@router.get("", response_model=list[WorkerView], responses=responses(401, 429))
async def list_workers(jobs: JobServiceDep) -> list[WorkerView]:
    """The workers alive now: host, device, queues, loaded models and current job."""
    found = await run_in_threadpool(jobs.workers)
    return [
        WorkerView(
            name=w.name,
            host=w.host,
            pid=w.pid,
            device=w.device,
            queues=list(w.queues),
            models=[m if isinstance(m, dict) else {"model": str(m)} for m in w.models],
            current_job=w.current_job,
            jobs_done=w.jobs_done,
            model_loads=w.model_loads,
            started_at=as_utc(w.started_at),
            heartbeat_at=as_utc(w.heartbeat_at),
        )
        for w in found
    ]
