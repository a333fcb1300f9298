"""Jobs run by worker processes on other hosts: leases on running jobs, and the workers' rows.

With a broker (``NNUNET_NODE_BROKER_URL``) the job row stays the truth and the broker only carries
job ids, at least once. What makes running a job idempotent on its id, and a dead worker's job run
again, is here, as conditional updates whose row count says who won (on SQLite and PostgreSQL):

- :meth:`JobLeases.claim` turns ``queued`` into ``running`` for one worker and gives it a lease
  (``lease_expires_at``); it also takes over a ``running`` job whose lease ran out (its worker
  died), counting an attempt. A delivery of a job that another worker runs (lease alive) or that
  is finished claims nothing, so a redelivered id is never run twice at once.
- :meth:`JobLeases.renew` extends the lease while the worker is alive; it fails once the job was
  cancelled or taken over, and the worker then stops.
- :meth:`JobLeases.reap` puts jobs whose lease ran out back in the queue (or fails them after the
  last attempt), so that a new copy of the id can be sent without waiting for the broker.
- :class:`WorkerStore`: each worker's heartbeat row (host, device, queues, loaded models, current
  job) that ``GET /workers`` lists.

Times are UTC; a lease is compared with the database host's idea of now as written by the
workers, so hosts need clocks within a small fraction of the lease (NTP).
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, CursorResult, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.clock import utcnow
from nnunet_node.core.errors import NotFound
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.models import Job, JobStatus, Worker

LOGGER = logging.getLogger(__name__)

LOST_REASON = "its worker was lost"


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


@dataclass(frozen=True)
class ClaimOutcome:
    """What :meth:`JobLeases.claim` found: ``claimed`` true when this worker now runs the job;
    otherwise ``status`` is the row's status (``None`` when there is no such job) and ``holder``
    the worker that holds it."""

    claimed: bool
    status: JobStatus | None = None
    holder: str | None = None
    attempts: int = 0


class JobLeases:
    """Conditional updates on ``jobs`` for workers that share the database (see the module)."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sessions = session_factory

    def claim(self, job_id: str, worker: str, *, lease_s: float, max_attempts: int) -> ClaimOutcome:
        """Claim ``job_id`` for ``worker`` with a lease of ``lease_s`` seconds.

        Wins when the job is ``queued``, or ``running`` with a lease that ran out and fewer than
        ``max_attempts`` runs so far (its worker died: this is a takeover). A job whose lease ran
        out on its last attempt is failed with the reason. Returns what was found.
        """
        now = utcnow()
        expired = and_(
            Job.status == JobStatus.RUNNING,
            Job.lease_expires_at.is_not(None),
            Job.lease_expires_at < now,
        )
        with unit_of_work(self._sessions) as session:
            won = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    or_(
                        Job.status == JobStatus.QUEUED,
                        and_(expired, Job.attempts < max_attempts),
                    ),
                )
                .values(
                    status=JobStatus.RUNNING,
                    attempts=Job.attempts + 1,
                    worker=worker,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    started_at=now,
                    finished_at=None,
                    error=None,
                    progress={"step": "starting", "fraction": 0.0},
                )
                .execution_options(synchronize_session=False)
            )
            if _rowcount(won) == 1:
                attempts = session.scalar(select(Job.attempts).where(Job.id == job_id)) or 1
                LOGGER.info("job %s claimed by %s (attempt %d)", job_id, worker, attempts)
                return ClaimOutcome(True, JobStatus.RUNNING, worker, int(attempts))
            row = session.execute(
                select(Job.status, Job.worker, Job.attempts, Job.lease_expires_at).where(
                    Job.id == job_id
                )
            ).one_or_none()
        if row is None:
            return ClaimOutcome(False)
        status, holder, attempts, _lease = row
        if JobStatus(status) == JobStatus.RUNNING and self._fail_lost([job_id], max_attempts):
            status = JobStatus.FAILED
        return ClaimOutcome(False, JobStatus(status), holder, int(attempts or 0))

    def renew(self, job_id: str, worker: str, *, lease_s: float) -> bool:
        """Extend ``worker``'s lease on its running job; False once it is no longer its own
        (cancelled, superseded, finished, or taken over after the lease ran out)."""
        with unit_of_work(self._sessions) as session:
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
                .execution_options(synchronize_session=False)
            )
            return _rowcount(done) == 1

    def holds(self, job_id: str, worker: str) -> bool:
        """Whether ``worker`` still runs ``job_id`` (status ``running``, its name on the row)."""
        with unit_of_work(self._sessions) as session:
            row = session.execute(
                select(Job.status, Job.worker).where(Job.id == job_id)
            ).one_or_none()
        return row is not None and JobStatus(row[0]) == JobStatus.RUNNING and row[1] == worker

    def release(self, job_id: str, worker: str) -> None:
        """Drop ``worker``'s lease on a job it stopped running (the status is already final)."""
        with unit_of_work(self._sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker)
                .values(lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )

    def reap(
        self, *, max_attempts: int
    ) -> tuple[builtins.list[tuple[str, str]], builtins.list[str]]:
        """Jobs whose lease ran out: back to ``queued`` while they have attempts left, else
        ``failed`` with the reason. Returns ``([(job id, queue) requeued], [failed ids])``; the
        caller sends the requeued ids to the broker again. Jobs run in-process have no lease and
        are never touched."""
        now = utcnow()
        with unit_of_work(self._sessions) as session:
            rows = session.execute(
                select(Job.id, Job.queue, Job.attempts, Job.lease_expires_at).where(
                    Job.status == JobStatus.RUNNING,
                    Job.lease_expires_at.is_not(None),
                    Job.lease_expires_at < now,
                )
            ).all()
        requeued: builtins.list[tuple[str, str]] = []
        exhausted: builtins.list[str] = []
        for job_id, queue, attempts, lease in rows:
            if attempts >= max_attempts:
                exhausted.append(job_id)
                continue
            with unit_of_work(self._sessions) as session:
                done = session.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.status == JobStatus.RUNNING,
                        Job.lease_expires_at == lease,
                    )
                    .values(
                        status=JobStatus.QUEUED,
                        lease_expires_at=None,
                        started_at=None,
                        progress={},
                    )
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(done) == 1:
                    requeued.append((job_id, queue))
        failed = self._fail_lost(exhausted, max_attempts)
        if requeued or failed:
            LOGGER.warning(
                "lost workers: %d job(s) back in the queue %s, %d failed %s",
                len(requeued),
                [j for j, _ in requeued],
                len(failed),
                failed,
            )
        return requeued, failed

    def _fail_lost(self, job_ids: Iterable[str], max_attempts: int) -> builtins.list[str]:
        failed: builtins.list[str] = []
        for job_id in job_ids:
            with unit_of_work(self._sessions) as session:
                row = session.execute(
                    select(Job.worker, Job.attempts).where(Job.id == job_id)
                ).one_or_none()
                if row is None:
                    continue
                reason = (
                    f"{LOST_REASON} ({row[0] or 'unknown'}) on attempt {row[1]} of "
                    f"{max_attempts}: no heartbeat before its lease ran out"
                )
                done = session.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.status == JobStatus.RUNNING,
                        Job.lease_expires_at.is_not(None),
                        Job.lease_expires_at < utcnow(),
                        Job.attempts >= max_attempts,
                    )
                    .values(
                        status=JobStatus.FAILED,
                        error=reason,
                        finished_at=utcnow(),
                        lease_expires_at=None,
                    )
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(done) == 1:
                    failed.append(job_id)
        return failed

    # --- sending ids to the broker -----------------------------------------------------------
    def mark_enqueued(self, job_ids: Iterable[str]) -> None:
        """Record that these jobs' ids were just handed to the broker."""
        ids = builtins.list(job_ids)
        if not ids:
            return
        with unit_of_work(self._sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(ids))
                .values(enqueued_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    def unsent(
        self, older_than_s: float | None = None, *, min_age_s: float = 0.0, limit: int = 500
    ) -> builtins.list[tuple[str, str]]:
        """``(job id, queue)`` of queued jobs created over ``min_age_s`` seconds ago that were
        never sent to the broker or, with ``older_than_s``, were last sent more than that many
        seconds ago; oldest first."""
        now = utcnow()
        stale: ColumnElement[bool] = Job.enqueued_at.is_(None)
        if older_than_s is not None:
            stale = or_(stale, Job.enqueued_at < now - timedelta(seconds=older_than_s))
        with unit_of_work(self._sessions) as session:
            rows = session.execute(
                select(Job.id, Job.queue)
                .where(
                    Job.status == JobStatus.QUEUED,
                    Job.created_at < now - timedelta(seconds=min_age_s),
                    stale,
                )
                .order_by(Job.created_at, Job.id)
                .limit(limit)
            ).all()
        return [(r[0], r[1]) for r in rows]

    def queued_counts(self) -> dict[str, int]:
        """Queued jobs per queue."""
        with unit_of_work(self._sessions) as session:
            rows = session.execute(
                select(Job.queue, func.count(Job.id))
                .where(Job.status == JobStatus.QUEUED)
                .group_by(Job.queue)
            ).all()
        return {str(q): int(n) for q, n in rows}

    def queue_of(self, job_id: str) -> str:
        with unit_of_work(self._sessions) as session:
            queue = session.scalar(select(Job.queue).where(Job.id == job_id))
        if queue is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return str(queue)

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs of the same queue are ahead of ``job_id`` (0: it is next);
        ``None`` when it is not queued. Order: creation time, then id (the workers' order)."""
        with unit_of_work(self._sessions) as session:
            row = session.execute(
                select(Job.status, Job.queue, Job.created_at).where(Job.id == job_id)
            ).one_or_none()
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            status, queue, created = row
            if JobStatus(status) != JobStatus.QUEUED:
                return None
            ahead = session.scalar(
                select(func.count(Job.id)).where(
                    Job.queue == queue,
                    Job.status == JobStatus.QUEUED,
                    or_(
                        Job.created_at < created,
                        and_(Job.created_at == created, Job.id < job_id),
                    ),
                )
            )
        return int(ahead or 0)


@dataclass
class WorkerInfo:
    """One heartbeat of a worker process (what ``GET /workers`` shows of it)."""

    name: str
    host: str
    pid: int
    device: str
    queues: builtins.list[str]
    models: builtins.list[Any] = field(default_factory=builtins.list)
    current_job: str | None = None
    jobs_done: int = 0
    model_loads: int = 0
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None


class WorkerStore:
    """The ``workers`` table: one row per worker process, rewritten by each of its heartbeats."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sessions = session_factory

    def beat(self, info: WorkerInfo) -> None:
        """Insert or refresh ``info.name``'s row with ``heartbeat_at`` now."""
        now = utcnow()
        values: dict[str, Any] = {
            "host": info.host,
            "pid": info.pid,
            "device": info.device,
            "queues": builtins.list(info.queues),
            "models": builtins.list(info.models),
            "current_job": info.current_job,
            "jobs_done": info.jobs_done,
            "model_loads": info.model_loads,
            "heartbeat_at": now,
        }
        with unit_of_work(self._sessions) as session:
            row = session.get(Worker, info.name)
            if row is None:
                session.add(Worker(name=info.name, started_at=info.started_at or now, **values))
            else:
                for key, value in values.items():
                    setattr(row, key, value)

    def remove(self, name: str) -> None:
        """A worker that stops cleanly drops its row."""
        with unit_of_work(self._sessions) as session:
            session.execute(delete(Worker).where(Worker.name == name))

    def alive(self, within_s: float) -> builtins.list[WorkerInfo]:
        """Workers whose last heartbeat is at most ``within_s`` seconds old, by name."""
        cutoff = utcnow() - timedelta(seconds=within_s)
        with unit_of_work(self._sessions) as session:
            rows = session.scalars(
                select(Worker).where(Worker.heartbeat_at >= cutoff).order_by(Worker.name)
            ).all()
            return [
                WorkerInfo(
                    name=r.name,
                    host=r.host,
                    pid=r.pid,
                    device=r.device,
                    queues=builtins.list(r.queues or []),
                    models=builtins.list(r.models or []),
                    current_job=r.current_job,
                    jobs_done=r.jobs_done,
                    model_loads=r.model_loads,
                    started_at=r.started_at,
                    heartbeat_at=r.heartbeat_at,
                )
                for r in rows
            ]

    def forget_older_than(self, seconds: float) -> int:
        """Drop rows of workers silent for ``seconds`` (killed ones never remove their own)."""
        cutoff = utcnow() - timedelta(seconds=seconds)
        with unit_of_work(self._sessions) as session:
            return _rowcount(session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff)))


__all__ = ["LOST_REASON", "ClaimOutcome", "JobLeases", "WorkerInfo", "WorkerStore"]
