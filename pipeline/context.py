"""The node's parts, built once per process and handed to the HTTP app and the DIMSE node.

:func:`build_context` is called by the app factory (``api.app``) and by the standalone DIMSE node
(``nnunet-node dicom``). It builds; it starts nothing: the caller starts the job workers
(``context.job_service.start()``) and any service, and calls :meth:`NodeContext.close` at the end.
Whoever makes a resource closes it: the context closes what it built (database engine, archive,
job service, model cache); a service stops only what it started (the DIMSE node its socket and
threads, and the dispatcher's thread it started).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import ConfigError
from nnunet_node.core.settings import Settings
from nnunet_node.core.tls import client_context
from nnunet_node.inference.cache import PredictorCache
from nnunet_node.inference.device import DevicePolicy
from nnunet_node.inference.engine import InferenceEngine
from nnunet_node.pipeline.completion import CompletionWatcher
from nnunet_node.pipeline.dispatch import Dispatcher
from nnunet_node.pipeline.jobs import JobService
from nnunet_node.pipeline.spec import NodeSpec
from nnunet_node.storage import locks
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.migrations import check_database, safe_url, upgrade

LOGGER = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass
class NodeContext:
    settings: Settings
    engine_sql: Engine
    session_factory: sessionmaker[Session]
    archive: Archive
    spec: NodeSpec
    job_service: JobService
    inference_engine: InferenceEngine
    dispatcher: Dispatcher
    """Sends routed jobs' results (not started: the DIMSE service runs its thread; the HTTP
    API's dispatch retry marks a dispatch due through it, whether or not it runs here)."""
    completion: CompletionWatcher
    """Fires the routing rules on complete series (not started: the DIMSE service runs its
    thread; the dashboard lists the waiting series through it, whether or not it runs here)."""
    data_lock: locks.DataFolderLock | None = None
    """Held while this process is the node of the data folder (built with ``recover``)."""
    database_lock: locks.DatabaseLock | None = None
    """Held while this process is the node of its PostgreSQL database (built with ``recover``)."""

    def close(self) -> None:
        """Stop the workers (if started), empty the model cache and close the database pool."""
        self.job_service.stop()
        cache = getattr(self.inference_engine, "cache", None)
        if cache is not None:
            cache.stop()
            cache.clear()
        self.archive.close()
        if self.database_lock is not None:
            self.database_lock.release()
        self.engine_sql.dispose()
        if self.data_lock is not None:
            self.data_lock.release()


def build_context(
    settings: Settings, *, migrate: bool = True, recover: bool = True, broker: bool = True
) -> NodeContext:
    """Everything the node needs, wired: database (migrated unless ``migrate`` is false), archive
    (half-done writes of a crash finished or dropped when ``recover``), spec, inference engine with
    its predictor cache, and the job service (workers not started). With ``broker`` and
    ``NNUNET_NODE_BROKER_URL`` set, the job service hands jobs to the broker
    (:class:`~nnunet_node.pipeline.broker.BrokerQueue`) instead of running them; worker processes
    pass ``broker=False``: they run the jobs.

    With ``recover`` this process becomes the node of the data folder (:class:`~nnunet_node.
    storage.locks.DataFolderLock`, released by :meth:`NodeContext.close`): recovery and the
    requeueing of running jobs are safe only where no other node works in it.

    With ``recover`` it is also the node of its PostgreSQL database (:class:`~nnunet_node.
    storage.locks.DatabaseLock`): another node with a data folder of its own on the same
    database would recover this one's live state just the same.

    Raises ConfigError when the data folder cannot be made or written, is in use by another node,
    the database is in use by another node, or the spec is wrong."""
    for folder in (settings.data_dir, settings.jobs_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"NNUNET_NODE_DATA: cannot make the folder {folder}: {exc.strerror}"
            ) from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"NNUNET_NODE_DATA: the folder {folder} is not writable")
    data_lock = locks.DataFolderLock.acquire(settings.data_dir) if recover else None
    try:
        check_database(settings.database_url)  # one line naming the setting, else a traceback
        engine_sql = make_engine(settings.database_url)
    except BaseException:
        if data_lock is not None:
            data_lock.release()
        raise
    database_lock = None
    try:
        if recover:  # before migrating: never change the schema under another node
            database_lock = locks.DatabaseLock.acquire(engine_sql, safe_url(settings.database_url))
        if migrate:
            upgrade(settings.database_url)
        sessions = make_sessionmaker(engine_sql)
        archive = Archive(
            settings.archive_dir,
            sessions,
            min_free_bytes=settings.min_free_disk_mb * MIB,
            # the DIMSE service's receiver processes write it too (node/receivers.py)
            shared=settings.dicom_enabled
            and settings.dicom_process_count > 1
            and locks.available(),
        )
        if recover:
            archive.recover()
        spec = NodeSpec.load(settings)
        cache = PredictorCache(
            ttl_s=settings.cache_ttl_s,
            max_entries=settings.cache_max_entries,
            sweep_s=settings.cache_sweep_s,
        )
        device = DevicePolicy(settings.device, settings.gpu_wait_s)
        inference_engine = InferenceEngine(cache, device)
        queue = None
        if broker and settings.broker_url:
            from nnunet_node.pipeline.broker import BrokerQueue  # imports Celery

            queue = BrokerQueue(settings, sessions)
        job_service = JobService(settings, sessions, spec, archive, inference_engine, queue=queue)
        tls_peers = any(peer.tls for peer in spec.routing.peers)
        dispatcher = Dispatcher(
            sessions,
            spec.routing,
            calling_ae=settings.ae_title,
            archive_dir=archive.root,
            tls_context=(
                client_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
                if tls_peers
                else None
            ),
        )
    except BaseException:
        if database_lock is not None:
            database_lock.release()
        engine_sql.dispose()
        if data_lock is not None:
            data_lock.release()
        raise
    return NodeContext(
        settings=settings,
        engine_sql=engine_sql,
        session_factory=sessions,
        archive=archive,
        spec=spec,
        job_service=job_service,
        inference_engine=inference_engine,
        dispatcher=dispatcher,
        completion=CompletionWatcher(
            sessions,
            archive.root,
            spec.routing,
            submit=job_service.submit,
            supersede=job_service.supersede,
            default_quiet_s=settings.series_quiet_s,
        ),
        data_lock=data_lock,
        database_lock=database_lock,
    )
