"""JobStore on a real SQLite file made by the Alembic migrations."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import Conflict, NotFound
from nnunet_node.storage.db import make_engine, make_sessionmaker, unit_of_work
from nnunet_node.storage.jobs import RESTART_REASON, ArtifactRecord, JobFilters, JobStore
from nnunet_node.storage.models import InputKind, Job, JobStatus
from tests.support.database import copy_database


@pytest.fixture
def db_url(tmp_path: Path, migrated_template: Path) -> str:
    return copy_database(migrated_template, tmp_path / "node.db")


@pytest.fixture
def sessions(db_url: str):
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def store(sessions: sessionmaker[Session]) -> JobStore:
    return JobStore(sessions)


def _new(store: JobStore, **kw) -> str:
    kw.setdefault("source", "http")
    kw.setdefault("request", {"nnunet_id": "phantom"})
    kw.setdefault("models", ["phantom"])
    return store.create(**kw).id


def test_create_and_get(store: JobStore) -> None:
    job_id = _new(store, series_folders=["ct"], patient_id="P1", study_instance_uid="1.2.3")
    job = store.get(job_id)
    assert job.status == JobStatus.QUEUED
    assert job.request == {"nnunet_id": "phantom"}
    assert job.series_folders == ("ct",) and job.series_uids == ()
    assert job.input_kind == InputKind.PATHS
    assert job.attempts == 0
    assert job.artifacts == () and job.dispatches == ()
    with pytest.raises(NotFound, match="nope"):
        store.get("nope")


def test_claim_takes_oldest_first_and_counts_attempts(store: JobStore) -> None:
    first, second = _new(store), _new(store)
    job = store.claim_next()
    assert job is not None and job.id == first
    assert job.status == JobStatus.RUNNING and job.attempts == 1 and job.started_at is not None
    job = store.claim_next()
    assert job is not None and job.id == second
    assert store.claim_next() is None


def test_claim_is_atomic_across_threads_and_engines(db_url: str, store: JobStore) -> None:
    """Six workers, each with its own engine (as separate processes would have), share 60 jobs:
    each job is claimed exactly once."""
    ids = {_new(store) for _ in range(60)}
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker() -> None:
        engine = make_engine(db_url)
        own = JobStore(make_sessionmaker(engine))
        try:
            start.wait()
            while (job := own.claim_next()) is not None:
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert Counter(claimed) == Counter(ids)  # every job once, none twice
    items, total = store.list(JobFilters(status="running"), limit=100)
    assert total == 60 and all(j.attempts == 1 for j in items)


def test_finish_records_result_and_artifacts(store: JobStore) -> None:
    job_id = _new(store)
    store.claim_next()
    store.set_progress(job_id, {"stage": 0, "stages": 1, "step": "predict", "fraction": 0.5})
    assert store.get(job_id).progress["step"] == "predict"
    job = store.finish(
        job_id,
        {"status": "done", "nifti_prediction": ["/x/stage_0/prediction.nii.gz"]},
        [
            ArtifactRecord("nifti_prediction", "/x/stage_0/prediction.nii.gz", 0),
            ArtifactRecord("dicom_segmentation", "/x/stage_0/prediction.dcm", 0, "1.2", "1.3"),
        ],
    )
    assert job.status == JobStatus.DONE and job.finished_at is not None
    assert [a.kind for a in job.artifacts] == ["nifti_prediction", "dicom_segmentation"]
    assert job.artifacts[1].sop_instance_uid == "1.2"
    assert store.get(job_id).result == {
        "status": "done",
        "nifti_prediction": ["/x/stage_0/prediction.nii.gz"],
    }


def test_fail_keeps_the_message(store: JobStore) -> None:
    job_id = _new(store)
    store.claim_next()
    job = store.fail(job_id, "series 'ct' not found")
    assert job.status == JobStatus.FAILED and job.error == "series 'ct' not found"


def test_cancel_queued_job_never_runs(store: JobStore) -> None:
    job_id = _new(store)
    job = store.cancel(job_id)
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert store.claim_next() is None
    with pytest.raises(Conflict):
        store.cancel(job_id)


def test_cancel_running_job_is_not_overwritten_by_finish(store: JobStore) -> None:
    job_id = _new(store)
    store.claim_next()
    store.cancel(job_id)
    assert store.status(job_id) == JobStatus.CANCELLED
    store.set_progress(job_id, {"step": "late"})
    job = store.finish(job_id, {"status": "done"})
    assert job.status == JobStatus.CANCELLED
    assert job.progress.get("step") != "late"
    assert store.fail(job_id, "late failure").status == JobStatus.CANCELLED


def test_cancel_finished_job_is_a_conflict(store: JobStore) -> None:
    job_id = _new(store)
    store.claim_next()
    store.finish(job_id, {"status": "done"})
    with pytest.raises(Conflict, match="done"):
        store.cancel(job_id)


def test_restart_recovery_retries_once_then_fails(store: JobStore) -> None:
    running, waiting = _new(store), _new(store)
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == running
    # the process dies while `running` runs (attempt 1) and `waiting` waits
    requeued, failed = store.recover_after_restart()
    assert requeued == [running] and failed == []
    assert store.get(running).status == JobStatus.QUEUED
    assert store.get(waiting).status == JobStatus.QUEUED

    again = store.claim_next()
    assert again is not None and again.id == running and again.attempts == 2
    # interrupted a second time: failed with the reason
    requeued, failed = store.recover_after_restart()
    assert requeued == [] and failed == [running]
    job = store.get(running)
    assert job.status == JobStatus.FAILED and job.error == RESTART_REASON
    nxt = store.claim_next()
    assert nxt is not None and nxt.id == waiting


def test_requeue_after_a_graceful_stop_keeps_the_attempt_count(store: JobStore) -> None:
    job_id = _new(store)
    store.claim_next()
    assert store.requeue(job_id)
    job = store.get(job_id)
    assert job.status == JobStatus.QUEUED and job.attempts == 0
    assert not store.requeue(job_id)  # only running jobs


def test_supersede(store: JobStore) -> None:
    queued, done = _new(store), _new(store)
    store.claim_next()
    store.finish(queued, {"status": "done"})
    # `queued` is done now; `done` is still queued
    newer = _new(store)
    job = store.supersede(queued, newer)
    assert job.status == JobStatus.SUPERSEDED and job.superseded_by == newer
    assert job.result == {"status": "done"}  # a done job keeps its result
    job = store.supersede(done, newer)
    assert job.status == JobStatus.SUPERSEDED
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == newer  # the superseded queued job never runs


def test_list_filters_paging_and_order(store: JobStore, sessions: sessionmaker[Session]) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    ids = []
    for i in range(12):
        job_id = _new(
            store,
            source="dimse" if i % 3 == 0 else "http",
            models=["phantom", "phantom_cube"] if i % 2 else ["phantom_cube"],
            patient_id=f"P{i % 2}",
            study_instance_uid=f"1.2.{i % 4}",
            route_name="phantom-ct" if i % 3 == 0 else None,
        )
        ids.append(job_id)
        with unit_of_work(sessions) as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(created_at=base + timedelta(hours=i))
            )
    store.cancel(ids[5])

    items, total = store.list(limit=5)
    assert total == 12
    assert [j.id for j in items] == ids[::-1][:5]  # newest first
    items, total = store.list(limit=5, offset=10)
    assert [j.id for j in items] == [ids[1], ids[0]] and total == 12

    def found(**kw) -> set[str]:
        items, total = store.list(JobFilters(**kw), limit=100)
        assert total == len(items)
        return {j.id for j in items}

    assert found(source="dimse") == {ids[i] for i in (0, 3, 6, 9)}
    assert found(model="phantom") == {ids[i] for i in range(12) if i % 2}  # whole ids only
    assert found(model="phantom_cube") == set(ids)
    assert found(model="phan%") == set()
    assert found(patient_id="P0") == {ids[i] for i in range(0, 12, 2)}
    assert found(study_instance_uid="1.2.3") == {ids[3], ids[7], ids[11]}
    assert found(status="cancelled") == {ids[5]}
    assert found(status=["queued", "cancelled"]) == set(ids)
    assert found(route_name="phantom-ct") == {ids[i] for i in (0, 3, 6, 9)}
    after, before = base + timedelta(hours=3), base + timedelta(hours=6)
    assert found(created_after=after, created_before=before) == {ids[3], ids[4], ids[5]}
    # a naive bound is read as UTC; another offset is converted
    assert found(created_after=after.replace(tzinfo=None)) == set(ids[3:])
    plus_two = after.astimezone(timezone(timedelta(hours=2)))
    assert found(created_after=plus_two) == set(ids[3:])
    assert found(source="http", patient_id="P1", model="phantom") == {ids[i] for i in (1, 5, 7, 11)}
