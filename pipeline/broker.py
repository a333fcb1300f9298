"""Jobs through a Celery broker: the node sends job ids, ``nnunet-node worker`` processes run them.

With ``NNUNET_NODE_BROKER_URL`` set (Redis by default, ``redis://host:6379/0``; RabbitMQ works by
changing the URL to ``amqp://...``), ``nnunet-node serve`` runs no job itself. The job row in the
database stays the truth (status, progress, outputs, history); Celery only delivers job ids, at
least once:

- late acknowledgement (``task_acks_late``): a message is acknowledged once its job has ended, so
  a worker that dies mid-job leaves it unacknowledged and the broker delivers it again
  (``task_reject_on_worker_lost``; Redis after the ``visibility_timeout``);
- a prefetch of one (``worker_prefetch_multiplier``): an idle worker takes the next job, a busy
  one holds no second;
- running a job is idempotent on its id: the worker claims the row
  (:meth:`~nnunet_node.storage.workers.JobLeases.claim`), so a copy of an id whose job another
  worker runs, or that is finished or cancelled, is acknowledged and dropped.

The node (:class:`BrokerQueue`) also sweeps the rows: a job whose worker's lease ran out goes back
to the queue and its id is sent again, at most ``NNUNET_NODE_JOB_MAX_ATTEMPTS`` runs, then it fails
with the reason; a job still queued ``NNUNET_NODE_BROKER_RESEND_S`` after its id was sent is sent
again (a broker restarted without its data loses messages). Neither needs the node to restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.logging import LoopFailures
from nnunet_node.core.settings import Settings
from nnunet_node.storage.workers import JobLeases, WorkerInfo, WorkerStore

LOGGER = logging.getLogger(__name__)

RUN_JOB_TASK = "nnunet_node.run_job"
"""The one task: its only argument is a job id."""

VISIBILITY_TIMEOUT_S = 3600.0
"""Redis: an unacknowledged message is delivered again after this long (Celery's default). A job
that runs longer gets a second copy, which its claim drops; lost workers are found sooner through
the job's lease."""

NEVER_SENT_GRACE_S = 5.0
"""A queued job that was never sent is sent by the sweep once it is this old."""

FORGET_WORKERS_AFTER_S = 86400.0
"""Rows of workers silent for a day are removed (a killed worker never removes its own)."""


def safe_broker_url(url: str | None) -> str:
    """``url`` with its password shown as ``**`` (kombu's ``maybe_sanitize_url``, as Celery's
    own banner shows it): ``redis://:**@broker-host:6379/0``. For logs."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url or ""))


def make_celery(settings: Settings, *, broker_url: str | None = None) -> Celery:
    """The Celery app of the node and of its workers, configured for at-least-once delivery of
    job ids (see the module). No result backend: outcomes are in the job rows.

    Raises :class:`ValueError` when no broker URL is configured.
    """
    url = broker_url or settings.broker_url
    if not url:
        raise ValueError("NNUNET_NODE_BROKER_URL is not set: there is no broker to use")
    app = Celery("nnunet_node", broker=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.default_queue,
        task_create_missing_queues=True,
        task_serializer="json",
        accept_content=["json"],
        # Sending must not hold up a request for long while the broker is away: the row is
        # queued already and the node's sweep sends its id again.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "socket_connect_timeout": 5,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for its broker forever
        broker_connection_timeout=5,
        # A running job is not stopped when the broker connection drops: its row decides.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=True,
    )
    return app


class BrokerQueue:
    """The node's job queue when a broker is configured: sends job ids and sweeps the rows.

    ``submit(job_id)`` sends the id to the job's queue (its row says which). ``start`` starts a
    thread that every ``sweep_s`` requeues and resends jobs whose worker was lost, resends jobs
    queued longer than ``settings.broker_resend_s`` since their last send (and ones never sent:
    the broker was away), and forgets long-silent workers. ``send`` is injectable for tests;
    by default it is Celery's ``send_task``.
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        app: Celery | None = None,
        sweep_s: float | None = None,
        send: Callable[[str, str], None] | None = None,
        depth: Callable[[str], int] | None = None,
    ) -> None:
        self.settings = settings
        self.leases = JobLeases(session_factory)
        self.worker_rows = WorkerStore(session_factory)
        self._app = app
        self._send_one = send or self._celery_send
        self._depth = depth or self._celery_depth
        self.sweep_s = sweep_s if sweep_s is not None else min(5.0, settings.job_lease_s / 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def app(self) -> Celery:
        with self._lock:
            if self._app is None:
                self._app = make_celery(self.settings)
            return self._app

    # --- the JobQueue protocol -----------------------------------------------------------------
    def submit(self, job_id: str) -> None:
        """Send ``job_id`` to its queue. A broker that is away is logged, not raised: the row is
        queued and the sweep sends it later."""
        self.send([(job_id, self.leases.queue_of(job_id))])

    def start(self, *, recover: bool = True) -> None:
        """Start the sweep (its first pass sends every queued job never sent). ``recover`` is
        accepted for the protocol: lost jobs are found by their leases, at any time."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="broker-sweep", daemon=True)
        self._thread.start()
        LOGGER.info(
            "jobs go to the broker; %s runs none here", safe_broker_url(self.settings.broker_url)
        )

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            app, self._app = self._app, None
        if app is not None:
            app.close()

    def workers(self) -> list[WorkerInfo]:
        """The worker processes alive now: those whose heartbeat is at most one lease
        (``NNUNET_NODE_JOB_LEASE_S``) old."""
        return self.worker_rows.alive(self.settings.job_lease_s)

    # --- sending -------------------------------------------------------------------------------
    def send(self, jobs: Iterable[tuple[str, str]]) -> int:
        """Send each ``(job id, queue)``; record the ones sent; return how many were."""
        sent: list[str] = []
        for job_id, queue in jobs:
            try:
                self._send_one(job_id, queue)
            except Exception as exc:  # broker away: the sweep tries again
                LOGGER.warning(
                    "job %s: not sent to queue %s (%s); retried later", job_id, queue, exc
                )
                break
            sent.append(job_id)
        self.leases.mark_enqueued(sent)
        return len(sent)

    def _celery_send(self, job_id: str, queue: str) -> None:
        self.app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, routing_key=queue)
        LOGGER.debug("job %s sent to queue %s", job_id, queue)

    def _celery_depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` on the broker (0 when it does not exist there)."""
        with self.app.connection_for_write() as conn:
            try:
                declared = conn.default_channel.queue_declare(queue=queue, passive=True)
            except conn.channel_errors:  # no such queue: nothing waits there
                return 0
            return int(declared.message_count)

    def sweep(self) -> dict[str, Any]:
        """One pass: requeue and resend jobs of lost workers; send queued jobs never sent; and
        where the broker holds fewer messages for a queue than it has queued jobs (it lost some:
        a restart without its data), resend the ids last sent over ``broker_resend_s`` ago."""
        requeued, failed = self.leases.reap(max_attempts=self.settings.job_max_attempts)
        sent = self.send(requeued)
        # Jobs whose submit could not send them (broker away); a few seconds' grace keeps the
        # sweep from doubling a submit that is sending right now.
        sent += self.send(self.leases.unsent(min_age_s=NEVER_SENT_GRACE_S))
        stale = self.leases.unsent(self.settings.broker_resend_s)
        if stale:
            counts = self.leases.queued_counts()
            lost: list[tuple[str, str]] = []
            for queue in sorted({q for _, q in stale}):
                depth = self._depth(queue)
                if depth < counts.get(queue, 0):
                    lost.extend(item for item in stale if item[1] == queue)
                    LOGGER.warning(
                        "queue %s: the broker holds %d message(s) for %d queued job(s): "
                        "sending the ids again",
                        queue,
                        depth,
                        counts.get(queue, 0),
                    )
            sent += self.send(lost)
        forgotten = self.worker_rows.forget_older_than(FORGET_WORKERS_AFTER_S)
        return {"requeued": requeued, "failed": failed, "sent": sent, "forgotten": forgotten}

    def _loop(self) -> None:
        failures = LoopFailures(LOGGER, "broker sweep")
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception as exc:  # the database is away: try again
                failures.failed(exc)
            else:
                failures.succeeded()
            self._stop.wait(self.sweep_s)


__all__ = ["RUN_JOB_TASK", "VISIBILITY_TIMEOUT_S", "BrokerQueue", "make_celery"]
