"""Dispatch records: where a job's DICOM results go, and every attempt to send them.

A ``dispatches`` row per destination of a job: ``pending`` until sent, or ``failed`` once the
sender gives up. Sending (and the retry policy) lives in ``pipeline.dispatch``; every SQL
statement on ``dispatches`` is here. A claim sets a lease (``next_attempt_at`` in the future)
with a conditional update, so two processes sharing the database never send the same one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.clock import as_utc, utcnow
from nnunet_node.core.errors import Conflict, NotFound
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.jobs import DispatchRecord, dispatch_record
from nnunet_node.storage.models import Dispatch, DispatchStatus, Instance, Job, JobArtifact

DICOM_ARTIFACT_KINDS = ("dicom_segmentation", "dicom_struct", "dicom_fractional_segmentation")


@dataclass(frozen=True)
class ClaimedDispatch:
    """A dispatch leased to this caller, with the files to send (existing DICOM results)."""

    id: int
    job_id: str
    destination: str
    files: list[Path]


Decision = tuple[DispatchStatus, datetime | None]
"""The status after an attempt and when to try next (None: not again)."""


class DispatchStore:
    """Create, claim and update dispatches; thread-safe (a session per call)."""

    def __init__(self, session_factory: sessionmaker[Session], archive_dir: Path) -> None:
        self._sessions = session_factory
        self._archive_dir = archive_dir

    def add_for_job(self, job_id: str, destinations: Iterable[str]) -> list[str]:
        """One pending dispatch, due now, per destination the job has none for yet (a second
        call adds nothing). Returns the destinations added."""
        added: list[str] = []
        with unit_of_work(self._sessions) as session:
            if session.get(Job, job_id) is None:
                raise NotFound(f"job {job_id!r} does not exist")
            existing = set(
                session.scalars(select(Dispatch.destination).where(Dispatch.job_id == job_id))
            )
            now = utcnow()
            for name in destinations:
                if name not in existing and name not in added:
                    session.add(
                        Dispatch(
                            job_id=job_id,
                            destination=name,
                            status=DispatchStatus.PENDING,
                            attempts=[],
                            next_attempt_at=now,
                        )
                    )
                    added.append(name)
        return added

    def retry(self, dispatch_id: int, marker: dict[str, Any]) -> DispatchRecord:
        """Make a pending or failed dispatch due now, appending ``marker`` to its attempts; a
        sent one is a :class:`Conflict`, an unknown one :class:`NotFound`."""
        with unit_of_work(self._sessions) as session:
            dispatch = session.get(Dispatch, dispatch_id)
            if dispatch is None:
                raise NotFound(f"dispatch {dispatch_id} does not exist")
            if dispatch.status == DispatchStatus.SENT:
                raise Conflict(f"dispatch {dispatch_id} was sent already")
            dispatch.status = DispatchStatus.PENDING
            dispatch.next_attempt_at = utcnow()
            dispatch.attempts = [*(dispatch.attempts or []), dict(marker)]
            session.flush()
            return dispatch_record(dispatch)

    def claim_due(self, *, lease_s: float) -> ClaimedDispatch | None:
        """Lease the pending dispatch due first (``next_attempt_at <= now``) for ``lease_s``;
        None when none is due or another process took it meanwhile."""
        now = utcnow()
        with unit_of_work(self._sessions) as session:
            candidate = session.scalars(
                select(Dispatch)
                .where(Dispatch.status == DispatchStatus.PENDING, Dispatch.next_attempt_at <= now)
                .order_by(Dispatch.next_attempt_at)
                .limit(1)
            ).first()
            if candidate is None:
                return None
            claimed = session.execute(
                update(Dispatch)
                .where(
                    Dispatch.id == candidate.id,
                    Dispatch.status == DispatchStatus.PENDING,
                    Dispatch.next_attempt_at == candidate.next_attempt_at,
                )
                .values(next_attempt_at=now + timedelta(seconds=lease_s))
                .execution_options(synchronize_session=False)
            )
            assert isinstance(claimed, CursorResult)
            if claimed.rowcount != 1:
                return None  # another process took it
            files = self._result_files(session, candidate.job_id)
            return ClaimedDispatch(candidate.id, candidate.job_id, candidate.destination, files)

    def _result_files(self, session: Session, job_id: str) -> list[Path]:
        """The job's DICOM results: its output files, or their archived copies."""
        files: list[Path] = []
        artifacts = session.scalars(
            select(JobArtifact)
            .where(JobArtifact.job_id == job_id, JobArtifact.kind.in_(DICOM_ARTIFACT_KINDS))
            .order_by(JobArtifact.id)
        )
        for artifact in artifacts:
            path = Path(artifact.path)
            if not path.is_file() and artifact.sop_instance_uid:
                archived = session.scalars(
                    select(Instance.path).where(
                        Instance.sop_instance_uid == artifact.sop_instance_uid
                    )
                ).first()
                if archived:
                    path = self._archive_dir / archived
            if path.is_file() and path not in files:
                files.append(path)
        return files

    def record_attempt(
        self,
        dispatch_id: int,
        attempt: dict[str, Any],
        decide: Callable[[list[dict[str, Any]]], Decision],
    ) -> DispatchRecord | None:
        """Append ``attempt`` and set what ``decide(all attempts)`` returns, in one transaction;
        None when the dispatch is gone."""
        with unit_of_work(self._sessions) as session:
            dispatch = session.get(Dispatch, dispatch_id)
            if dispatch is None:
                return None
            attempts = [*(dispatch.attempts or []), dict(attempt)]
            dispatch.attempts = attempts
            dispatch.status, dispatch.next_attempt_at = decide(attempts)
            session.flush()
            return dispatch_record(dispatch)

    def latest_for(self, destination: str) -> DispatchRecord | None:
        """The dispatch to ``destination`` changed last (any job), or None when there is none."""
        with self._sessions() as session:
            last = session.scalars(
                select(Dispatch)
                .where(Dispatch.destination == destination)
                .order_by(Dispatch.updated_at.desc(), Dispatch.id.desc())
                .limit(1)
            ).first()
            return dispatch_record(last) if last is not None else None

    def next_due(self) -> datetime | None:
        """When the next pending dispatch is due (UTC), or None."""
        with self._sessions() as session:
            due = session.scalars(
                select(Dispatch.next_attempt_at)
                .where(Dispatch.status == DispatchStatus.PENDING)
                .order_by(Dispatch.next_attempt_at)
                .limit(1)
            ).first()
        if due is None:
            return None
        return as_utc(due)


__all__ = ["DICOM_ARTIFACT_KINDS", "ClaimedDispatch", "Decision", "DispatchStore"]
