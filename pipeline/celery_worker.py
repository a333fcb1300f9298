"""``nnunet-node worker``: a process that takes job ids from the broker and runs them.

One worker process per GPU (``--device cuda:1`` or ``CUDA_VISIBLE_DEVICES``), one job at a time
(Celery's ``solo`` pool: the job runs in the worker's own process, so the predictors it loaded
stay warm in :class:`~nnunet_node.inference.cache.PredictorCache` between jobs and no CUDA state
crosses a ``fork``). It uses the same runner, model cache, device policy and archive as the node:
the database (PostgreSQL) and the data folder (archive and job folders) must be shared with the
node. Its DICOM results are filed in the archive exactly as the node files its own, and a routed
job's dispatches are recorded here (the node's dispatcher sends them, from the node's AE title).

While alive, a heartbeat thread rewrites its row in ``workers`` (host, device, queues, loaded
models, current job): ``GET /workers`` lists it. The lease of the job it runs is renewed by the
job's own :class:`~nnunet_node.pipeline.execution.LeaseKeeper` thread while the job runs. A job
whose lease ran out (this process died, or lost the database for a whole lease) is taken over
by another worker; this one then stops it and records nothing (see ``storage.workers``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery

from nnunet_node.core.clock import utcnow
from nnunet_node.core.errors import ConfigError
from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.broker import RUN_JOB_TASK, make_celery, safe_broker_url
from nnunet_node.pipeline.context import NodeContext, build_context
from nnunet_node.storage.migrations import current, head
from nnunet_node.storage.models import JobStatus
from nnunet_node.storage.workers import JobLeases, WorkerInfo, WorkerStore

LOGGER = logging.getLogger(__name__)


def default_name() -> str:
    """``nnunet-<pid>@<host>``: unique per process on a host (Celery's node-name form)."""
    return f"nnunet-{os.getpid()}@{socket.gethostname()}"


@dataclass
class WorkerOptions:
    """How a worker process runs: its unique ``name``, the ``queues`` it takes jobs from, the
    ``device`` it reports (``cpu``, ``cuda:1``, ``auto``)."""

    name: str
    queues: Sequence[str]
    device: str = "auto"
    extra_celery_args: list[str] = field(default_factory=list)


class RemoteWorker:
    """Runs the jobs a broker delivers to this process; see the module.

    ``context`` is the process's :class:`~nnunet_node.pipeline.context.NodeContext` (built with
    ``broker=False``). :meth:`run_job` is the Celery task's body; :meth:`start` / :meth:`stop`
    bracket the heartbeat thread.
    """

    def __init__(self, context: NodeContext, options: WorkerOptions) -> None:
        self.context = context
        self.settings = context.settings
        self.options = options
        self.name = options.name
        self.leases = JobLeases(context.session_factory)
        self.workers = WorkerStore(context.session_factory)
        self.interval_s = max(0.2, self.settings.job_lease_s / 4)
        self._current: str | None = None
        self._jobs_done = 0
        self._started_at: datetime | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Rows only (its thread is not started here): the node's dispatcher sends them, from the
        # node's AE title.
        self.dispatcher = context.dispatcher
        context.job_service.subscribe_done(self.dispatcher.on_job_done)

    # --- the task ------------------------------------------------------------------------------
    def run_job(self, job_id: str) -> str:
        """Claim ``job_id`` and run it here; return what happened (for the log).

        A job another worker runs (its lease alive), or one that is finished, cancelled or
        unknown, is not run: the delivery is acknowledged and dropped. A job whose lease ran out
        is taken over (an attempt more); on its last attempt it is failed instead.
        """
        outcome = self.leases.claim(
            job_id,
            self.name,
            lease_s=self.settings.job_lease_s,
            max_attempts=self.settings.job_max_attempts,
        )
        if not outcome.claimed:
            what = (
                "unknown"
                if outcome.status is None
                else f"{outcome.status.value}"
                + (f" on {outcome.holder}" if outcome.status == JobStatus.RUNNING else "")
            )
            LOGGER.info("job %s: not run here (%s)", job_id, what)
            return f"skipped: {what}"
        with self._lock:
            self._current = job_id
        self.beat()
        try:
            job = self.context.job_service.store.get(job_id)
            self.context.job_service.run_claimed(job, worker=self.name)
        finally:
            with self._lock:
                self._current = None
                self._jobs_done += 1
            self.leases.release(job_id, self.name)
            self.beat()
        status = self.context.job_service.store.status(job_id)
        return status.value

    # --- heartbeat -----------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        with self._lock:
            current, done = self._current, self._jobs_done
        return WorkerInfo(
            name=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.options.device,
            queues=list(self.options.queues),
            models=self.context.job_service.loaded_models(),
            current_job=current,
            jobs_done=done,
            model_loads=self.context.inference_engine.cache.stats.loads,
            started_at=self._started_at,
        )

    def beat(self) -> None:
        """Refresh this worker's row (what ``GET /workers`` shows). Errors are logged, never
        raised. The running job's lease is renewed by its own thread (``LeaseKeeper``), not
        here: this row's upkeep (loaded models, counts) must not delay it."""
        try:
            self.workers.beat(self.info())
        except Exception:
            LOGGER.exception("heartbeat of %s failed", self.name)

    def start(self) -> None:
        self._started_at = utcnow()
        self.context.inference_engine.cache.start()
        self.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        try:
            self.workers.remove(self.name)
        except Exception:
            LOGGER.exception("could not remove the row of %s", self.name)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()


def register_task(app: Celery, handler: Callable[[str], str]) -> None:
    """Register :data:`RUN_JOB_TASK` on ``app``: ``handler(job_id)`` runs it.

    The options repeat the app's: late acknowledgement (the delivery is acknowledged once the
    job has ended, so a worker that dies mid-job leaves it to be delivered again) and reject on
    a lost pool process.
    """

    def run_job(job_id: str) -> str:
        return handler(str(job_id))

    # Celery's task decorator is unannotated: applied as a call through an Any-typed reference,
    # so run_job keeps its own signature for mypy --strict.
    task: Any = app.task
    task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(run_job)


def run_worker(settings: Settings, options: WorkerOptions) -> int:
    """``nnunet-node worker``: run jobs from ``options.queues`` until SIGTERM or SIGINT (a warm
    shutdown lets the running job end). Raises ConfigError without a broker, or on a database
    the node has not migrated to this version's schema."""
    if not settings.broker_url:
        raise ConfigError(
            "worker: NNUNET_NODE_BROKER_URL is not set (a worker takes its jobs from the "
            "node's broker)"
        )
    at, want = current(settings.database_url), head()
    if at != want:
        raise ConfigError(
            f"worker: the database is at revision {at}, this version needs {want}: "
            "start the node (or run `nnunet-node db upgrade`) first"
        )
    context = build_context(settings, migrate=False, recover=False, broker=False)
    worker = RemoteWorker(context, options)
    app = make_celery(settings)
    register_task(app, worker.run_job)
    worker.start()
    LOGGER.info(
        "worker %s: queues %s, device %s, broker %s",
        options.name,
        ",".join(options.queues),
        options.device,
        safe_broker_url(settings.broker_url),
    )
    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                f"--hostname={options.name}",
                f"--queues={','.join(options.queues)}",
                f"--loglevel={settings.log_level}",
                "--without-gossip",
                "--without-mingle",
                *options.extra_celery_args,
            ]
        )
    finally:
        worker.stop()
        context.close()
        app.close()
        time.sleep(0)  # let daemon threads see the closed pool before the interpreter exits
    return 0


__all__ = ["RemoteWorker", "WorkerOptions", "default_name", "register_task", "run_worker"]
