"""Execution of one job: claim its row, run it, record the outcome, tell whoever listens.

:meth:`JobExecutor.run_job` is the entry point for any way of running jobs: the in-process
worker threads (:mod:`nnunet_node.pipeline.workers`) and workers in other processes that take job
ids from a broker. It claims the row atomically (only ``queued -> running`` wins, through
:meth:`~nnunet_node.storage.jobs.JobStore.claim`), so a job id delivered twice, or to two
workers, runs once; a job no longer queued (cancelled, superseded, finished) is not run.

A job that a worker process claimed through its lease (:meth:`JobExecutor.execute` with
``worker``) has its lease renewed by a :class:`LeaseKeeper` thread for as long as it runs here,
every quarter lease, so that only a worker that really died (or lost the database for a whole
lease) has its job taken over; a renewal refused (the job was taken over, cancelled or
superseded meanwhile) stops the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from nnunet_node.core import metrics
from nnunet_node.core.errors import Conflict, JobCancelled, NodeError
from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.runner import JobRunner
from nnunet_node.pipeline.workspace import discard_upload
from nnunet_node.storage.jobs import JobRecord, JobStore, is_terminal
from nnunet_node.storage.models import JobStatus
from nnunet_node.storage.workers import JobLeases

LOGGER = logging.getLogger(__name__)

JobHook = Callable[[str], None]
"""Called with a job id (in the thread that ran the job)."""


class JobExecutor:
    """Runs claimed jobs through ``runner`` and records their outcome in ``store``; ``leases``
    tells whether a worker process still holds a job it runs (see :meth:`execute`).

    ``on_finished`` (given at construction) is told of every job this executor stops running,
    whatever the outcome: the job service wakes its waiters with it. Hooks added with
    :meth:`subscribe_done` run after a job finished ``done`` (dispatch sends results on); their
    errors are logged and never change the job. ``poll_s``: how often a running job's row is
    read to notice a cancel made by another process.
    """

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        runner: JobRunner,
        leases: JobLeases,
        *,
        on_finished: JobHook | None = None,
        poll_s: float = 1.0,
        progress_interval_s: float = 0.25,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.poll_s = poll_s
        self.progress_interval_s = progress_interval_s
        self._on_finished = on_finished
        self._done_hooks: list[JobHook] = []
        self.leases = leases
        self._running: dict[str, threading.Event] = {}
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._jobs_done = 0

    # --- hooks -------------------------------------------------------------------------------
    def subscribe_done(self, hook: JobHook) -> Callable[[], None]:
        """Run ``hook(job_id)`` after each job that finishes ``done``; returns the function that
        removes it again."""
        with self._lock:
            self._done_hooks.append(hook)

        def unsubscribe() -> None:
            with self._lock:
                if hook in self._done_hooks:
                    self._done_hooks.remove(hook)

        return unsubscribe

    # --- running -----------------------------------------------------------------------------
    def run_job(self, job_id: str) -> JobStatus | None:
        """Claim job ``job_id`` and run it here; return its final status, or None when it was not
        queued (someone else has or had it, it was cancelled, or it does not exist): calling it
        again for the same id, or in two workers at once, runs the job at most once."""
        job = self.store.claim(job_id)
        if job is None:
            LOGGER.info("job %s: not queued any more, not run here", job_id)
            return None
        return self.execute(job)

    def execute(self, job: JobRecord, *, worker: str | None = None) -> JobStatus:
        """Run a job this process has claimed (``running``) and record the outcome: done (with
        result and artifacts), failed (with the message), cancelled, or back in the queue when a
        shutdown interrupted it. Errors recording the outcome (database away) propagate.

        ``worker``: the name of the worker process that claimed the job through its lease
        (:meth:`~nnunet_node.storage.workers.JobLeases.claim`); the outcome is recorded only while
        that worker still holds the job (one taken over by another worker records nothing)."""
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
        keeper: LeaseKeeper | None = None
        if worker is not None:
            keeper = LeaseKeeper(
                self.leases, job.id, worker, lease_s=self.settings.job_lease_s, on_lost=flag.set
            )
            keeper.start()
        started = time.monotonic()
        result = "failed"
        status: JobStatus | None = None  # as recorded here; None: not known without a read
        try:
            try:
                outcome = self.runner.run(job, progress=progress, should_stop=should_stop)
            finally:
                # Renewed less than a quarter lease ago: the outcome is recorded well within it.
                if keeper is not None:
                    keeper.stop()
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
            else:
                status = final.status
                result = status.value
                if status == JobStatus.DONE:
                    self._run_done_hooks(job.id)
        except JobCancelled:
            result = "cancelled"
            if self._abort.is_set() and self.store.requeue(job.id):
                result, status = "requeued", JobStatus.QUEUED
                LOGGER.info("job %s interrupted by shutdown: back in the queue", job.id)
            elif worker is not None and not self.leases.holds(job.id, worker):
                LOGGER.info("job %s stopped: no longer held by %s", job.id, worker)
            else:
                status = self.store.status(job.id)
                LOGGER.info("job %s stopped: %s", job.id, status.value)
                if status == JobStatus.RUNNING:
                    status = self.store.cancel(job.id, reason="stopped").status
        except NodeError as exc:  # client errors (an unreadable series) included: their message
            status = self.store.fail(job.id, str(exc), worker=worker).status
        except Exception as exc:
            LOGGER.exception("job %s crashed", job.id)
            error = f"internal error: {type(exc).__name__}: {exc}"
            status = self.store.fail(job.id, error, worker=worker).status
        finally:
            metrics.JOB_SECONDS.labels("+".join(job.models), result).observe(
                time.monotonic() - started
            )
            progress.close()
            if status is None:  # lost to another worker, or recording the outcome failed
                status = self._status_or_none(job.id)
            # queued again (shutdown), or running on another worker that took it over: still needed
            if status is not None and is_terminal(status):
                discard_upload(self.settings, job)
            with self._lock:
                self._running.pop(job.id, None)
                self._jobs_done += 1
            if self._on_finished is not None:
                self._on_finished(job.id)
        return status if status is not None else JobStatus.FAILED

    # --- what runs here ----------------------------------------------------------------------
    def running(self) -> list[str]:
        """The ids of the jobs running in this process now, oldest first."""
        with self._lock:
            return list(self._running)

    @property
    def jobs_done(self) -> int:
        """Jobs this executor ran to an end (done, failed, stopped, or lost)."""
        with self._lock:
            return self._jobs_done

    # --- stopping ----------------------------------------------------------------------------
    def request_stop(self, job_id: str) -> bool:
        """Ask the job to stop if it runs in this process (it stops at its next check); False
        when it does not run here (a worker elsewhere notices through the row's status)."""
        with self._lock:
            flag = self._running.get(job_id)
        if flag is None:
            return False
        flag.set()
        return True

    def abort_all(self) -> None:
        """Shutdown: every running job stops at its next check and goes back to the queue."""
        self._abort.set()
        with self._lock:
            flags = list(self._running.values())
        for flag in flags:
            flag.set()

    def reset_abort(self) -> None:
        self._abort.clear()

    # --- helpers -----------------------------------------------------------------------------
    def _status_or_none(self, job_id: str) -> JobStatus | None:
        try:
            return self.store.status(job_id)
        except Exception:
            LOGGER.exception("job %s: status not readable", job_id)
            return None

    def _run_done_hooks(self, job_id: str) -> None:
        with self._lock:
            hooks = list(self._done_hooks)
        for hook in hooks:
            try:
                hook(job_id)
            except Exception:
                LOGGER.exception("job %s: done hook %r failed", job_id, hook)


class LeaseKeeper:
    """Renews ``worker``'s lease on the job it runs (``JobLeases.renew``: the job's
    ``lease_expires_at`` moved ``lease_s`` ahead) every quarter lease in a thread of its own,
    from :meth:`start` until :meth:`stop`, so that the lease runs out only when this process
    stops renewing it: it died, or could not reach the database for a whole lease
    (``storage.workers`` takes such a job over). A renewal the database refuses (the job is no
    longer this worker's, or no longer running) calls ``on_lost`` once and ends the thread; a
    renewal that fails (the database away) is tried again every second, and one that came
    later than half a lease is logged (a starved process)."""

    def __init__(
        self,
        leases: JobLeases,
        job_id: str,
        worker: str,
        *,
        lease_s: float,
        on_lost: Callable[[], None],
    ) -> None:
        self.leases = leases
        self.job_id = job_id
        self.worker = worker
        self.lease_s = lease_s
        self.interval_s = max(0.05, lease_s / 4)
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name=f"lease-{self.job_id[:8]}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing; returns once a renewal under way has ended."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _loop(self) -> None:
        last = time.monotonic()
        wait = self.interval_s
        while not self._stop.wait(wait):
            try:
                held = self.leases.renew(self.job_id, self.worker, lease_s=self.lease_s)
            except Exception:
                LOGGER.exception("job %s: lease not renewed; trying again", self.job_id)
                wait = min(1.0, self.interval_s)
                continue
            now = time.monotonic()
            if now - last > self.lease_s / 2:
                LOGGER.warning(
                    "job %s: lease renewed %.1f s after the previous renewal (lease %.1f s): "
                    "is %s starved of CPU?",
                    self.job_id,
                    now - last,
                    self.lease_s,
                    self.worker,
                )
            last, wait = now, self.interval_s
            if not held:
                if not self._stop.is_set():
                    LOGGER.warning(
                        "job %s: no longer held by %s: stopping it", self.job_id, self.worker
                    )
                    self._on_lost()
                return
            self.renewals += 1


class ProgressWriter:
    """Records a running job's progress at most every ``interval_s``: the latest report wins,
    and one held back is written when the interval is over (each write is a commit).
    A :class:`~nnunet_node.pipeline.ports.ProgressReporter`."""

    def __init__(self, store: JobStore, job_id: str, interval_s: float) -> None:
        self._store = store
        self._job_id = job_id
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._last = time.monotonic()  # the claim has just recorded "starting"
        self._timer: threading.Timer | None = None
        self._closed = False

    def __call__(self, info: dict[str, Any], /) -> None:
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


__all__ = ["JobExecutor", "JobHook", "LeaseKeeper", "ProgressWriter"]
