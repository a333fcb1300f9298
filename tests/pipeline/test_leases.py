"""Job leases of worker processes, with the real job service, runner and demo model on SQLite.

A worker process claims a job through its lease (``storage.workers.JobLeases``) and runs it with
``JobService.run_claimed``; meanwhile the node's broker sweep (``JobLeases.reap``) puts back in
the queue every running job whose lease ran out. A job that runs much longer than the lease must
still run once (its lease renewed while it runs: ``pipeline.execution.LeaseKeeper``); a job whose
worker stopped renewing (it died) is taken over after the lease, by another worker, and runs
there. The same with real worker processes and a broker: tests/integration/test_celery_workers.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.context import NodeContext, build_context
from nnunet_node.storage.models import JobStatus
from nnunet_node.storage.workers import JobLeases

pytestmark = pytest.mark.slow

LEASE_S = 1.5
"""Far shorter than a job of the demo model on a 64^3 phantom (27 sliding windows: 24 s on 2
loaded cores), long enough that a renewal delayed by a loaded machine (SQLite's busy waits, a
starved thread: up to about a second was seen) still comes in time."""


@pytest.fixture
def context(demo_settings: Settings) -> Iterator[NodeContext]:
    settings = demo_settings.model_copy(update={"job_lease_s": LEASE_S, "job_max_attempts": 2})
    built = build_context(settings, recover=False, broker=False)  # as `nnunet-node worker`
    try:
        yield built
    finally:
        built.close()


def _submit(context: NodeContext, root: Path, shape: tuple[int, int, int] = (64, 64, 64)) -> str:
    phantom = make_phantom(7, shape=shape, spacing=(1.2, 1.2, 1.5))
    write_dicom_series(phantom, root / "ct")
    request = {
        "nnunet_id": "phantom",
        "study_path": str(root),
        "series_folders": ["ct"],
        "tta": False,
    }
    return context.job_service.submit(request, source="http")


def _run_while_sweeping(
    context: NodeContext, leases: JobLeases, job_id: str, worker: str
) -> tuple[JobStatus | None, list[Any]]:
    """Run the claimed job as ``worker`` does, while this thread sweeps as the node does;
    return its status and every job the sweeps requeued or failed."""
    job = context.job_service.store.get(job_id)
    outcome: list[JobStatus] = []
    runner = threading.Thread(
        target=lambda: outcome.append(context.job_service.run_claimed(job, worker=worker))
    )
    runner.start()
    reaped: list[Any] = []
    while runner.is_alive():
        requeued, failed = leases.reap(max_attempts=2)
        reaped += requeued + failed
        time.sleep(LEASE_S / 4)
    runner.join()
    return (outcome[0] if outcome else None), reaped


def test_a_job_much_longer_than_its_lease_runs_once(context: NodeContext, tmp_path: Path) -> None:
    leases = JobLeases(context.session_factory)
    job_id = _submit(context, tmp_path / "studies" / "long")
    assert leases.claim(job_id, "w1@test", lease_s=LEASE_S, max_attempts=2).claimed
    status, reaped = _run_while_sweeping(context, leases, job_id, "w1@test")
    view = context.job_service.store.get(job_id)
    assert reaped == [], "the sweep took the job of a live worker"
    assert status == JobStatus.DONE and view.status == JobStatus.DONE, view.error
    assert view.attempts == 1 and view.worker == "w1@test"
    assert view.lease_expires_at is None  # released once recorded
    assert view.started_at is not None and view.finished_at is not None
    ran = (view.finished_at - view.started_at).total_seconds()
    assert ran > 2 * LEASE_S, f"the job took {ran:.2f} s: not longer than its lease"
    assert view.result is not None and view.result["nifti_prediction"]


def test_a_job_whose_worker_died_is_taken_over_after_the_lease(
    context: NodeContext, tmp_path: Path
) -> None:
    leases = JobLeases(context.session_factory)
    job_id = _submit(context, tmp_path / "studies" / "orphan", shape=(32, 32, 32))
    # A worker claims the job and dies before running it: nothing renews its lease.
    assert leases.claim(job_id, "dead@test", lease_s=LEASE_S, max_attempts=2).claimed
    assert leases.reap(max_attempts=2) == ([], [])  # its lease still runs
    assert not leases.claim(job_id, "w2@test", lease_s=LEASE_S, max_attempts=2).claimed
    time.sleep(LEASE_S * 1.5)
    taken = leases.claim(job_id, "w2@test", lease_s=LEASE_S, max_attempts=2)
    assert taken.claimed and taken.attempts == 2
    status, reaped = _run_while_sweeping(context, leases, job_id, "w2@test")
    view = context.job_service.store.get(job_id)
    assert reaped == [] and status == JobStatus.DONE, view.error
    assert view.worker == "w2@test" and view.attempts == 2
