"""Leases on running jobs and the workers' rows (``storage.workers``), on SQLite and PostgreSQL.

What makes running a job idempotent on its id when a broker delivers it at least once: only one
claim wins, a live lease is never taken over, an expired one is (counting an attempt), the last
attempt fails with the reason, and a worker that lost its job records nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import Conflict
from nnunet_node.storage.db import make_engine, make_sessionmaker, unit_of_work
from nnunet_node.storage.jobs import ArtifactRecord, JobStore
from nnunet_node.storage.migrations import upgrade
from nnunet_node.storage.models import Job, JobStatus, utcnow
from nnunet_node.storage.workers import LOST_REASON, JobLeases, WorkerInfo, WorkerStore
from tests.support.database import copy_database
from tests.support.postgres import NOT_SET, SERVER_URL, scratch_database

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(not SERVER_URL, reason=NOT_SET)),
]


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    with scratch_database("nnunet_leases") as url:
        upgrade(url)
        yield url


@pytest.fixture(params=BACKENDS)
def sessions(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_template: Path
) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = copy_database(migrated_template, tmp_path / "node.db")
    else:
        url = request.getfixturevalue("pg_database")
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    with unit_of_work(factory) as session:  # the PostgreSQL database is shared by the module
        session.execute(text("DELETE FROM jobs"))
        session.execute(text("DELETE FROM workers"))
    yield factory
    engine.dispose()


def _job(store: JobStore, queue: str = "default") -> str:
    return store.create(source="http", request={"nnunet_id": "x"}, queue=queue).id


def _expire(sessions: sessionmaker[Session], job_id: str) -> None:
    with unit_of_work(sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_one_claim_wins_among_many_workers(sessions: sessionmaker[Session]) -> None:
    store, leases = JobStore(sessions), JobLeases(sessions)
    job_id = _job(store)
    wins: list[str] = []
    barrier = threading.Barrier(6)

    def worker(name: str) -> None:
        barrier.wait()
        if leases.claim(job_id, name, lease_s=30, max_attempts=2).claimed:
            wins.append(name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    job = store.get(job_id)
    assert job.status == JobStatus.RUNNING
    assert job.worker == wins[0]
    assert job.attempts == 1


def test_live_lease_is_not_taken_over_and_finished_job_not_rerun(
    sessions: sessionmaker[Session],
) -> None:
    store, leases = JobStore(sessions), JobLeases(sessions)
    job_id = _job(store)
    assert leases.claim(job_id, "a", lease_s=30, max_attempts=2).claimed
    second = leases.claim(job_id, "b", lease_s=30, max_attempts=2)
    assert not second.claimed
    assert (second.status, second.holder) == (JobStatus.RUNNING, "a")
    store.finish(job_id, {"status": "done"}, worker="a")
    again = leases.claim(job_id, "b", lease_s=30, max_attempts=2)
    assert not again.claimed and again.status == JobStatus.DONE
    assert leases.claim("0" * 32, "b", lease_s=30, max_attempts=2).status is None


def test_expired_lease_is_taken_over_and_the_loser_records_nothing(
    sessions: sessionmaker[Session],
) -> None:
    store, leases = JobStore(sessions), JobLeases(sessions)
    job_id = _job(store)
    assert leases.claim(job_id, "a", lease_s=30, max_attempts=3).claimed
    _expire(sessions, job_id)
    taken = leases.claim(job_id, "b", lease_s=30, max_attempts=3)
    assert taken.claimed and taken.attempts == 2
    assert not leases.renew(job_id, "a", lease_s=30)  # a learns it lost the job
    assert leases.renew(job_id, "b", lease_s=30)
    with pytest.raises(Conflict):
        store.finish(
            job_id, {"status": "done"}, [ArtifactRecord("nifti_prediction", "/a")], worker="a"
        )
    store.fail(job_id, "a's error", worker="a")  # ignored: not a's job any more
    job = store.get(job_id)
    assert (job.status, job.worker, job.artifacts) == (JobStatus.RUNNING, "b", ())
    store.finish(job_id, {"status": "done"}, [ArtifactRecord("nifti_prediction", "/b")], worker="b")
    job = store.get(job_id)
    assert job.status == JobStatus.DONE
    assert [a.path for a in job.artifacts] == ["/b"]
    assert job.lease_expires_at is None


def test_last_attempt_fails_with_the_reason(sessions: sessionmaker[Session]) -> None:
    store, leases = JobStore(sessions), JobLeases(sessions)
    job_id = _job(store)
    assert leases.claim(job_id, "a", lease_s=30, max_attempts=2).claimed
    _expire(sessions, job_id)
    assert leases.claim(job_id, "b", lease_s=30, max_attempts=2).claimed
    _expire(sessions, job_id)
    third = leases.claim(job_id, "c", lease_s=30, max_attempts=2)
    assert not third.claimed and third.status == JobStatus.FAILED
    job = store.get(job_id)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and LOST_REASON in job.error and "(b)" in job.error


def test_reap_requeues_then_fails_and_leaves_in_process_jobs_alone(
    sessions: sessionmaker[Session],
) -> None:
    store, leases = JobStore(sessions), JobLeases(sessions)
    lost, last, alive = _job(store, "gpu"), _job(store), _job(store)
    in_process = _job(store)
    for job_id in (lost, last, alive):
        assert leases.claim(job_id, "a", lease_s=30, max_attempts=2).claimed
    assert store.claim_next() is not None  # the in-process claim: no lease
    _expire(sessions, last)
    assert leases.claim(last, "b", lease_s=30, max_attempts=2).claimed  # attempt 2
    _expire(sessions, lost)
    _expire(sessions, last)
    requeued, failed = leases.reap(max_attempts=2)
    assert requeued == [(lost, "gpu")]
    assert failed == [last]
    assert store.status(lost) == JobStatus.QUEUED
    assert store.status(alive) == JobStatus.RUNNING
    assert store.status(in_process) == JobStatus.RUNNING
    assert leases.reap(max_attempts=2) == ([], [])


def test_queue_position_counts_queued_jobs_ahead_in_the_same_queue(
    sessions: sessionmaker[Session],
) -> None:
    store, leases = JobStore(sessions), JobLeases(sessions)
    a, b, other, c = _job(store), _job(store), _job(store, "gpu"), _job(store)
    assert [leases.queue_position(j) for j in (a, b, other, c)] == [0, 1, 0, 2]
    assert leases.claim(a, "w", lease_s=30, max_attempts=2).claimed
    assert [leases.queue_position(j) for j in (a, b, c)] == [None, 0, 1]
    store.cancel(b)
    assert leases.queue_position(c) == 0
    assert leases.queued_counts() == {"default": 1, "gpu": 1}


def test_unsent_lists_never_sent_then_stale_ids(sessions: sessionmaker[Session]) -> None:
    store, leases = JobStore(sessions), JobLeases(sessions)
    a, b = _job(store), _job(store, "gpu")
    assert leases.unsent() == [(a, "default"), (b, "gpu")]
    leases.mark_enqueued([a, b])
    assert leases.unsent() == []
    assert leases.unsent(older_than_s=60) == []
    assert leases.unsent(older_than_s=0) == [(a, "default"), (b, "gpu")]


def test_worker_rows_alive_and_forgotten(sessions: sessionmaker[Session]) -> None:
    workers = WorkerStore(sessions)
    info = WorkerInfo(name="w1@h", host="h", pid=1, device="cuda:1", queues=["gpu"])
    workers.beat(info)
    info.current_job, info.models = "j1", [{"model": "phantom"}]
    workers.beat(info)
    workers.beat(WorkerInfo(name="w2@h", host="h", pid=2, device="cpu", queues=["default"]))
    alive = workers.alive(60)
    assert [w.name for w in alive] == ["w1@h", "w2@h"]
    assert (alive[0].current_job, alive[0].models, alive[0].device) == (
        "j1",
        [{"model": "phantom"}],
        "cuda:1",
    )
    workers.remove("w2@h")
    assert [w.name for w in workers.alive(60)] == ["w1@h"]
    assert workers.forget_older_than(-1) == 1
    assert workers.alive(60) == []
