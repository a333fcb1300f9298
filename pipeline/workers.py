"""The in-process :class:`~nnunet_node.pipeline.ports.JobQueue`: worker threads claiming rows.

Each of ``workers`` threads claims the oldest queued job (``JobStore.claim_next``) and runs it
through the :class:`~nnunet_node.pipeline.execution.JobExecutor`; ``submit`` only wakes an idle
thread, since the committed row is the queue. Threads of several processes on one database share
the queue safely (a claim is a conditional update).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from nnunet_node.core.clock import utcnow
from nnunet_node.core.logging import LoopFailures
from nnunet_node.pipeline.execution import JobExecutor
from nnunet_node.storage.workers import WorkerInfo

EngineState = Callable[[], tuple[list[dict[str, Any]], int]]
"""The predictors a process holds loaded (as ``GET /workers`` lists them) and how many it has
loaded from disk so far."""

LOGGER = logging.getLogger(__name__)


class WorkerPool:
    """``threads`` threads running queued jobs; ``poll_s``: how long an idle thread sleeps
    before it looks at the queue again without being woken. ``device`` and ``engine_state``
    describe this process in :meth:`workers`."""

    def __init__(
        self,
        executor: JobExecutor,
        *,
        threads: int,
        poll_s: float = 1.0,
        device: str = "auto",
        engine_state: EngineState | None = None,
    ) -> None:
        self.executor = executor
        self.threads = threads
        self.poll_s = poll_s
        self.device = device
        self._engine_state = engine_state
        self._started_at = utcnow()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._claim_failures = LoopFailures(LOGGER, "claiming a job")

    # --- JobQueue ----------------------------------------------------------------------------
    def submit(self, job_id: str) -> None:
        """The row of ``job_id`` is queued: wake an idle worker (any of them takes the oldest)."""
        self._wake.set()

    def start(self, *, recover: bool = True) -> None:
        """Start the workers; first requeue (or fail) jobs a dead process left running."""
        if self._threads:
            return
        if recover:
            self.executor.store.recover_after_restart()
        self._stopping.clear()
        self.executor.reset_abort()
        for n in range(self.threads):
            thread = threading.Thread(target=self._work, name=f"job-worker-{n}", daemon=True)
            self._threads.append(thread)
            thread.start()
        LOGGER.info("%d job worker(s) started", len(self._threads))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the workers. A running job may finish for ``timeout`` seconds; then it is asked
        to stop and goes back to the queue (queued jobs stay queued and run after a restart)."""
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
            self.executor.abort_all()
            for thread in self._threads:
                thread.join(60.0)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._threads:
            LOGGER.error("%d job worker(s) did not stop", len(self._threads))
        LOGGER.info("job workers stopped")

    def workers(self) -> list[WorkerInfo]:
        """This process, which runs every queue (``["*"]``), with the job its threads started
        first as ``current_job``."""
        models, loads = self._engine_state() if self._engine_state is not None else ([], 0)
        running = self.executor.running()
        host = socket.gethostname()
        return [
            WorkerInfo(
                name=f"in-process-{os.getpid()}@{host}",
                host=host,
                pid=os.getpid(),
                device=self.device,
                queues=["*"],
                models=models,
                current_job=running[0] if running else None,
                jobs_done=self.executor.jobs_done,
                model_loads=loads,
                started_at=self._started_at,
                heartbeat_at=utcnow(),
            )
        ]

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.executor.store.claim_next()
            except Exception as exc:  # the database is away: try again later
                self._claim_failures.failed(exc)
                job = None
            else:
                self._claim_failures.succeeded()
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            try:
                self.executor.execute(job)
            except Exception:  # recording the outcome failed (database away): keep working
                LOGGER.exception("job %s: its outcome could not be recorded", job.id)


__all__ = ["EngineState", "WorkerPool"]
