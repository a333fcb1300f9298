"""The DIMSE side of the node as a service: AE, series-completion watcher and dispatcher.

``build_service`` is what the composition root (:mod:`nnunet_node.app`) gives the app factory as
its ``dimse`` service: the factory calls it with the process's
:class:`~nnunet_node.pipeline.context.NodeContext` and awaits ``start()`` / ``stop()`` in its
lifespan. ``run_standalone`` is ``nnunet-node dicom``: the same service plus the job
workers, without HTTP, until SIGINT or SIGTERM.

A graceful stop (the first SIGTERM or SIGINT: :meth:`DimseService.begin_stop`, then
:meth:`DimseService.stop_sync`): the DICOM ports close at once, so a new association is refused
at the TCP level (connection refused: every sender retries that, as for a node that is down,
in every process at once, since only the node's process listens; an A-ASSOCIATE-RJ
"rejected-transient, local-limit-exceeded", PS3.8 9.3.4, would need the ports to stay open and
each connection to be read); one INFO line says how many associations are open and for how
long they may go on (``NNUNET_NODE_DICOM_STOP_GRACE_S``); they go on as usual (C-STOREs
answered, A-RELEASE answered), in the receiver processes too; those still open when the grace
ends, or at a second signal, are aborted (A-ABORT), and one WARNING line says how many. Stopped
without a signal (tests, the HTTP app's lifespan when nothing began a graceful stop), the
service aborts its associations at once, as a grace of 0 does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from nnunet_node.core.settings import Settings
from nnunet_node.node.ae import DicomNode
from nnunet_node.node.receivers import ReceiverPool
from nnunet_node.pipeline.context import NodeContext, build_context
from nnunet_node.storage import locks

LOGGER = logging.getLogger(__name__)


class DimseService:
    """Routing table from the spec (checked: a bad rule fails start-up), the AE (unless
    ``NNUNET_NODE_DICOM_ENABLED`` is false) and its receiver processes (node/receivers.py), the
    completion watcher and the dispatcher."""

    def __init__(self, context: NodeContext, *, port: int | None = None) -> None:
        self.context = context
        settings = context.settings
        self.routing = context.spec.routing
        processes = settings.dicom_process_count if settings.dicom_enabled else 1
        if processes > 1 and not locks.available():
            LOGGER.warning(
                "NNUNET_NODE_DICOM_PROCESSES: one process only (this system has no open file "
                "description locks for the shared archive)"
            )
            processes = 1
        self.node = (
            DicomNode(settings, context.archive, self.routing, port=port)
            if settings.dicom_enabled
            else None
        )
        self.receivers = (
            ReceiverPool(settings, context.archive, processes - 1) if processes > 1 else None
        )
        """The receiver processes beside this one (``NNUNET_NODE_DICOM_PROCESSES``)."""
        self.completion = context.completion  # made by the context; started and stopped here
        self.dispatcher = context.dispatcher  # made by the context; started and stopped here
        self._started = False
        self._unsubscribe: Callable[[], None] | None = None
        self._stop_lock = threading.Lock()
        self._stopping = False
        self._grace_s = 0.0
        self._grace_ends = 0.0
        self.abort_requested = False
        """Set (by a signal handler: a plain attribute, no lock) to cut the grace short."""

    @property
    def port(self) -> int | None:
        return self.node.port if self.node else None

    def start_sync(self) -> None:
        if self._started:
            return
        self._unsubscribe = self.context.job_service.subscribe_done(self.dispatcher.on_job_done)
        self.dispatcher.start()
        self.completion.start()
        if self.node is not None:
            self.node.start()
            if self.receivers is not None:
                try:
                    self.receivers.start(self.node)
                except BaseException:
                    self.node.stop()
                    self.completion.stop()
                    self.dispatcher.stop()
                    raise
        self._started = True

    def begin_stop(self, grace_s: float | None = None) -> None:
        """Begin a graceful stop (the first SIGTERM or SIGINT; see the module docstring): close
        the DICOM ports, tell the receiver processes to stop within ``grace_s`` seconds (None:
        ``NNUNET_NODE_DICOM_STOP_GRACE_S``), and when there is a grace, log one INFO line with
        the associations open. Returns once the ports are closed (up to 0.5 s); call
        :meth:`stop_sync` to wait for the associations and stop the rest. Only the first call
        of a stop counts; before :meth:`start_sync` it does nothing."""
        with self._stop_lock:
            if not self._started or self._stopping:
                return
            self._stopping = True
            grace = self.context.settings.dicom_stop_grace_s if grace_s is None else grace_s
            self._grace_s = grace
            self._grace_ends = time.monotonic() + grace
        if self.node is None:
            return
        self.node.stop_accepting()
        elsewhere = sum(self.receivers.loads()[1:]) if self.receivers is not None else 0
        if self.receivers is not None:
            self.receivers.request_stop(grace)
        if grace <= 0:
            return
        here = self.node.open_associations()
        if here + elsewhere:
            LOGGER.info(
                "DICOM node %s stopping: new associations refused (ports closed); waiting up to "
                "%g s (NNUNET_NODE_DICOM_STOP_GRACE_S) for %d open association(s)%s to end; a "
                "second SIGTERM or SIGINT aborts them",
                self.context.settings.ae_title,
                grace,
                here + elsewhere,
                f" ({elsewhere} in receiver processes)" if elsewhere else "",
            )
        else:
            LOGGER.info(
                "DICOM node %s stopping: new associations refused (ports closed); no association "
                "open",
                self.context.settings.ae_title,
            )

    def abort_stop(self) -> None:
        """Abort the associations still open without waiting out the grace (a second signal).
        Only sets :attr:`abort_requested`: safe in a signal handler."""
        self.abort_requested = True

    def _aborting(self) -> bool:
        return self.abort_requested

    def stop_sync(self) -> None:
        """Stop the node, its receivers, the completion watcher and the dispatcher. After
        :meth:`begin_stop`, the associations open get what is left of its grace (the WARNING
        line names those aborted then); without it they are aborted at once."""
        if not self._started:
            return
        self.begin_stop(0.0)  # nothing new when a signal began the stop
        with self._stop_lock:
            self._started = False
            grace = self._grace_s
            left = max(0.0, self._grace_ends - time.monotonic())
        aborted = 0
        if self.node is not None:
            aborted += self.node.stop(left, self._aborting)
        if self.receivers is not None:
            aborted += self.receivers.stop(self._aborting)
        if grace > 0 and aborted:
            LOGGER.warning(
                "DICOM node %s: %d association(s) still open %s: aborted",
                self.context.settings.ae_title,
                aborted,
                "at a second signal"
                if self.abort_requested
                else f"after {grace:g} s (NNUNET_NODE_DICOM_STOP_GRACE_S)",
            )
        with self._stop_lock:
            self._stopping = False
            self.abort_requested = False
        self.completion.stop()
        self.dispatcher.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)


def build_service(context: NodeContext) -> DimseService:
    """The ``dimse`` service that the composition root (:mod:`nnunet_node.app`) gives the app."""
    return DimseService(context)


def run_standalone(settings: Settings, *, ready: Any = None) -> int:
    """``nnunet-node dicom``: DIMSE node, completion, dispatch and job workers until a signal.

    ``ready`` (a callable taking the service) is called once everything listens: tests use it.
    """
    stop = threading.Event()
    service: DimseService | None = None

    def _on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: abort what is still open
            if service is not None:
                service.abort_stop()
            return
        LOGGER.info("signal %d: stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    context = build_context(settings)
    service = DimseService(context)
    try:
        context.job_service.start()
        service.start_sync()
        LOGGER.info("nnunet-node dicom: ready (AE %s, port %s)", settings.ae_title, service.port)
        print(
            f"nnunet-node dicom: {settings.ae_title} listening on port {service.port}", flush=True
        )
        if ready is not None:
            ready(service)
        stop.wait()
        service.begin_stop()  # the signal's graceful stop: NNUNET_NODE_DICOM_STOP_GRACE_S
    finally:
        service.stop_sync()
        context.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
