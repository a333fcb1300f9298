"""What the dashboard's pages show, gathered from the node (blocking: called in a thread).

Each function returns plain data for one page or fragment; the templates only lay it out. They
read through the same services as the API (the job service, the archive's read sessions, the
routing table, the model registry and cache), so a page never shows what the API would not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nnunet_node.pipeline.completion import WaitingSeries
from nnunet_node.pipeline.context import NodeContext
from nnunet_node.storage.arrivals import calling_aes
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.dispatches import DispatchStore
from nnunet_node.storage.jobs import JobRecord
from nnunet_node.storage.query import find_series, find_studies


@dataclass
class StageBar:
    index: int
    model: str
    fraction: float  # 0..1 of this stage
    step: str


@dataclass
class JobRow:
    job: JobRecord
    origin: str  # calling AE title (DIMSE, STOW) or HTTP client address
    queue_position: int | None
    stages: list[StageBar] = field(default_factory=list)


def stage_bars(job: JobRecord) -> list[StageBar]:
    """Progress of each stage from the job's ``progress`` (``stage``, ``stages``, ``step``,
    ``fraction`` over the whole job)."""
    models = list(job.models) or ["?"]
    progress = job.progress or {}
    n = int(progress.get("stages") or len(models) or 1)
    current = progress.get("stage")
    overall = float(progress.get("fraction") or 0.0)
    step = str(progress.get("step") or "")
    done = job.status in ("done", "superseded")
    bars = []
    for i in range(n):
        model = str(models[i]) if i < len(models) else "?"
        if done:
            bars.append(StageBar(i, model, 1.0, "done"))
        elif current is None or job.status == "queued":
            bars.append(StageBar(i, model, 0.0, step if i == 0 and current is None else ""))
        else:
            within = min(1.0, max(0.0, overall * n - i))
            bars.append(StageBar(i, model, within, step if i == int(current) else ""))
    return bars


def job_rows(context: NodeContext, jobs: list[JobRecord]) -> list[JobRow]:
    """Rows of the jobs list: where each job came from and its place in the queue."""
    store = context.job_service.store
    queued = {job_id: i + 1 for i, job_id in enumerate(store.queued_ids())}
    calling = calling_aes(
        context.archive.read_sessions, (uid for j in jobs for uid in j.series_uids[:1])
    )
    rows = []
    for job in jobs:
        if job.source == "http":
            origin = job.client or "HTTP"
        else:
            # A calling AE title only for C-STORE: a STOW-RS arrival has none (the series may
            # still name the AE of an earlier C-STORE).
            first = job.series_uids[0] if job.series_uids and job.source == "dimse" else ""
            origin = calling.get(first, "") or job.source.upper()
        rows.append(JobRow(job, origin, queued.get(job.id), stage_bars(job)))
    return rows


def waiting_series(context: NodeContext) -> list[WaitingSeries]:
    """Series waiting for completion, as the node's completion watcher sees them."""
    return context.completion.waiting()


def studies(context: NodeContext, query: dict[str, str], limit: int = 100) -> list[dict[str, Any]]:
    """Studies matching ``query`` (C-FIND/QIDO matching: wildcards, date ranges), each with
    its series."""
    with unit_of_work(context.archive.read_sessions) as session:
        found = find_studies(
            session,
            query,
            limit=limit,
            include=["ModalitiesInStudy", "NumberOfStudyRelatedInstances"],
        )
        uids = [row["StudyInstanceUID"] for row in found]
        series = (
            find_series(
                session,
                {"StudyInstanceUID": ",".join(uids)},
                include=["NumberOfSeriesRelatedInstances"],
            )
            if uids
            else []
        )
    by_study: dict[str, list[dict[str, Any]]] = {}
    for row in series:
        by_study.setdefault(row["StudyInstanceUID"], []).append(row)
    for row in found:
        row["series"] = by_study.get(row["StudyInstanceUID"], [])
    return list(reversed(found))  # newest arrivals first


def destinations(context: NodeContext) -> list[dict[str, Any]]:
    """Each destination of the spec with its latest dispatch (status, time, error)."""
    table = context.spec.routing
    store = DispatchStore(context.session_factory, context.archive.root)
    out = []
    for name, dest in table.destinations.items():
        last = store.latest_for(name)
        attempt = last.attempts[-1] if last is not None and last.attempts else {}
        out.append(
            {
                "name": name,
                "destination": dest,
                "rules": [r.name for r in table.routes if name in r.destinations],
                "last": last,
                "last_status": last.status.value if last is not None else None,
                "last_error": attempt.get("error"),
                "last_job": last.job_id if last is not None else None,
            }
        )
    return out


def models(context: NodeContext) -> list[dict[str, Any]]:
    """Each model of the spec: files present, loaded in the cache and on which device."""
    registry = context.spec.registry
    cache = context.inference_engine.cache
    loaded: dict[str, set[str]] = {}
    for key in cache.held_keys():
        if isinstance(key, tuple) and len(key) >= 5:
            loaded.setdefault(str(key[0]), set()).add(str(key[4]))
    out = []
    for model in registry.models:
        files = registry.files(model)
        devices = sorted(loaded.get(str(model.folder), set()))
        out.append(
            {
                "model": model,
                "available": files.available,
                "reason": files.error,
                "loaded": bool(devices),
                "devices": devices,
            }
        )
    return out


def since(value: datetime | None, now: datetime | None = None) -> str:
    """``12 s ago`` / ``in 3 s``: a time relative to now, for tables."""
    if value is None:
        return ""
    now = now or datetime.now(UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    seconds = (now - value).total_seconds()
    span = abs(seconds)
    if span < 90:
        text = f"{span:.0f} s"
    elif span < 5400:
        text = f"{span / 60:.0f} min"
    elif span < 172800:
        text = f"{span / 3600:.0f} h"
    else:
        text = f"{span / 86400:.0f} d"
    return f"{text} ago" if seconds >= 0 else f"in {text}"
