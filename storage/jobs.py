"""Job records: the one queue that HTTP, DIMSE and STOW jobs share (``docs/architecture.md``,
"Data flow" 4).

A job is a row in ``jobs``; its state moves ``queued -> running -> done | failed`` (or
``cancelled`` / ``superseded``). Every change is one short transaction, so workers in several
threads, or in several processes sharing the database, claim jobs without a lock of their own:
a claim is a conditional ``UPDATE ... WHERE status = 'queued'`` whose row count says who won.
Rows come back detached (the session factory does not expire on commit), with their artifacts
and dispatches loaded.
"""

from __future__ import annotations

import builtins
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, Engine, Select, String, cast, func, select, update
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker

from nnunet_node.core.clock import as_utc, utcnow
from nnunet_node.core.errors import Conflict, NotFound
from nnunet_node.storage.db import make_read_sessionmaker, unit_of_work
from nnunet_node.storage.models import Job, JobArtifact, JobStatus

LOGGER = logging.getLogger(__name__)

MAX_ATTEMPTS = 2
"""A job that was running when the process died is retried once (attempt 2), then failed."""
RESTART_REASON = "interrupted by a restart"
TERMINAL = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.SUPERSEDED})
MAX_PAGE = 1000


@dataclass(frozen=True)
class ArtifactRecord:
    """One output file of a job, listed under ``kind`` (a field of the /infer response)."""

    kind: str
    path: str
    stage: int = 0
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None


@dataclass(frozen=True)
class JobFilters:
    """History filters; ``None`` means any. ``model`` matches any stage's canonical model id."""

    status: Sequence[str] | str | None = None
    model: str | None = None
    source: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    route_name: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _utc_bound(value: datetime) -> datetime:
    # SQLite stores the wall time without an offset: compare in UTC on every backend.
    aware = as_utc(value)
    assert aware is not None
    return aware


class JobStore:
    """Create, claim, update and query jobs. Thread-safe: every method opens its own session."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        read_factory: sessionmaker[Session] | None = None,
    ) -> None:
        self._sessions = session_factory
        self._reads = read_factory or _read_sessions(session_factory)

    # --- creation and reading ------------------------------------------------------------
    def create(
        self,
        *,
        source: str,
        request: dict[str, Any],
        models: Iterable[str] = (),
        series: Iterable[str] = (),
        route_name: str | None = None,
        study_instance_uid: str | None = None,
        patient_id: str | None = None,
        output_dir: str | None = None,
        job_id: str | None = None,
        queue: str = "default",
    ) -> Job:
        """Insert a queued job (on ``queue``, for workers that take jobs from a broker) and
        return it."""
        job = Job(
            id=job_id or uuid.uuid4().hex,
            source=source,
            status=JobStatus.QUEUED,
            request=dict(request),
            models=list(models),
            series=list(series),
            route_name=route_name,
            study_instance_uid=study_instance_uid,
            patient_id=patient_id,
            output_dir=output_dir,
            queue=queue,
            progress={},
            attempts=0,
            created_at=utcnow(),
            artifacts=[],
            dispatches=[],
        )
        with unit_of_work(self._sessions) as session:
            session.add(job)
        LOGGER.info("job %s queued (source %s, models %s)", job.id, source, job.models)
        return job

    def get(self, job_id: str) -> Job:
        """The job with its artifacts and dispatches; :class:`NotFound` when absent."""
        with unit_of_work(self._reads) as session:
            job = self._load(session, job_id)
        return job

    def find(self, job_id: str) -> Job | None:
        try:
            return self.get(job_id)
        except NotFound:
            return None

    def status(self, job_id: str) -> JobStatus:
        """Just the status (cheap: workers poll it to notice a cancel from another process)."""
        with unit_of_work(self._reads) as session:
            value = session.scalar(select(Job.status).where(Job.id == job_id))
        if value is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return JobStatus(value)

    def list(
        self, filters: JobFilters | None = None, *, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """Jobs matching ``filters``, newest first, one page of them, and how many match in all."""
        limit = max(0, min(int(limit), MAX_PAGE))
        offset = max(0, int(offset))
        query = self._filtered(select(Job), filters or JobFilters())
        count_query = self._filtered(select(func.count(Job.id)), filters or JobFilters())
        with unit_of_work(self._reads) as session:
            total = int(session.scalar(count_query) or 0)
            rows = session.scalars(
                query.options(selectinload(Job.artifacts), selectinload(Job.dispatches))
                .order_by(Job.created_at.desc(), Job.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()  # selectin: two more queries per page, not per job
        return list(rows), total

    @staticmethod
    def _filtered(query: Select[Any], filters: JobFilters) -> Select[Any]:
        if filters.status:
            wanted = [filters.status] if isinstance(filters.status, str) else list(filters.status)
            query = query.where(Job.status.in_([JobStatus(s) for s in wanted]))
        if filters.source:
            query = query.where(Job.source == filters.source)
        if filters.patient_id is not None:
            query = query.where(Job.patient_id == filters.patient_id)
        if filters.study_instance_uid is not None:
            query = query.where(Job.study_instance_uid == filters.study_instance_uid)
        if filters.route_name is not None:
            query = query.where(Job.route_name == filters.route_name)
        if filters.model:
            # ``models`` is a JSON list of ids; its text holds each id as a quoted string on every
            # backend, so a LIKE on the quoted id matches whole ids only.
            pattern = f'%"{_escape_like(filters.model)}"%'
            query = query.where(cast(Job.models, String).like(pattern, escape="\\"))
        if filters.created_after is not None:
            query = query.where(Job.created_at >= _utc_bound(filters.created_after))
        if filters.created_before is not None:
            query = query.where(Job.created_at < _utc_bound(filters.created_before))
        return query

    # --- the worker's side -----------------------------------------------------------------
    def claim_next(self, *, sources: Iterable[str] | None = None) -> Job | None:
        """Take the oldest queued job: ``queued -> running``, ``attempts + 1``, ``started_at`` now.

        Safe against other threads and processes: the update only applies while the row is still
        queued, and a lost race moves on to the next candidate.
        """
        wanted = list(sources) if sources is not None else None
        while True:
            candidates_query = (
                select(Job.id)
                .where(Job.status == JobStatus.QUEUED)
                .order_by(Job.created_at, Job.id)
                .limit(8)
            )
            if wanted is not None:
                candidates_query = candidates_query.where(Job.source.in_(wanted))
            # Looking takes no write lock: idle workers poll without holding up writers.
            with unit_of_work(self._reads) as session:
                candidates = list(session.scalars(candidates_query))
            if not candidates:
                return None
            for job_id in candidates:
                with unit_of_work(self._sessions) as session:
                    claimed = session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                        .values(
                            status=JobStatus.RUNNING,
                            attempts=Job.attempts + 1,
                            started_at=utcnow(),
                            finished_at=None,
                            error=None,
                            progress={"step": "starting", "fraction": 0.0},
                        )
                        .execution_options(synchronize_session=False)
                    )
                    assert isinstance(claimed, CursorResult)
                    if claimed.rowcount == 1:
                        job = self._load(session, job_id, refresh=True)
                        LOGGER.info("job %s claimed (attempt %d)", job_id, job.attempts)
                        return job
            # every candidate was taken by someone else meanwhile: look again

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Replace the job's progress while it runs (a late update after a cancel is dropped)."""
        with unit_of_work(self._sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(progress=dict(progress))
                .execution_options(synchronize_session=False)
            )

    def finish(
        self,
        job_id: str,
        result: dict[str, Any],
        artifacts: Iterable[ArtifactRecord] = (),
        *,
        progress: dict[str, Any] | None = None,
        run_record: dict[str, Any] | None = None,
        worker: str | None = None,
    ) -> Job:
        """Record the result, the run record and every output file. The job becomes ``done`` if it
        was still running; one cancelled or superseded meanwhile keeps that status (its files are
        listed).

        ``worker`` (a worker process's name): record only while that worker still holds the job;
        one that lost it (its lease ran out and another worker took the job over) records
        nothing and gets :class:`Conflict`.
        """
        with unit_of_work(self._sessions) as session:
            job = self._load(session, job_id)
            if worker is not None and job.worker != worker:
                raise Conflict(f"job {job_id!r} is held by {job.worker!r}, not {worker!r}")
            job.result = dict(result)
            if run_record is not None:
                job.run_record = dict(run_record)
            job.finished_at = utcnow()
            if progress is not None:
                job.progress = dict(progress)
            for art in artifacts:
                job.artifacts.append(
                    JobArtifact(
                        kind=art.kind,
                        stage=art.stage,
                        path=art.path,
                        sop_instance_uid=art.sop_instance_uid,
                        series_instance_uid=art.series_instance_uid,
                    )
                )
            if job.status == JobStatus.RUNNING:
                job.status = JobStatus.DONE
                job.error = None
            job.lease_expires_at = None
            session.flush()
            job = self._load(session, job_id, refresh=True)
        LOGGER.info("job %s finished: %s", job_id, job.status.value)
        return job

    def fail(self, job_id: str, error: str, *, worker: str | None = None) -> Job:
        """Mark a running (or queued) job failed with ``error``; other states are left alone,
        and so is a job that ``worker`` (when given) no longer holds."""
        condition = [Job.id == job_id, Job.status.in_([JobStatus.RUNNING, JobStatus.QUEUED])]
        if worker is not None:
            condition.append(Job.worker == worker)
        with unit_of_work(self._sessions) as session:
            session.execute(
                update(Job)
                .where(*condition)
                .values(
                    status=JobStatus.FAILED,
                    error=error,
                    finished_at=utcnow(),
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
            job = self._load(session, job_id, refresh=True)
        LOGGER.warning("job %s failed: %s", job_id, error)
        return job

    def requeue(self, job_id: str, *, count_attempt: bool = False) -> bool:
        """Put a running job back in the queue (a graceful stop interrupted it). Unless
        ``count_attempt``, the interrupted run does not count against its retries."""
        values: dict[str, Any] = {"status": JobStatus.QUEUED, "started_at": None, "progress": {}}
        if not count_attempt:
            values["attempts"] = Job.attempts - 1
        with unit_of_work(self._sessions) as session:
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            assert isinstance(done, CursorResult)
            return done.rowcount == 1

    def cancel(self, job_id: str, *, reason: str = "cancelled") -> Job:
        """Cancel a queued job at once, or a running one (the worker notices through
        ``should_stop`` and stops at its next check). Finished jobs raise :class:`Conflict`."""
        with unit_of_work(self._sessions) as session:
            job = self._load(session, job_id)
            if job.status in TERMINAL:
                raise Conflict(
                    f"job {job_id!r} is {job.status.value}: only queued or running jobs "
                    "can be cancelled"
                )
            was = job.status
            job.status = JobStatus.CANCELLED
            job.error = reason if was == JobStatus.QUEUED else f"{reason} while running"
            job.finished_at = utcnow()
        LOGGER.info("job %s cancelled (was %s)", job_id, was.value)
        return self.get(job_id)

    def supersede(self, old_job_id: str, new_job_id: str) -> Job:
        """A newer job replaces ``old_job_id`` (a series received more instances and ran again).

        The old job records ``superseded_by``; queued, running and done jobs take the status
        ``superseded`` (a queued one will not run, a running one stops at its next check, a done
        one keeps its result and files). Failed and cancelled jobs keep their status.
        """
        with unit_of_work(self._sessions) as session:
            job = self._load(session, old_job_id)
            job.superseded_by = new_job_id
            if job.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE):
                if job.status != JobStatus.DONE:
                    job.finished_at = utcnow()
                job.status = JobStatus.SUPERSEDED
        LOGGER.info("job %s superseded by %s", old_job_id, new_job_id)
        return self.get(old_job_id)

    def recover_after_restart(self) -> tuple[builtins.list[str], builtins.list[str]]:
        """At start-up: jobs left ``running`` by a process that died go back to the queue once
        (``attempts < 2``); after a second interruption they fail with the reason.

        Call it before this process's workers start and only where no other live process runs
        jobs from the same database (a shared database needs worker heartbeats, not kept here).
        Returns ``(requeued ids, failed ids)``.
        """
        requeued: builtins.list[str] = []
        failed: builtins.list[str] = []
        with unit_of_work(self._sessions) as session:
            rows = session.execute(
                select(Job.id, Job.attempts).where(Job.status == JobStatus.RUNNING)
            ).all()
            for job_id, attempts in rows:
                if attempts < MAX_ATTEMPTS:
                    values: dict[str, Any] = {
                        "status": JobStatus.QUEUED,
                        "started_at": None,
                        "progress": {},
                    }
                    requeued.append(job_id)
                else:
                    values = {
                        "status": JobStatus.FAILED,
                        "error": RESTART_REASON,
                        "finished_at": utcnow(),
                    }
                    failed.append(job_id)
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
        if requeued or failed:
            LOGGER.warning(
                "after a restart: %d running job(s) requeued %s, %d failed %s",
                len(requeued),
                requeued,
                len(failed),
                failed,
            )
        return requeued, failed

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (every status present, 0 when none)."""
        with unit_of_work(self._reads) as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        counts = {status.value: 0 for status in JobStatus}
        for status, n in rows:
            counts[JobStatus(status).value] = int(n)
        return counts

    def queued_ids(self) -> builtins.list[str]:
        with unit_of_work(self._reads) as session:
            return builtins.list(
                session.scalars(
                    select(Job.id).where(Job.status == JobStatus.QUEUED).order_by(Job.created_at)
                )
            )

    def delete_artifacts(self, job_id: str) -> None:
        """Drop the job's artifact rows (before a retried run records its own)."""
        with unit_of_work(self._sessions) as session:
            job = self._load(session, job_id)
            job.artifacts.clear()

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _load(session: Session, job_id: str, *, refresh: bool = False) -> Job:
        # One query: a job has a handful of artifacts and dispatches at most.
        query = (
            select(Job)
            .where(Job.id == job_id)
            .options(joinedload(Job.artifacts), joinedload(Job.dispatches))
        )
        if refresh:
            query = query.execution_options(populate_existing=True)
        job = session.scalars(query).unique().one_or_none()
        if job is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return job


def _read_sessions(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions for queries on the same engine (no write lock on SQLite), when it can be found."""
    bind = factory.kw.get("bind")
    return make_read_sessionmaker(bind) if isinstance(bind, Engine) else factory


def is_terminal(status: str | JobStatus) -> bool:
    return JobStatus(status) in TERMINAL


__all__ = [
    "MAX_ATTEMPTS",
    "RESTART_REASON",
    "TERMINAL",
    "ArtifactRecord",
    "JobFilters",
    "JobStore",
    "as_utc",
    "is_terminal",
]
