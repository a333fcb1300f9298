"""What the job API answers: views of :class:`~nnunet_node.storage.jobs.JobRecord`.

The pipeline hands out records; these pydantic models are the HTTP shape of them (``/jobs``,
``/jobs/{id}``, the dispatch retry). Datetimes are UTC with an offset.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from nnunet_node.storage.jobs import ArtifactRecord, DispatchRecord, JobRecord, is_terminal


class ArtifactView(BaseModel):
    kind: str
    stage: int
    path: str
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None

    @classmethod
    def of(cls, artifact: ArtifactRecord) -> ArtifactView:
        return cls(
            kind=artifact.kind,
            stage=artifact.stage,
            path=artifact.path,
            sop_instance_uid=artifact.sop_instance_uid,
            series_instance_uid=artifact.series_instance_uid,
        )


class DispatchView(BaseModel):
    id: int
    destination: str
    status: str
    attempts: list[Any]
    next_attempt_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def of(cls, dispatch: DispatchRecord) -> DispatchView:
        return cls(
            id=dispatch.id,
            destination=dispatch.destination,
            status=dispatch.status.value,
            attempts=list(dispatch.attempts),
            next_attempt_at=dispatch.next_attempt_at,
            updated_at=dispatch.updated_at,
        )


class JobView(BaseModel):
    """A job as the API and the dashboard show it. Datetimes are UTC. ``series`` lists what it
    reads: folders under its study (jobs given paths or an upload) or SeriesInstanceUIDs (jobs
    of the archive: DIMSE, STOW-RS, routing rules)."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(serialization_alias="job_id")
    """Answered as ``job_id``, the reference's name, in every HTTP answer (``/jobs`` too)."""
    source: str
    status: str
    request: dict[str, Any]
    models: list[Any]
    series: list[Any]
    route_name: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    output_dir: str | None = None
    progress: dict[str, Any]
    result: dict[str, Any] | None = None
    run_record: dict[str, Any] | None = None
    error: str | None = None
    attempts: int
    queue: str = "default"
    """The queue whose workers may run it (see ``GET /workers``)."""
    queue_position: int | None = None
    """While queued: how many queued jobs of its queue are ahead of it (0: it is next)."""
    worker: str | None = None
    """The worker process that runs (or ran) it; ``None`` when the node ran it itself."""
    superseded_by: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    artifacts: list[ArtifactView]
    dispatches: list[DispatchView]

    @property
    def finished(self) -> bool:
        return is_terminal(self.status)

    @classmethod
    def of(cls, job: JobRecord) -> JobView:
        return cls(
            id=job.id,
            source=job.source,
            status=job.status.value,
            request=dict(job.request),
            models=list(job.models),
            series=list(job.series_uids or job.series_folders),
            route_name=job.route_name,
            study_instance_uid=job.study_instance_uid,
            patient_id=job.patient_id,
            output_dir=job.output_dir,
            progress=dict(job.progress),
            result=job.result,
            run_record=job.run_record,
            error=job.error,
            attempts=job.attempts,
            queue=job.queue,
            queue_position=job.queue_position,
            worker=job.worker,
            superseded_by=job.superseded_by,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            artifacts=[ArtifactView.of(a) for a in job.artifacts],
            dispatches=[DispatchView.of(d) for d in job.dispatches],
        )


__all__ = ["ArtifactView", "DispatchView", "JobView"]
