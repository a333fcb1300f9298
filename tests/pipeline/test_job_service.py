"""JobService: validation, the queue, worker threads, waiting, cancelling, restarts, hooks.

These tests drive the real database, archive, spec and runner; only the inference engine is a small
stand-in (it thresholds the input image) so that queue behaviour can be held at will. The real
engine runs in test_runner_end_to_end.py.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_node.core.errors import (
    ConfigError,
    InferenceError,
    InvalidRequest,
    JobCancelled,
    NotFound,
    PathNotAllowed,
    UnknownModel,
)
from nnunet_node.core.settings import Settings
from nnunet_node.inference.request import Plan
from nnunet_node.pipeline.context import build_context
from nnunet_node.pipeline.jobs import JobService
from nnunet_node.pipeline.spec import NodeSpec
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.jobs import RESTART_REASON
from nnunet_node.storage.models import JobStatus
from nnunet_node.storage.workers import WorkerInfo
from tests.support.contract import RESULT_FIELDS


@dataclass
class StageOut:
    index: int
    model_id: str
    folder: Path
    prediction: sitk.Image
    probabilities: np.ndarray | None
    labels: list[int]
    files: dict[str, list[Path]]
    is_dicom: bool = False
    source_dicom_files: list[Path] = field(default_factory=list)


class StandInEngine:
    """Thresholds each stage's first input at 0.5. ``hold()`` makes runs wait for ``release()``
    (checking ``should_stop`` meanwhile); ``error`` makes them raise."""

    def __init__(self) -> None:
        self.calls: list[Path] = []
        self.started = threading.Event()
        self._gate: threading.Event | None = None
        self.error: BaseException | None = None

    def hold(self) -> None:
        self._gate = threading.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def run(
        self,
        plan: Plan,
        study_path: Path,
        output_dir: Path,
        *,
        progress=None,
        should_stop=None,
        layouts=None,
    ):
        self.calls.append(output_dir)
        self.started.set()
        if progress:
            progress({"stage": 0, "step": "predicting", "fraction": 0.5})
        while self._gate is not None and not self._gate.wait(0.02):
            if should_stop and should_stop():
                raise JobCancelled("stopped")
        if self.error is not None:
            raise self.error
        out = []
        for stage in plan.stages:
            first = stage.inputs[0].path
            assert first is not None
            image = sitk.ReadImage(str(study_path / first / "image.nii.gz"))
            label = sitk.Cast(image > 0.5, sitk.sitkUInt8)
            folder = output_dir / f"stage_{stage.index}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "prediction.nii.gz"
            sitk.WriteImage(label, str(path))
            out.append(
                StageOut(
                    stage.index,
                    stage.model.id,
                    folder,
                    label,
                    None,
                    [0, 1],
                    {"nifti_prediction": [path]},
                )
            )
        return out


def write_study(root: Path, name: str = "study1") -> Path:
    study = root / name
    series = study / "ct"
    series.mkdir(parents=True)
    arr = np.zeros((6, 8, 8), dtype=np.float32)
    arr[2:4, 2:6, 2:6] = 1.0
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(series / "image.nii.gz"))
    return study


def make_service(settings: Settings, engine: Any) -> JobService:
    sql = make_engine(settings.database_url)
    sessions = make_sessionmaker(sql)
    archive = Archive(settings.archive_dir, sessions)
    return JobService(settings, sessions, NodeSpec.load(settings), archive, engine, poll_s=0.1)


@pytest.fixture
def engine() -> StandInEngine:
    return StandInEngine()


@pytest.fixture
def service(toy_settings: Settings, engine: StandInEngine):
    svc = make_service(toy_settings, engine)
    yield svc
    engine.release()
    svc.stop(timeout=5)


def request_for(study: Path, **extra: Any) -> dict[str, Any]:
    return {"nnunet_id": "toy", "study_path": str(study), "series_folders": ["ct"], **extra}


# --- validation -------------------------------------------------------------------------------
def test_bad_requests_are_refused_before_any_row(
    service: JobService, toy_settings: Settings, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    outside = write_study(tmp_path, "elsewhere")
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({**request_for(study), "nnunet_id": "nope"}, UnknownModel, "nnunet_id"),
        (request_for(outside), PathNotAllowed, "study_path"),
        (
            request_for(study, series_folders=["../../elsewhere/ct"]),
            PathNotAllowed,
            "series_folders",
        ),
        (request_for(study, series_folders=["missing"]), InvalidRequest, "series_folders"),
        (request_for(study, output_dir="/etc/out"), PathNotAllowed, "output_dir"),
        (request_for(study, crop_from="/etc/passwd"), PathNotAllowed, "crop_from"),
        (request_for(study, tmp_dir="/etc/tmp"), PathNotAllowed, "tmp_dir"),
        ({"nnunet_id": "toy", "series_folders": ["ct"]}, InvalidRequest, "study_path"),
        (request_for(study, bogus=1), InvalidRequest, "bogus"),
    ]
    for request, error, field_name in cases:
        with pytest.raises(error, match=field_name):
            service.submit(request)
    assert service.list()[1] == 0


def test_links_out_of_the_roots_are_refused(service: JobService, tmp_path: Path) -> None:
    study = write_study(tmp_path / "studies")
    outside = write_study(tmp_path, "elsewhere")
    (study / "sneaky").symlink_to(outside / "ct")
    with pytest.raises(PathNotAllowed, match="series_folders"):
        service.submit(request_for(study, series_folders=["sneaky"]))


def test_archive_job_for_unknown_series_is_refused(service: JobService) -> None:
    with pytest.raises(NotFound, match=r"1\.2\.3\.4"):
        service.submit({"nnunet_id": "toy"}, source="dimse", series_uids=["1.2.3.4"])
    with pytest.raises(InvalidRequest, match="series_uids"):
        service.submit({"nnunet_id": "toy"}, source="dimse", series_uids=["../x"])


# --- running ---------------------------------------------------------------------------------
def test_a_job_runs_in_a_worker_and_answers_like_infer(
    service: JobService, engine: StandInEngine, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    done_hooks: list[str] = []
    service.subscribe_done(done_hooks.append)
    service.subscribe_done(lambda job_id: 1 / 0)  # a broken hook changes nothing
    service.start()
    job_id = service.submit(request_for(study, nnunet_id="toy_alias"))
    view = asyncio.run(service.wait(job_id, timeout=30))
    assert view.status == "done", view.error
    assert view.models == ("toy",) and view.series_folders == ("ct",) and view.attempts == 1
    assert view.input_kind == "paths" and view.study_path == str(study.resolve())
    result = view.result
    assert result is not None
    assert set(result) >= RESULT_FIELDS, RESULT_FIELDS - set(result)
    assert result["status"] == "done"
    assert result["request"]["nnunet_id"] == "toy_alias"
    prediction = Path(result["nifti_prediction"][0])
    assert prediction.is_file()
    assert prediction.parent.parent == service.settings.jobs_dir / job_id  # default output dir
    assert [a.kind for a in view.artifacts] == ["nifti_prediction"]
    assert view.progress["step"] == "done"
    assert done_hooks == [job_id]


def test_output_dir_of_the_request_is_used(service: JobService, tmp_path: Path) -> None:
    study = write_study(tmp_path / "studies")
    out = tmp_path / "studies" / "out"
    service.start()
    job_id = service.submit(request_for(study, output_dir=str(out)))
    view = asyncio.run(service.wait(job_id, timeout=30))
    assert view.status == "done"
    assert view.result is not None
    assert view.result["nifti_prediction"] == [str(out / "stage_0" / "prediction.nii.gz")]


def test_wait_leaves_the_event_loop_free(
    service: JobService, engine: StandInEngine, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    engine.hold()
    service.start()
    job_id = service.submit(request_for(study))

    async def scenario() -> tuple[int, str]:
        ticks = 0
        waiter = asyncio.create_task(service.wait(job_id))
        # the loop keeps running other work while the job is held in its worker
        while ticks < 20:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not waiter.done()
        engine.release()
        view = await waiter
        return ticks, view.status

    ticks, status = asyncio.run(scenario())
    assert ticks == 20 and status == "done"


def test_wait_with_timeout_returns_the_current_state(
    service: JobService, engine: StandInEngine, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    engine.hold()
    service.start()
    job_id = service.submit(request_for(study))
    view = asyncio.run(service.wait(job_id, timeout=0.3))
    assert view.status in ("queued", "running")


def test_failures_are_recorded_with_their_message(
    service: JobService, engine: StandInEngine, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    engine.error = InferenceError("nnU-Net ran out of memory")
    job_id = service.submit(request_for(study))
    assert service.run_pending() == 1
    view = service.get(job_id)
    assert view.status == "failed" and view.error == "nnU-Net ran out of memory"
    engine.error = RuntimeError("boom")
    job_id = service.submit(request_for(study))
    service.run_pending()
    view = service.get(job_id)
    assert view.status == "failed"
    assert view.error is not None and "RuntimeError: boom" in view.error


def test_a_series_deleted_after_submission_fails_the_job(
    service: JobService, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    job_id = service.submit(request_for(study))
    (study / "ct" / "image.nii.gz").unlink()
    (study / "ct").rmdir()
    service.run_pending()
    view = service.get(job_id)
    assert view.status == "failed"
    assert view.error is not None and "series_folders" in view.error


# --- cancelling ------------------------------------------------------------------------------
def test_cancel_queued_and_running_jobs(
    toy_settings: Settings, engine: StandInEngine, tmp_path: Path
) -> None:
    settings = toy_settings.model_copy(update={"workers": 1})
    service = make_service(settings, engine)
    study = write_study(tmp_path / "studies")
    engine.hold()
    service.start()
    try:
        running = service.submit(request_for(study))
        assert engine.started.wait(10)
        queued = service.submit(request_for(study))
        assert service.cancel(queued).status == "cancelled"
        view = service.cancel(running)
        assert view.status == "cancelled"
        view = asyncio.run(service.wait(running, timeout=10))
        assert view.status == "cancelled" and view.error == "cancelled while running"
        # the worker is free again and the cancelled queued job never ran
        later = service.submit(request_for(study))
        engine.release()
        assert asyncio.run(service.wait(later, timeout=30)).status == "done"
        assert len(engine.calls) == 2
        assert service.get(queued).started_at is None
    finally:
        engine.release()
        service.stop(timeout=5)


# --- restarts --------------------------------------------------------------------------------
def test_stop_leaves_queued_jobs_queued_and_a_restart_runs_them(
    toy_settings: Settings, tmp_path: Path
) -> None:
    settings = toy_settings.model_copy(update={"workers": 1})
    study = write_study(tmp_path / "studies")
    first_engine = StandInEngine()
    first_engine.hold()
    first = make_service(settings, first_engine)
    first.start()
    running = first.submit(request_for(study))
    assert first_engine.started.wait(10)
    queued = first.submit(request_for(study))
    first.stop(timeout=0.2)  # the running job does not finish in time: asked to stop, requeued
    assert first.get(running).status == "queued"
    assert first.get(running).attempts == 0
    assert first.get(queued).status == "queued"

    second = make_service(settings, StandInEngine())
    second.start()
    try:
        for job_id in (running, queued):
            assert asyncio.run(second.wait(job_id, timeout=30)).status == "done"
    finally:
        second.stop(timeout=5)


def test_a_job_running_when_the_process_died_is_retried_once(
    toy_settings: Settings, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    dead = make_service(toy_settings, StandInEngine())
    job_id = dead.submit(request_for(study))
    assert dead.store.claim_next() is not None  # the process dies with the job running

    engine = StandInEngine()
    engine.error = RuntimeError("never reached")
    crashed_again = make_service(toy_settings, engine)
    crashed_again.store.recover_after_restart()
    assert crashed_again.get(job_id).status == "queued"
    assert crashed_again.store.claim_next() is not None  # attempt 2, and the process dies again

    restarted = make_service(toy_settings, StandInEngine())
    restarted.start()
    try:
        view = restarted.get(job_id)
        assert view.status == "failed" and view.error == RESTART_REASON and view.attempts == 2
    finally:
        restarted.stop(timeout=5)


def test_history_through_the_service(service: JobService, tmp_path: Path) -> None:
    study = write_study(tmp_path / "studies")
    ids = [service.submit(request_for(study)) for _ in range(3)]
    service.cancel(ids[0])
    items, total = service.list(model="toy_alias", limit=2)
    assert total == 3 and [v.id for v in items] == [ids[2], ids[1]]
    items, total = service.list(status="cancelled")
    assert [v.id for v in items] == [ids[0]]
    assert items[0].created_at.tzinfo is not None
    with pytest.raises(InvalidRequest, match="status"):
        service.list(status="weird")
    assert service.get(ids[1]).status == JobStatus.QUEUED.value


def test_a_study_folder_of_the_nodes_own_is_not_echoed(service: JobService, tmp_path: Path) -> None:
    """/infer_file extracts the upload to a folder of the node's choosing and passes it as
    ``study_path``: it need not be under the allowed roots, series may not leave it, and the
    job's request stays the client's."""
    upload = write_study(tmp_path / "uploads")  # not an allowed root
    outside = write_study(tmp_path, "elsewhere")
    request = {"nnunet_id": "toy", "series_folders": ["ct"]}
    with pytest.raises(PathNotAllowed, match="series_folders"):
        service.submit({**request, "series_folders": [str(outside / "ct")]}, study_path=upload)
    with pytest.raises(InvalidRequest, match="_study_path"):
        service.submit({**request, "_study_path": str(outside)}, study_path=upload)
    job_id = service.submit(request, study_path=upload)
    assert service.get(job_id).request == request
    service.run_pending()
    view = service.get(job_id)
    assert view.status == "done", view.error
    assert view.result is not None and view.result["request"] == request


def test_progress_of_a_running_job_is_visible(
    service: JobService, engine: StandInEngine, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    engine.hold()
    service.start()
    job_id = service.submit(request_for(study))
    assert engine.started.wait(10)
    seen: list[str] = []
    for _ in range(100):  # the report held back by the rate limit is written soon after
        view = service.get(job_id)
        seen.append(view.progress.get("step", ""))
        if seen[-1] == "predicting":
            break
        threading.Event().wait(0.05)
    assert view.status == "running" and seen[-1] == "predicting", seen
    assert view.progress["stages"] == 1 and view.started_at is not None
    engine.release()
    assert asyncio.run(service.wait(job_id, timeout=30)).progress["step"] == "done"


def test_a_running_job_superseded_by_a_newer_one_stops(
    toy_settings: Settings, tmp_path: Path
) -> None:
    settings = toy_settings.model_copy(update={"workers": 1})
    engine = StandInEngine()
    service = make_service(settings, engine)
    study = write_study(tmp_path / "studies")
    done: list[str] = []
    service.subscribe_done(done.append)
    engine.hold()
    service.start()
    try:
        old = service.submit(request_for(study))
        assert engine.started.wait(10)
        new = service.submit(request_for(study))
        view = service.supersede(old, new)
        assert view.status == "superseded" and view.superseded_by == new
        assert asyncio.run(service.wait(old, timeout=10)).status == "superseded"
        engine.release()
        assert asyncio.run(service.wait(new, timeout=30)).status == "done"
        assert done == [new]  # hooks run for finished jobs only
    finally:
        engine.release()
        service.stop(timeout=5)


def test_several_workers_run_jobs_side_by_side(
    service: JobService, engine: StandInEngine, tmp_path: Path
) -> None:
    assert service.settings.workers == 2
    study = write_study(tmp_path / "studies")
    engine.hold()
    service.start()
    ids = [service.submit(request_for(study)) for _ in range(3)]
    for _ in range(200):
        running = service.list(status="running")[1]
        if running == 2:
            break
        threading.Event().wait(0.02)
    assert running == 2 and service.list(status="queued")[1] == 1
    engine.release()
    for job_id in ids:
        assert asyncio.run(service.wait(job_id, timeout=30)).status == "done"


# --- the queue seam --------------------------------------------------------------------------
class RecordingQueue:
    """A JobQueue that only records the ids it is handed, as a broker would carry them to
    workers in other processes; the test plays the worker."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.started = False

    def submit(self, job_id: str) -> None:
        self.ids.append(job_id)

    def start(self, *, recover: bool = True) -> None:
        self.started = True

    def stop(self, timeout: float | None = 30.0) -> None:
        self.started = False

    def workers(self) -> list[WorkerInfo]:
        return []  # the worker processes would report through their heartbeats


def test_another_queue_plugs_in_and_run_job_runs_each_job_once(
    toy_settings: Settings, engine: StandInEngine, tmp_path: Path
) -> None:
    """Jobs go to the queue given at construction (no worker thread runs them); run_job is what
    a worker of another process calls: it claims the row, so a job id delivered twice, or to two
    workers at once (each with its own database engine), runs once."""
    broker = RecordingQueue()
    sql = make_engine(toy_settings.database_url)
    sessions = make_sessionmaker(sql)
    service = JobService(
        toy_settings,
        sessions,
        NodeSpec.load(toy_settings),
        Archive(toy_settings.archive_dir, sessions),
        engine,
        queue=broker,
        poll_s=0.1,
    )
    other_worker = make_service(toy_settings, engine)  # another process, same database
    study = write_study(tmp_path / "studies")
    service.start()
    assert broker.started
    job_id = service.submit(request_for(study))
    assert broker.ids == [job_id]
    assert service.get(job_id).status == "queued"  # nothing in this process runs it

    engine.hold()
    outcomes: list[JobStatus | None] = []
    workers = [
        threading.Thread(target=lambda s=s: outcomes.append(s.run_job(job_id)))
        for s in (service, other_worker)
    ]
    for worker in workers:
        worker.start()
    assert engine.started.wait(10)
    engine.release()
    for worker in workers:
        worker.join(30)
    assert len(outcomes) == 2 and outcomes.count(None) == 1 and JobStatus.DONE in outcomes
    assert len(engine.calls) == 1
    assert service.run_job(job_id) is None  # delivered again: not run again
    assert len(engine.calls) == 1 and service.get(job_id).attempts == 1

    cancelled = service.submit(request_for(study))
    service.cancel(cancelled)
    assert other_worker.run_job(cancelled) is None and len(engine.calls) == 1
    assert other_worker.run_job("0" * 32) is None  # unknown id
    service.stop()
    sql.dispose()


def test_a_done_hook_can_be_removed(
    service: JobService, engine: StandInEngine, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "studies")
    seen: list[str] = []
    unsubscribe = service.subscribe_done(seen.append)
    first = service.submit(request_for(study))
    service.run_pending()
    unsubscribe()
    service.submit(request_for(study))
    service.run_pending()
    assert seen == [first]


def test_one_node_per_data_folder_until_it_closes(demo_settings: Settings) -> None:
    """A node (built with recovery) holds its data folder: a second one is refused with the
    reason, a job worker (no recovery) shares the folder, and closing the node frees it."""
    first = build_context(demo_settings)
    try:
        with pytest.raises(ConfigError, match=r"is in use by another node \(pid \d+\)"):
            build_context(demo_settings)
        build_context(demo_settings, recover=False, broker=False).close()  # as `nnunet-node worker`
    finally:
        first.close()
    build_context(demo_settings).close()
