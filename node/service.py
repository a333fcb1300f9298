"""The DIMSE side of the node as a service: AE, series-completion watcher and dispatcher.

``build_service`` is what the composition root (:mod:`nnunet_node.app`) gives the app factory as
its ``dimse`` service: the factory calls it with the process's
:class:`~nnunet_node.pipeline.context.NodeContext` and awaits ``start()`` / ``stop()`` in its
lifespan. ``run_standalone`` is ``nnunet-node dicom``: the same service plus the job
workers, without HTTP, until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
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

    def stop_sync(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.receivers is not None:
            self.receivers.stop()
        if self.node is not None:
            self.node.stop()
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

    def _on_signal(signum: int, _frame: Any) -> None:
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
    finally:
        service.stop_sync()
        context.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
