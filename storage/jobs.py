"""Job records: the one queue that HTTP, DIMSE and STOW jobs share (``docs/architecture.md``,
"Data flow" 4).

A job is a row in ``jobs``; its state moves ``queued -> running -> done | failed`` (or
``cancelled`` / ``superseded``). Every change is one short transaction, so workers in several
threads, or in several processes sharing the database, claim jobs without a lock of their own:
a claim is a conditional ``UPDATE ... WHERE status = 'queued'`` whose row count says who won.
Callers get :class:`JobRecord` values (frozen, datetimes in UTC), never ORM rows: every SQL
statement on ``jobs``, ``job_models``, ``job_series`` and ``job_artifacts`` is in this module.
"""

from __future__ import annotations

import builtins
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, Engine, Select, func, select, update
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker

from nnunet_node.core.clock import as_utc, utcnow
from nnunet_node.core.errors import Conflict, NotFound
from nnunet_node.storage.db import make_read_sessionmaker, unit_of_work
from nnunet_node.storage.models import (
    Dispatch,
    DispatchStatus,
    InputKind,
    Job,
    JobArtifact,
    JobModel,
    JobSeries,
    JobStatus,
)

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
class DispatchRecord:
    """One destination of a job's DICOM results (see ``pipeline.dispatch``)."""

    id: int
    job_id: str
    destination: str
    status: DispatchStatus
    attempts: tuple[dict[str, Any], ...]
    next_attempt_at: datetime | None
    updated_at: datetime | None


@dataclass(frozen=True)
class JobRecord:
    """A job as storage hands it out: a snapshot, not a live row. Datetimes are UTC-aware.

    ``series_uids`` (``archive`` jobs) and ``series_folders`` (``paths`` and ``upload`` jobs,
    relative to ``study_path``) say what the job reads; one of them is empty.
    """

    id: str
    source: str
    status: JobStatus
    input_kind: InputKind
    request: dict[str, Any]
    models: tuple[str, ...]
    series_uids: tuple[str, ...]
    series_folders: tuple[str, ...]
    study_path: str | None
    route_name: str | None
    client: str | None
    study_instance_uid: str | None
    patient_id: str | None
    output_dir: str | None
    progress: dict[str, Any]
    result: dict[str, Any] | None
    run_record: dict[str, Any] | None
    error: str | None
    attempts: int
    superseded_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue: str = "default"
    """The queue whose workers may run it (a broker's; in-process workers run every queue)."""
    worker: str | None = None
    """The worker process that runs (or ran) it; None when the node ran it itself."""
    lease_expires_at: datetime | None = None
    """Until when its worker process holds it (UTC); None in-process and once it ended."""
    queue_position: int | None = None
    """While queued: how many queued jobs of its queue are ahead of it (0: it is next). Filled
    by the job service for one job (``JobService.get``); None in lists."""
    artifacts: tuple[ArtifactRecord, ...] = ()
    dispatches: tuple[DispatchRecord, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def of(cls, job: Job) -> JobRecord:
        """The snapshot of a loaded row (its models, series, artifacts and dispatches loaded)."""
        created = as_utc(job.created_at)
        assert created is not None
        return cls(
            id=job.id,
            source=job.source,
            status=JobStatus(job.status),
            input_kind=InputKind(job.input_kind),
            request=dict(job.request or {}),
            models=tuple(m.model_id for m in job.models),
            series_uids=tuple(s.series_instance_uid for s in job.series if s.series_instance_uid),
            series_folders=tuple(s.folder for s in job.series if s.folder is not None),
            study_path=job.study_path,
            route_name=job.route_name,
            client=job.client,
            study_instance_uid=job.study_instance_uid,
            patient_id=job.patient_id,
            output_dir=job.output_dir,
            progress=dict(job.progress or {}),
            result=dict(job.result) if job.result is not None else None,
            run_record=dict(job.run_record) if job.run_record is not None else None,
            error=job.error,
            attempts=job.attempts,
            superseded_by=job.superseded_by,
            created_at=created,
            started_at=as_utc(job.started_at),
            finished_at=as_utc(job.finished_at),
            queue=job.queue or "default",
            worker=job.worker,
            lease_expires_at=as_utc(job.lease_expires_at),
            artifacts=tuple(
                ArtifactRecord(
                    kind=a.kind,
                    path=a.path,
                    stage=a.stage,
                    sop_instance_uid=a.sop_instance_uid,
                    series_instance_uid=a.series_instance_uid,
                )
                for a in job.artifacts
            ),
            dispatches=tuple(dispatch_record(d) for d in job.dispatches),
        )


def dispatch_record(d: Dispatch) -> DispatchRecord:
    """The snapshot of a loaded ``dispatches`` row."""
    return DispatchRecord(
        id=d.id,
        job_id=d.job_id,
        destination=d.destination,
        status=DispatchStatus(d.status),
        attempts=tuple(d.attempts or ()),
        next_attempt_at=as_utc(d.next_attempt_at),
        updated_at=as_utc(d.updated_at),
    )


@dataclass(frozen=True)
class SeriesJob:
    """A job that reads a given series (series completion asks which ones exist).
    ``requested_models``: its request's ``nnunet_id`` as a tuple (as the rule names them)."""

    id: str
    status: JobStatus
    created_at: datetime
    requested_models: tuple[str, ...] = ()


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
        input_kind: InputKind = InputKind.PATHS,
        study_path: str | None = None,
        models: Iterable[str] = (),
        series_uids: Iterable[str] = (),
        series_folders: Iterable[str] = (),
        route_name: str | None = None,
        client: str | None = None,
        study_instance_uid: str | None = None,
        patient_id: str | None = None,
        output_dir: str | None = None,
        job_id: str | None = None,
        queue: str = "default",
    ) -> JobRecord:
        """Insert a queued job (on ``queue``, for workers that take jobs from a broker) and
        return it.

        ``series_uids`` are for ``archive`` jobs, ``series_folders`` for the others; giving the
        wrong one raises ``ValueError`` (a programming error, not a client's).
        """
        uids = [str(u) for u in series_uids]
        folders = [str(f) for f in series_folders]
        if input_kind == InputKind.ARCHIVE and folders:
            raise ValueError("an archive job reads series by UID, not folders")
        if input_kind != InputKind.ARCHIVE and uids:
            raise ValueError(f"a {input_kind.value} job reads folders, not series UIDs")
        job = Job(
            id=job_id or uuid.uuid4().hex,
            source=source,
            status=JobStatus.QUEUED,
            input_kind=input_kind,
            study_path=study_path,
            request=dict(request),
            route_name=route_name,
            client=client,
            study_instance_uid=study_instance_uid,
            patient_id=patient_id,
            output_dir=output_dir,
            queue=queue,
            progress={},
            attempts=0,
            created_at=utcnow(),
            models=[JobModel(position=i, model_id=m) for i, m in enumerate(models)],
            series=[JobSeries(position=i, series_instance_uid=u) for i, u in enumerate(uids)]
            + [JobSeries(position=i, folder=f) for i, f in enumerate(folders)],
            artifacts=[],
            dispatches=[],
        )
        with unit_of_work(self._sessions) as session:
            session.add(job)
            session.flush()
            record = JobRecord.of(job)
        LOGGER.info("job %s queued (source %s, models %s)", record.id, source, record.models)
        return record

    def get(self, job_id: str) -> JobRecord:
        """The job with its artifacts and dispatches; :class:`NotFound` when absent."""
        with unit_of_work(self._reads) as session:
            return JobRecord.of(self._load(session, job_id))

    def find(self, job_id: str) -> JobRecord | None:
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
    ) -> tuple[builtins.list[JobRecord], int]:
        """Jobs matching ``filters``, newest first, one page of them, and how many match in all."""
        limit = max(0, min(int(limit), MAX_PAGE))
        offset = max(0, int(offset))
        query = self._filtered(select(Job), filters or JobFilters())
        count_query = self._filtered(select(func.count(Job.id)), filters or JobFilters())
        with unit_of_work(self._reads) as session:
            total = int(session.scalar(count_query) or 0)
            rows = session.scalars(
                query.options(*_LOAD_ALL_SELECTIN)
                .order_by(Job.created_at.desc(), Job.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()  # selectin: a few more queries per page, not per job
            return [JobRecord.of(j) for j in rows], total

    def jobs_reading_series(
        self, series_instance_uid: str, *, route_name: str, study_instance_uid: str
    ) -> builtins.list[SeriesJob]:
        """The jobs of rule ``route_name`` that read the archived series (any status)."""
        with unit_of_work(self._reads) as session:
            rows = session.execute(
                select(Job.id, Job.status, Job.created_at, Job.request)
                .join(JobSeries, JobSeries.job_id == Job.id)
                .where(
                    Job.route_name == route_name,
                    Job.study_instance_uid == study_instance_uid,
                    JobSeries.series_instance_uid == series_instance_uid,
                )
                .order_by(Job.created_at)
            ).all()
        out = []
        for job_id, status, created, request in rows:
            created_utc = as_utc(created)
            assert created_utc is not None
            models = request.get("nnunet_id") if isinstance(request, dict) else None
            named = (models,) if isinstance(models, str) else tuple(map(str, models or ()))
            out.append(SeriesJob(job_id, JobStatus(status), created_utc, named))
        return out

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
            query = query.where(
                Job.id.in_(select(JobModel.job_id).where(JobModel.model_id == filters.model))
            )
        if filters.created_after is not None:
            query = query.where(Job.created_at >= _utc_bound(filters.created_after))
        if filters.created_before is not None:
            query = query.where(Job.created_at < _utc_bound(filters.created_before))
        return query

    # --- the worker's side -----------------------------------------------------------------
    def claim(self, job_id: str) -> JobRecord | None:
        """Take this job if it is still queued: ``queued -> running``, ``attempts + 1``,
        ``started_at`` now. Returns None when it is not queued (claimed by another worker or
        process, cancelled, finished, or absent): of several callers exactly one wins.
        """
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
            if claimed.rowcount != 1:
                return None
            record = JobRecord.of(self._load(session, job_id, refresh=True))
        LOGGER.info("job %s claimed (attempt %d)", job_id, record.attempts)
        return record

    def claim_next(self, *, sources: Iterable[str] | None = None) -> JobRecord | None:
        """Take the oldest queued job (see :meth:`claim`).

        Safe against other threads and processes: the update only applies while the row is still
        queued, and a lost race moves on to the next candidate.
        """
        wanted = builtins.list(sources) if sources is not None else None
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
                candidates = builtins.list(session.scalars(candidates_query))
            if not candidates:
                return None
            for job_id in candidates:
                record = self.claim(job_id)
                if record is not None:
                    return record
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
    ) -> JobRecord:
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
            record = JobRecord.of(self._load(session, job_id, refresh=True))
        LOGGER.info("job %s finished: %s", job_id, record.status.value)
        return record

    def fail(self, job_id: str, error: str, *, worker: str | None = None) -> JobRecord:
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
            record = JobRecord.of(self._load(session, job_id, refresh=True))
        LOGGER.warning("job %s failed: %s", job_id, error)
        return record

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

    def cancel(self, job_id: str, *, reason: str = "cancelled") -> JobRecord:
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

    def supersede(self, old_job_id: str, new_job_id: str) -> JobRecord:
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
        # One query: a job has a handful of models, series, artifacts and dispatches at most.
        query = select(Job).where(Job.id == job_id).options(*_LOAD_ALL_JOINED)
        if refresh:
            query = query.execution_options(populate_existing=True)
        job = session.scalars(query).unique().one_or_none()
        if job is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return job


_LOAD_ALL_JOINED = (
    joinedload(Job.models),
    joinedload(Job.series),
    joinedload(Job.artifacts),
    joinedload(Job.dispatches),
)
_LOAD_ALL_SELECTIN = (
    selectinload(Job.models),
    selectinload(Job.series),
    selectinload(Job.artifacts),
    selectinload(Job.dispatches),
)


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
    "DispatchRecord",
    "InputKind",
    "JobFilters",
    "JobRecord",
    "JobStore",
    "SeriesJob",
    "as_utc",
    "dispatch_record",
    "is_terminal",
]
