"""Job queues: which queue a job goes to, its place in it, and the node's sweep of a broker queue.

The sweep is tested with its two broker calls (send an id, count the messages waiting in a queue)
given as plain functions over a real SQLite database; the whole path through a real Redis and
worker processes is ``tests/integration/test_celery_workers.py``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import SimpleITK as sitk
import yaml
from sqlalchemy import update

from nnunet_node.core.errors import ConfigError
from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.broker import BrokerQueue
from nnunet_node.pipeline.jobs import JobService
from nnunet_node.pipeline.spec import NodeSpec
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.db import make_engine, make_sessionmaker, unit_of_work
from nnunet_node.storage.jobs import JobStore
from nnunet_node.storage.models import Job, JobStatus, utcnow
from nnunet_node.storage.workers import JobLeases


def _spec(settings: Settings, models: list[dict[str, Any]], routes: list[dict[str, Any]]) -> None:
    raw = yaml.safe_load(settings.model_serve_spec.read_text())
    base = raw["models"][0]
    raw["models"] = [{**base, **m} for m in models]
    raw["routes"] = routes
    settings.model_serve_spec.write_text(yaml.safe_dump(raw))


def _service(settings: Settings, queue: Any = None) -> JobService:
    sessions = make_sessionmaker(make_engine(settings.database_url))
    archive = Archive(settings.archive_dir, sessions)
    return JobService(settings, sessions, NodeSpec.load(settings), archive, None, queue=queue)


def _study(settings: Settings) -> Path:
    study = settings.allowed_roots[0] / "s1"
    (study / "ct").mkdir(parents=True)
    # A real (tiny) NIfTI: submission reads the header of every input it names.
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(study / "ct" / "image.nii.gz"))
    return study


def test_route_then_model_then_default_queue(toy_settings: Settings, toy_model: Any) -> None:
    toy_model(
        Path(yaml.safe_load(toy_settings.model_serve_spec.read_text())["model_folder"]) / "other"
    )
    _spec(
        toy_settings,
        [
            {"id": "toy"},
            {"id": "other", "name": "Other", "aliases": [], "rel_path": "other", "queue": "gpu-b"},
        ],
        [
            {"name": "r", "match": {"Modality": "CT"}, "nnunet_id": "toy", "queue": "route-q"},
            {"name": "plain", "match": {"Modality": "MR"}, "nnunet_id": "other"},
        ],
    )
    service = _service(toy_settings)
    assert service.queue_for("r", ["toy"]) == "route-q"
    assert service.queue_for("plain", ["other"]) == "gpu-b"
    assert service.queue_for(None, ["toy", "other"]) == "gpu-b"
    assert service.queue_for(None, ["toy"]) == "default"

    study = _study(toy_settings)
    request = {"nnunet_id": "other", "study_path": str(study), "series_folders": ["ct"]}
    first, second = service.submit(request), service.submit(request)
    toy = service.submit({**request, "nnunet_id": "toy"})
    views = [service.get(j) for j in (first, second, toy)]
    assert [(v.queue, v.queue_position, v.worker) for v in views] == [
        ("gpu-b", 0, None),
        ("gpu-b", 1, None),
        ("default", 0, None),
    ]


@pytest.mark.parametrize("where", ["model", "route"])
def test_a_bad_queue_name_stops_start_up_naming_it(toy_settings: Settings, where: str) -> None:
    bad = "no spaces allowed"
    if where == "model":
        _spec(toy_settings, [{"id": "toy", "queue": bad}], [])
    else:
        _spec(
            toy_settings,
            [{"id": "toy"}],
            [{"name": "r1", "match": {"Modality": "CT"}, "nnunet_id": "toy", "queue": bad}],
        )
    with pytest.raises(ConfigError, match=r"(toy|r1).*queue") as caught:
        NodeSpec.load(toy_settings)
    assert bad in str(caught.value)


class FakeBroker:
    """What the sweep asks a broker: send an id to a queue, how many messages wait in one."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.waiting: dict[str, int] = {}
        self.down = False

    def send(self, job_id: str, queue: str) -> None:
        if self.down:
            raise ConnectionError("broker away")
        self.sent.append((job_id, queue))
        self.waiting[queue] = self.waiting.get(queue, 0) + 1

    def depth(self, queue: str) -> int:
        return self.waiting.get(queue, 0)


def test_broker_sweep_resends_lost_ids_and_requeues_lost_workers(
    toy_settings: Settings,
) -> None:
    settings = toy_settings.model_copy(update={"broker_resend_s": 30.0, "job_max_attempts": 2})
    sessions = make_sessionmaker(make_engine(settings.database_url))
    broker = FakeBroker()
    queue = BrokerQueue(settings, sessions, send=broker.send, depth=broker.depth)
    store, leases = JobStore(sessions), JobLeases(sessions)

    def age(job_ids: list[str], seconds: float, column: Any) -> None:
        with unit_of_work(sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(job_ids))
                .values({column: utcnow() - timedelta(seconds=seconds)})
            )

    # Submitted while the broker was away: the row is queued, its id not sent.
    broker.down = True
    away = store.create(source="http", request={}, queue="default").id
    queue.submit(away)
    assert broker.sent == []
    broker.down = False
    age([away], 10, Job.created_at)
    queue.sweep()
    assert broker.sent == [(away, "default")]

    # Two more sent; the broker restarts and loses all three messages.
    more = [store.create(source="http", request={}, queue="default").id for _ in range(2)]
    for job_id in more:
        queue.submit(job_id)
    broker.sent.clear()
    queue.sweep()
    assert broker.sent == []  # as many messages as queued jobs: nothing to do
    broker.waiting.clear()
    queue.sweep()
    assert broker.sent == []  # sent too recently to call them lost
    age([away, *more], 60, Job.enqueued_at)
    queue.sweep()
    assert sorted(broker.sent) == sorted((j, "default") for j in [away, *more])

    # A worker claims one and dies: its lease runs out, the job is queued and sent again.
    broker.sent.clear()
    assert leases.claim(away, "w1@h", lease_s=30, max_attempts=2).claimed
    age([away], 1, Job.lease_expires_at)
    result = queue.sweep()
    assert result["requeued"] == [(away, "default")]
    assert broker.sent == [(away, "default")]
    assert store.status(away) == JobStatus.QUEUED
    # ... and dies again on its last attempt: the job fails with the reason.
    assert leases.claim(away, "w2@h", lease_s=30, max_attempts=2).claimed
    age([away], 1, Job.lease_expires_at)
    assert queue.sweep()["failed"] == [away]
    job = store.get(away)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and "w2@h" in job.error and "attempt 2 of 2" in job.error
