"""The job service: validate, queue, run in worker threads, wait, cancel (docs/architecture.md,
"Data flow").

HTTP (``/infer``, ``/infer_file``, ``/jobs``), DIMSE and STOW jobs all pass through here, so they
share one queue, one history and one runner. A job is a database row before anything runs; workers
claim rows (``storage.jobs.JobStore.claim_next``), so queued jobs survive a restart and several
processes may share the queue. Inference runs in the worker threads, never in the event loop:
:meth:`JobService.wait` is a coroutine that sleeps on an asyncio event the worker sets.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core import metrics
from nnunet_node.core.clock import utcnow
from nnunet_node.core.errors import (
    ClientError,
    Conflict,
    InvalidRequest,
    JobCancelled,
    NodeError,
    NotFound,
)
from nnunet_node.core.paths import resolve_inside
from nnunet_node.core.settings import Settings
from nnunet_node.inference.engine import describe_key
from nnunet_node.inference.request import Plan, normalise
from nnunet_node.inference.series_check import check_plan
from nnunet_node.pipeline.outputs import build_zip
from nnunet_node.pipeline.runner import (
    CLIENT_KEY,
    STUDY_PATH_KEY,
    JobRunner,
    archive_inputs,
    job_folder,
    public_request,
)
from nnunet_node.pipeline.spec import NodeSpec
from nnunet_node.storage.archive import Archive, is_valid_uid
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.jobs import ArtifactRecord, JobFilters, JobStore, as_utc, is_terminal
from nnunet_node.storage.models import Job, JobStatus, Patient, Series, Study
from nnunet_node.storage.workers import JobLeases, WorkerInfo, WorkerStore

LOGGER = logging.getLogger(__name__)

_SERIES_PLACEHOLDER = re.compile(r"^\{series(?:\[(\d+)\])?\}$")


# --- views ----------------------------------------------------------------------------------
class ArtifactView(BaseModel):
    kind: str
    stage: int
    path: str
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None


class DispatchView(BaseModel):
    id: int
    destination: str
    status: str
    attempts: list[Any]
    next_attempt_at: datetime | None = None
    updated_at: datetime | None = None


class JobView(BaseModel):
    """A job as the API and the DIMSE side see it. Datetimes are UTC."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(serialization_alias="job_id")
    """Answered as ``job_id``, the reference's name, in every HTTP answer (``/jobs`` too)."""
    source: str
    status: str
    request: dict[str, Any]
    models: list[Any]
    series: list[Any]
    route_name: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    output_dir: str | None = None
    progress: dict[str, Any]
    result: dict[str, Any] | None = None
    run_record: dict[str, Any] | None = None
    error: str | None = None
    attempts: int
    queue: str = "default"
    """The queue whose workers may run it (see ``GET /workers``)."""
    queue_position: int | None = None
    """While queued: how many queued jobs of its queue are ahead of it (0: it is next)."""
    worker: str | None = None
    """The worker process that runs (or ran) it; ``None`` when the node ran it itself."""
    superseded_by: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    artifacts: list[ArtifactView]
    dispatches: list[DispatchView]

    @property
    def finished(self) -> bool:
        return is_terminal(self.status)

    @classmethod
    def of(cls, job: Job) -> JobView:
        created = as_utc(job.created_at)
        assert created is not None
        return cls(
            id=job.id,
            source=job.source,
            status=JobStatus(job.status).value,
            request=public_request(job.request or {}),
            models=list(job.models or []),
            series=list(job.series or []),
            route_name=job.route_name,
            study_instance_uid=job.study_instance_uid,
            patient_id=job.patient_id,
            output_dir=job.output_dir,
            progress=dict(job.progress or {}),
            result=job.result,
            run_record=job.run_record,
            error=job.error,
            attempts=job.attempts,
            queue=job.queue or "default",
            worker=job.worker,
            superseded_by=job.superseded_by,
            created_at=created,
            started_at=as_utc(job.started_at),
            finished_at=as_utc(job.finished_at),
            artifacts=[
                ArtifactView(
                    kind=a.kind,
                    stage=a.stage,
                    path=a.path,
                    sop_instance_uid=a.sop_instance_uid,
                    series_instance_uid=a.series_instance_uid,
                )
                for a in job.artifacts
            ],
            dispatches=[
                DispatchView(
                    id=d.id,
                    destination=d.destination,
                    status=str(getattr(d.status, "value", d.status)),
                    attempts=list(d.attempts or []),
                    next_attempt_at=as_utc(d.next_attempt_at),
                    updated_at=as_utc(d.updated_at),
                )
                for d in job.dispatches
            ],
        )


# --- the service ----------------------------------------------------------------------------
class JobQueue(Protocol):
    """Where queued jobs go instead of this process's worker threads: a broker
    (:class:`nnunet_node.pipeline.broker.BrokerQueue`). ``submit`` is called once the row is
    committed as queued; losing a submit loses no job (the row stays queued)."""

    def submit(self, job_id: str) -> None: ...

    def start(self, *, recover: bool = True) -> None: ...

    def stop(self, timeout: float | None = 30.0) -> None: ...


class JobService:
    """Validate and queue jobs, run them in ``settings.workers`` threads, report on them.

    ``on_done`` holds callables ``(job_id) -> None`` run in the worker thread after a job finished
    with status ``done`` (dispatch registers one to send results on); their errors are logged and
    never change the job.

    With a ``queue`` (a broker), this process runs no job: ``submit`` hands the id to the queue,
    ``start`` / ``stop`` start and stop it, and worker processes run jobs with
    :meth:`run_claimed`.
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        spec: NodeSpec,
        archive: Archive,
        engine: Any,
        *,
        poll_s: float = 1.0,
        progress_interval_s: float = 0.25,
        queue: JobQueue | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.leases = JobLeases(session_factory)
        self.session_factory = session_factory
        self.spec = spec
        self.archive = archive
        self.engine = engine
        self.store = JobStore(session_factory)
        self.runner = JobRunner(settings, session_factory, spec, archive, engine, self.check_paths)
        self.on_done: list[Callable[[str], None]] = []
        self.poll_s = poll_s
        self.progress_interval_s = progress_interval_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: dict[str, threading.Event] = {}
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        self._jobs_done = 0
        self._started_at = utcnow()

    # --- validation --------------------------------------------------------------------------
    def validate(
        self,
        request: dict[str, Any],
        *,
        study_path_required: bool = True,
        study_path: Path | None = None,
        output_dir: Path | None = None,
    ) -> Plan:
        """Normalise ``request`` into a plan and check every path it names against the allowed
        roots (links followed). Raises :class:`ClientError` subclasses naming the field.

        ``study_path`` / ``output_dir`` are the server's own choice (an upload's extraction folder,
        an archive job's input folder) and override the request's; paths relative to such a study
        must stay inside it or the allowed roots.
        """
        if not isinstance(request, dict):
            raise InvalidRequest("the request body must be a JSON object")
        reserved = sorted(k for k in request if isinstance(k, str) and k.startswith("_"))
        if reserved:
            raise InvalidRequest(f"unknown field {reserved[0]!r}")
        effective = dict(request)
        if study_path is not None:
            effective["study_path"] = str(study_path)
        if output_dir is not None:
            effective["output_dir"] = str(output_dir)
        if study_path_required and not effective.get("study_path"):
            raise InvalidRequest("study_path: field required")
        plan = normalise(effective, self.spec.registry)
        self.check_paths(plan, trusted_study=study_path)
        study = study_path or (Path(plan.study_path) if plan.study_path else None)
        if study is not None and study.is_dir():
            check_plan(plan, study)  # a refused series answers 400 before it is queued
        if plan.is_dicom:
            for stage in plan.stages:
                self.spec.metadata_for(stage.model.id)
        return plan

    def check_paths(self, plan: Plan, *, trusted_study: Path | None = None) -> None:
        """Every path of ``plan`` inside the allowed roots (``trusted_study``, a folder the node
        chose, counts as one); series and masks must exist once the study folder does."""
        roots = list(self.settings.allowed_roots)
        output_roots = [*roots, self.settings.jobs_dir]
        study: Path | None = None
        input_roots = roots
        if trusted_study is not None:
            study = Path(trusted_study).resolve()
            input_roots = [*roots, study]
        elif plan.study_path is not None:
            study = resolve_inside(plan.study_path, roots, field="study_path")
            if not study.is_dir():
                raise InvalidRequest(f"study_path: {plan.study_path!r} is not a folder")
        out: Path | None = None
        if plan.output_dir is not None:
            out = resolve_inside(plan.output_dir, output_roots, field="output_dir")
            if out.exists() and not out.is_dir():
                raise InvalidRequest(f"output_dir: {plan.output_dir!r} is not a folder")
        check_exists = study is None or study.is_dir()
        for field_name, raw in plan.paths():
            if field_name in ("study_path", "output_dir"):
                continue
            if field_name == "tmp_dir":
                base = out or self.settings.jobs_dir
                resolve_inside(raw, [*output_roots, base], base=base, field="tmp_dir")
                continue
            path = resolve_inside(raw, input_roots, base=study, field=field_name)
            if check_exists and not path.exists():
                raise InvalidRequest(f"{field_name}: {raw!r} does not exist under the study")

    # --- submission --------------------------------------------------------------------------
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
        """Validate ``request`` and queue it; return the job id (the row exists when this returns).

        HTTP jobs read ``study_path``: the request's, or the node's own folder passed here (an
        extracted upload), which the job's echoed ``request`` does not show. Archive jobs
        (``series_uids`` given, sources ``dimse``/``stow``) read those series from the archive:
        the runner exports them to ``<jobs>/<id>/inputs/<SeriesInstanceUID>/``. Their request's
        ``series_folders`` defaults to the series UIDs; entries ``{series}`` / ``{series[i]}``
        stand for the first / i-th series (a route can so feed cascades, e.g.
        ``["{series}", "from:phantom"]``). Outputs go to ``output_dir`` (argument, else the
        request's) or ``<jobs>/<id>/``. ``client`` (an HTTP client's address) is kept for status
        pages.
        """
        if not isinstance(request, dict):
            raise InvalidRequest("the request body must be a JSON object")
        job_id = uuid.uuid4().hex
        stored = dict(request)
        study_uid: str | None = None
        patient_id: str | None = None
        series: list[str]
        if series_uids is not None:
            if not series_uids:
                raise InvalidRequest("series_uids: at least one series is needed")
            bad = [uid for uid in series_uids if not is_valid_uid(uid)]
            if bad:
                raise InvalidRequest(f"series_uids: not valid UIDs: {bad}")
            study_uid, patient_id = self._series_owner(series_uids)
            stored.pop("study_path", None)
            stored["series_folders"] = _archive_series_folders(stored, series_uids)
            stored.setdefault("is_dicom", True)
            study_path = archive_inputs(self.settings, job_id)
            series = list(series_uids)
        plan = self.validate(
            stored,
            study_path_required=series_uids is None,
            study_path=study_path,
            output_dir=output_dir,
        )
        if series_uids is None:
            series = [ref.raw for stage in plan.stages for ref in stage.inputs if ref.is_series]
            series = list(dict.fromkeys(series))
            if study_path is not None:
                stored.pop("study_path", None)
                stored[STUDY_PATH_KEY] = str(Path(study_path).resolve())
        if client:
            stored[CLIENT_KEY] = client
        out = output_dir or (Path(plan.output_dir) if plan.output_dir else None)
        out_resolved = (
            resolve_inside(out, [*self.settings.allowed_roots, self.settings.jobs_dir])
            if out is not None
            else job_folder(self.settings, job_id)
        )
        self.store.create(
            job_id=job_id,
            source=source,
            request=stored,
            models=plan.model_ids,
            series=series,
            route_name=route_name,
            study_instance_uid=study_uid,
            patient_id=patient_id,
            output_dir=str(out_resolved),
            queue=self.queue_for(route_name, plan.model_ids),
        )
        if self.queue is not None:
            self.queue.submit(job_id)
        else:
            self._wake.set()
        return job_id

    def queue_for(self, route_name: str | None, model_ids: list[str]) -> str:
        """The queue of a job: its route's ``queue``, else the first of its models' that names
        one, else ``NNUNET_NODE_DEFAULT_QUEUE``."""
        if route_name:
            route = self.spec.routing.route(route_name)
            if route is not None and route.queue:
                return route.queue
        for model_id in model_ids:
            queue = self.spec.registry.resolve(model_id).queue
            if queue:
                return queue
        return self.settings.default_queue

    def _series_owner(self, series_uids: list[str]) -> tuple[str | None, str | None]:
        """Study UID and patient id of archived series (every one must be in the archive)."""
        with unit_of_work(self.session_factory) as session:
            rows = session.execute(
                select(Series.series_instance_uid, Study.study_instance_uid, Patient.patient_id)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
                .where(Series.series_instance_uid.in_(series_uids))
            ).all()
        found = {row[0]: (row[1], row[2]) for row in rows}
        missing = [uid for uid in series_uids if uid not in found]
        if missing:
            raise NotFound(f"series_uids: not in the archive: {missing}")
        study_uid, patient_id = found[series_uids[0]]
        return study_uid, patient_id

    # --- reading -----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobView:
        """The job as the API shows it, with its place in its queue while queued."""
        view = JobView.of(self.store.get(job_id))
        if view.status == JobStatus.QUEUED:
            view.queue_position = self.leases.queue_position(job_id)
        return view

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
    ) -> tuple[list[JobView], int]:
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
        items, total = self.store.list(
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
        return [JobView.of(j) for j in items], total

    def cancel(self, job_id: str) -> JobView:
        """Cancel a queued job; a running one stops at its next check (cooperative)."""
        job = self.store.cancel(job_id)
        with self._lock:
            flag = self._running.get(job_id)
        if flag is not None:
            flag.set()  # the worker removes its upload when it stops
        elif job.worker is None or job.started_at is None:  # not running on a worker process
            self._discard_upload(job)
        # else a worker process ran it: that worker removes the upload when it stops
        self._notify(job_id)
        return JobView.of(job)

    def supersede(self, old_job_id: str, new_job_id: str) -> JobView:
        """Mark ``old_job_id`` replaced by ``new_job_id`` (a DIMSE re-run of the same series)."""
        job = self.store.supersede(old_job_id, new_job_id)
        with self._lock:
            flag = self._running.get(old_job_id)
        if flag is not None:
            flag.set()
        self._notify(old_job_id)
        return JobView.of(job)

    def zip_path(self, job_id: str) -> Path:
        """The zip of a finished job's outputs, built once and kept in the job folder."""
        job = self.store.get(job_id)
        return build_zip(self.settings, job)

    async def wait(self, job_id: str, timeout: float | None = None) -> JobView:
        """Wait until the job is finished (done, failed, cancelled, superseded) without blocking
        the event loop; after ``timeout`` seconds return it as it is then."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(entry)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                # Cleared before the read, so a worker's notice after the read is not lost.
                event.clear()
                status = await asyncio.to_thread(self.store.status, job_id)
                remaining = None if deadline is None else deadline - loop.time()
                if is_terminal(status) or (remaining is not None and remaining <= 0):
                    return await asyncio.to_thread(self.get, job_id)
                step = self.poll_s if remaining is None else min(self.poll_s, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=step)
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]

    def _notify(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(event.set)

    # --- workers -----------------------------------------------------------------------------
    def start(self, *, recover: bool = True) -> None:
        """Start the workers; first requeue (or fail) jobs a dead process left running. With a
        broker queue, start that instead (jobs of lost workers are found by their leases)."""
        if self.queue is not None:
            self.queue.start(recover=recover)
            return
        if self._threads:
            return
        if recover:
            self.store.recover_after_restart()
        self._stopping.clear()
        self._abort.clear()
        for n in range(self.settings.workers):
            thread = threading.Thread(target=self._work, name=f"job-worker-{n}", daemon=True)
            self._threads.append(thread)
            thread.start()
        LOGGER.info("%d job worker(s) started", len(self._threads))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the workers. A running job may finish for ``timeout`` seconds; then it is asked
        to stop and goes back to the queue (queued jobs stay queued and run after a restart)."""
        if self.queue is not None:
            self.queue.stop(timeout)
            return
        if not self._threads:
            return
        self._stopping.set()
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(left)
        if any(t.is_alive() for t in self._threads):
            LOGGER.warning("job workers still busy after %.0f s: asking them to stop", timeout)
            self._abort.set()
            with self._lock:
                for flag in self._running.values():
                    flag.set()
            for thread in self._threads:
                thread.join(60.0)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._threads:
            LOGGER.error("%d job worker(s) did not stop", len(self._threads))
        LOGGER.info("job workers stopped")

    def wake(self) -> None:
        """Tell idle workers to look at the queue now."""
        self._wake.set()

    def loaded_models(self) -> builtins.list[dict[str, Any]]:
        """The predictors this process holds loaded (model, folds, checkpoint, tta, device)."""
        cache = getattr(self.engine, "cache", None)
        if cache is None:
            return []
        ids = {str(m.folder): m.id for m in self.spec.registry.models}
        return [describe_key(key, ids) for key in cache.held_keys()]

    def workers(self) -> builtins.list[WorkerInfo]:
        """The workers alive now. With a broker: the worker processes whose heartbeat is at most
        one lease (``NNUNET_NODE_JOB_LEASE_S``) old. In-process: this process, which runs every
        queue (``["*"]``), with the job its threads started first as ``current_job``."""
        if self.queue is not None:
            return WorkerStore(self.session_factory).alive(self.settings.job_lease_s)
        cache = getattr(self.engine, "cache", None)
        with self._lock:
            running = list(self._running)
        return [
            WorkerInfo(
                name=f"in-process-{os.getpid()}@{socket.gethostname()}",
                host=socket.gethostname(),
                pid=os.getpid(),
                device=self.settings.device,
                queues=["*"],
                models=self.loaded_models(),
                current_job=running[0] if running else None,
                jobs_done=self._jobs_done,
                model_loads=cache.stats.loads if cache is not None else 0,
                started_at=self._started_at,
                heartbeat_at=utcnow(),
            )
        ]

    def run_claimed(self, job: Job, *, worker: str) -> None:
        """Run a job that the worker process ``worker`` has claimed (its name is on the row) and
        record the outcome, only while it still holds the job (see ``storage.workers``)."""
        self._execute(job, worker=worker)

    def request_stop(self, job_id: str) -> bool:
        """Ask a job running in this process to stop at its next check; False if none does."""
        with self._lock:
            flag = self._running.get(job_id)
        if flag is None:
            return False
        flag.set()
        return True

    def run_pending(self) -> int:
        """Claim and run queued jobs in this thread until none is left (tools and tests)."""
        count = 0
        while (job := self.store.claim_next()) is not None:
            self._execute(job)
            count += 1
        return count

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next()
            except Exception:  # the database is away: try again later
                LOGGER.exception("claiming a job failed")
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            try:
                self._execute(job)
            except Exception:  # recording the outcome failed (database away): keep working
                LOGGER.exception("job %s: its outcome could not be recorded", job.id)

    def _execute(self, job: Job, *, worker: str | None = None) -> None:
        flag = threading.Event()
        with self._lock:
            self._running[job.id] = flag
        last_check = [time.monotonic()]

        def should_stop() -> bool:
            if flag.is_set() or self._abort.is_set():
                return True
            now = time.monotonic()
            if now - last_check[0] >= self.poll_s:
                last_check[0] = now
                try:
                    if self.store.status(job.id) != JobStatus.RUNNING:  # cancelled elsewhere
                        flag.set()
                except NodeError:
                    flag.set()
            return flag.is_set()

        progress = ProgressWriter(self.store, job.id, self.progress_interval_s)
        started = time.monotonic()
        result = "failed"
        try:
            outcome = self.runner.run(job, progress=progress, should_stop=should_stop)
            try:
                final = self.store.finish(
                    job.id,
                    outcome.result,
                    outcome.artifacts,
                    progress=outcome.progress,
                    run_record=outcome.run_record,
                    worker=worker,
                )
            except Conflict as exc:  # another worker took the job over: it records the outcome
                LOGGER.warning("job %s: result not recorded: %s", job.id, exc)
                result = "lost"
                return
            result = JobStatus(final.status).value
            if final.status == JobStatus.DONE:
                self._run_hooks(job.id)
        except JobCancelled:
            result = "cancelled"
            if self._abort.is_set() and self.store.requeue(job.id):
                result = "requeued"
                LOGGER.info("job %s interrupted by shutdown: back in the queue", job.id)
            elif worker is not None and not self.leases.holds(job.id, worker):
                LOGGER.info("job %s stopped: no longer held by %s", job.id, worker)
            else:
                LOGGER.info("job %s stopped: %s", job.id, self.store.status(job.id).value)
                if self.store.status(job.id) == JobStatus.RUNNING:
                    self.store.cancel(job.id, reason="stopped")
        except NodeError as exc:  # client errors (an unreadable series) included: their message
            self.store.fail(job.id, str(exc), worker=worker)
        except Exception as exc:
            LOGGER.exception("job %s crashed", job.id)
            self.store.fail(job.id, f"internal error: {type(exc).__name__}: {exc}", worker=worker)
        finally:
            metrics.JOB_SECONDS.labels("+".join(job.models or []), result).observe(
                time.monotonic() - started
            )
            progress.close()
            self._discard_upload(job)
            with self._lock:
                self._running.pop(job.id, None)
                self._jobs_done += 1
            self._notify(job.id)

    def _discard_upload(self, job: Job) -> None:
        """Remove the folder an ``/infer_file`` upload was extracted to once the job is over
        (done, failed or cancelled); a job put back in the queue still needs it."""
        study = job.request.get(STUDY_PATH_KEY)
        if not study:
            return
        uploads = self.settings.uploads_dir.resolve()
        path = Path(str(study)).resolve()
        if not path.is_relative_to(uploads) or path == uploads:
            return
        try:
            # queued again (shutdown), or running on another worker that took it over: still needed
            if not is_terminal(self.store.status(job.id)):
                return
        except NodeError:
            return
        shutil.rmtree(uploads / path.relative_to(uploads).parts[0], ignore_errors=True)

    def _run_hooks(self, job_id: str) -> None:
        for hook in list(self.on_done):
            try:
                hook(job_id)
            except Exception:
                LOGGER.exception("job %s: on_done hook %r failed", job_id, hook)

    # --- housekeeping ------------------------------------------------------------------------
    def delete_job_folder(self, job_id: str) -> None:
        """Remove ``<jobs>/<id>/`` (inputs, default outputs, zip); the row stays."""
        folder = job_folder(self.settings, job_id)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


class ProgressWriter:
    """Records a running job's progress at most every ``interval_s``: the latest report wins,
    and one held back is written when the interval is over (each write is a commit)."""

    def __init__(self, store: JobStore, job_id: str, interval_s: float) -> None:
        self._store = store
        self._job_id = job_id
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._last = time.monotonic()  # the claim has just recorded "starting"
        self._timer: threading.Timer | None = None
        self._closed = False

    def __call__(self, info: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending = dict(info)
            wait = self._interval_s - (time.monotonic() - self._last)
            if wait <= 0:
                self._write_locked()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._flush)
                self._timer.daemon = True
                self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            if not self._closed:
                self._write_locked()

    def _write_locked(self) -> None:
        info, self._pending = self._pending, None
        if info is None:
            return
        self._last = time.monotonic()
        try:
            self._store.set_progress(self._job_id, info)
        except Exception:
            LOGGER.exception("job %s: progress not recorded", self._job_id)

    def close(self) -> None:
        """Stop writing (the job's final state records its own progress)."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()


def _archive_series_folders(request: dict[str, Any], series_uids: list[str]) -> list[Any]:
    """``series_folders`` of an archive job: the request's with ``{series}`` placeholders filled,
    or by default every series for each model."""
    given = request.get("series_folders")
    n_models = len(request["nnunet_id"]) if isinstance(request.get("nnunet_id"), list) else 1

    def fill(entry: Any) -> Any:
        if isinstance(entry, list):
            return [fill(e) for e in entry]
        if isinstance(entry, str):
            match = _SERIES_PLACEHOLDER.match(entry.strip())
            if match:
                index = int(match.group(1) or 0)
                if index >= len(series_uids):
                    raise InvalidRequest(
                        f"series_folders: {entry!r} but the job has {len(series_uids)} series"
                    )
                return series_uids[index]
        return entry

    if given is None:
        return list(series_uids) if n_models == 1 else [list(series_uids)] * n_models
    if not isinstance(given, list):
        raise InvalidRequest("series_folders: must be a list")
    return [fill(e) for e in given]


__all__ = [
    "ArtifactRecord",
    "ArtifactView",
    "DispatchView",
    "JobService",
    "JobView",
]
