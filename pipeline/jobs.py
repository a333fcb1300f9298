"""The job service: one front for submitting, running, waiting for and managing jobs
(``docs/architecture.md``, "Data flow" 4-5).

HTTP (``/infer``, ``/infer_file``, ``/jobs``), DIMSE and STOW jobs all pass through here, so they
share one queue, one history and one runner. It composes the parts, each in its own module:

- :class:`~nnunet_node.pipeline.submission.JobSubmitter`: validation, path rules, the row;
- a :class:`~nnunet_node.pipeline.ports.JobQueue` (default: the in-process
  :class:`~nnunet_node.pipeline.workers.WorkerPool`) that gets each new job id;
- :class:`~nnunet_node.pipeline.execution.JobExecutor`: claim, run, record, hooks;
- :class:`~nnunet_node.pipeline.waiting.JobWaiter`: asyncio waiting.

A job is a database row before anything runs; inference runs in workers, never in the event loop.
Records (:class:`~nnunet_node.storage.jobs.JobRecord`) come out; the API makes its views of them.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import ClientError, InvalidRequest
from nnunet_node.core.settings import Settings
from nnunet_node.inference.engine import describe_key
from nnunet_node.inference.request import Plan
from nnunet_node.pipeline.execution import JobExecutor, JobHook
from nnunet_node.pipeline.outputs import build_zip
from nnunet_node.pipeline.paths import PathRules
from nnunet_node.pipeline.ports import Engine, JobQueue
from nnunet_node.pipeline.runner import JobRunner
from nnunet_node.pipeline.spec import NodeSpec
from nnunet_node.pipeline.submission import JobSubmitter
from nnunet_node.pipeline.waiting import JobWaiter
from nnunet_node.pipeline.workers import WorkerPool
from nnunet_node.pipeline.workspace import delete_job_folder, discard_upload
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.jobs import JobFilters, JobRecord, JobStore
from nnunet_node.storage.models import JobStatus
from nnunet_node.storage.workers import JobLeases, WorkerInfo


class JobService:
    """Validate and queue jobs, run them, report on them.

    ``queue``: where queued jobs go (a :class:`~nnunet_node.pipeline.ports.JobQueue`). By
    default ``settings.workers`` in-process threads run them (:class:`WorkerPool`); with a broker
    (:class:`~nnunet_node.pipeline.broker.BrokerQueue`) this process runs no job: worker
    processes take the ids and run them with :meth:`run_claimed`. ``poll_s``: how often waiters
    and running jobs re-read a row that another process may change.
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        spec: NodeSpec,
        archive: Archive,
        engine: Engine,
        *,
        queue: JobQueue | None = None,
        poll_s: float = 1.0,
        progress_interval_s: float = 0.25,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.engine = engine
        self.session_factory = session_factory
        self.store = JobStore(session_factory)
        self.leases = JobLeases(session_factory)
        self.paths = PathRules(settings)
        self.submitter = JobSubmitter(settings, session_factory, spec, self.store, self.paths)
        self.waiter = JobWaiter(self.store, poll_s=poll_s)
        self.runner = JobRunner(settings, spec, archive, engine, self.paths)
        self.executor = JobExecutor(
            settings,
            self.store,
            self.runner,
            self.leases,
            on_finished=self.waiter.notify,
            poll_s=poll_s,
            progress_interval_s=progress_interval_s,
        )
        self.queue: JobQueue = (
            queue
            if queue is not None
            else WorkerPool(
                self.executor,
                threads=settings.workers,
                poll_s=poll_s,
                device=settings.device,
                engine_state=self._engine_state,
            )
        )

    # --- submission --------------------------------------------------------------------------
    def validate(self, request: dict[str, Any], **kw: Any) -> Plan:
        """See :meth:`JobSubmitter.validate`."""
        return self.submitter.validate(request, **kw)

    def submit(
        self,
        request: dict[str, Any],
        *,
        source: str = "http",
        study_path: Path | None = None,
        output_dir: Path | None = None,
        series_uids: list[str] | None = None,
        route_name: str | None = None,
        client: str | None = None,
    ) -> str:
        """Validate ``request``, store it as a queued job and hand it to the queue; return the
        job id. See :meth:`JobSubmitter.submit` for the kinds of input; ``client`` (an HTTP
        client's address) is kept for status pages."""
        job_id = self.submitter.submit(
            request,
            source=source,
            study_path=study_path,
            output_dir=output_dir,
            series_uids=series_uids,
            route_name=route_name,
            client=client,
        )
        self.queue.submit(job_id)
        return job_id

    def subscribe_done(self, hook: JobHook) -> Callable[[], None]:
        """Run ``hook(job_id)`` after each job of this process that finishes ``done``; returns
        the function that removes it."""
        return self.executor.subscribe_done(hook)

    # --- reading -----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        """The job, with its place in its queue while queued (``queue_position``)."""
        job = self.store.get(job_id)
        if job.status == JobStatus.QUEUED:
            job = dataclasses.replace(job, queue_position=self.leases.queue_position(job_id))
        return job

    def queue_for(self, route_name: str | None, model_ids: builtins.list[str]) -> str:
        """See :meth:`JobSubmitter.queue_for`."""
        return self.submitter.queue_for(route_name, model_ids)

    def list(
        self,
        *,
        status: str | list[str] | None = None,
        model: str | None = None,
        source: str | None = None,
        patient_id: str | None = None,
        study_instance_uid: str | None = None,
        route_name: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[JobRecord], int]:
        """Job history, newest first. ``model`` may be an id, name or alias."""
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            known = {s.value for s in JobStatus}
            bad = [s for s in wanted if s not in known]
            if bad:
                raise InvalidRequest(f"status: {bad} not among {sorted(known)}")
        if model:
            # a model no longer in the spec still names its old jobs
            with contextlib.suppress(ClientError):
                model = self.spec.registry.resolve(model).id
        return self.store.list(
            JobFilters(
                status=status,
                model=model,
                source=source,
                patient_id=patient_id,
                study_instance_uid=study_instance_uid,
                route_name=route_name,
                created_after=created_after,
                created_before=created_before,
            ),
            limit=limit,
            offset=offset,
        )

    async def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Wait until the job is finished without blocking the event loop; after ``timeout``
        seconds return it as it is then."""
        return await self.waiter.wait(job_id, timeout)

    def zip_path(self, job_id: str) -> Path:
        """The zip of a finished job's outputs, built once and kept in the job folder."""
        return build_zip(self.settings, self.store.get(job_id))

    # --- changing ----------------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job; a running one stops at its next check (cooperative)."""
        job = self.store.cancel(job_id)
        # A worker (a thread here, or a worker process) removes the upload when it stops.
        running_elsewhere = job.worker is not None and job.started_at is not None
        if not self.executor.request_stop(job_id) and not running_elsewhere:
            discard_upload(self.settings, job)
        self.waiter.notify(job_id)
        return job

    def supersede(self, old_job_id: str, new_job_id: str) -> JobRecord:
        """Mark ``old_job_id`` replaced by ``new_job_id`` (a DIMSE re-run of the same series)."""
        job = self.store.supersede(old_job_id, new_job_id)
        self.executor.request_stop(old_job_id)
        self.waiter.notify(old_job_id)
        return job

    def delete_job_folder(self, job_id: str) -> None:
        """Remove ``<jobs>/<id>/`` (inputs, default outputs, zip); the row stays."""
        delete_job_folder(self.settings, job_id)

    # --- running -----------------------------------------------------------------------------
    def start(self, *, recover: bool = True) -> None:
        """Start the queue (first requeue or fail jobs a dead process left running)."""
        self.queue.start(recover=recover)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the queue; a running job that outlasts ``timeout`` goes back to the queue."""
        self.queue.stop(timeout)

    def run_job(self, job_id: str) -> JobStatus | None:
        """Claim and run one queued job in this thread (see :meth:`JobExecutor.run_job`)."""
        return self.executor.run_job(job_id)

    def run_claimed(self, job: JobRecord, *, worker: str) -> JobStatus:
        """Run a job that the worker process ``worker`` has claimed through its lease (its name
        is on the row) and record the outcome, only while it still holds the job (see
        ``storage.workers``); returns the job's status then."""
        return self.executor.execute(job, worker=worker)

    def request_stop(self, job_id: str) -> bool:
        """Ask a job running in this process to stop at its next check; False if none does."""
        return self.executor.request_stop(job_id)

    # --- workers -----------------------------------------------------------------------------
    def loaded_models(self) -> builtins.list[dict[str, Any]]:
        """The predictors this process holds loaded (model, folds, checkpoint, tta, device)."""
        cache = getattr(self.engine, "cache", None)
        if cache is None:
            return []
        ids = {str(m.folder): m.id for m in self.spec.registry.models}
        return [describe_key(key, ids) for key in cache.held_keys()]

    def workers(self) -> builtins.list[WorkerInfo]:
        """The workers alive now, as the queue knows them: with a broker, the worker processes
        whose heartbeat is at most one lease old; in-process, this process."""
        return self.queue.workers()

    def _engine_state(self) -> tuple[builtins.list[dict[str, Any]], int]:
        cache = getattr(self.engine, "cache", None)
        return self.loaded_models(), cache.stats.loads if cache is not None else 0

    def run_pending(self) -> int:
        """Claim and run queued jobs in this thread until none is left (tools and tests)."""
        count = 0
        while (job := self.store.claim_next()) is not None:
            self.executor.execute(job)
            count += 1
        return count


__all__ = ["JobService"]
