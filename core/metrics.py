"""The node's Prometheus metrics: every definition in one module that each layer may import.

Counters and histograms are process-wide (prometheus-client's default registry), as in any
Prometheus-instrumented service; the layers that do the work increment them:

- ``storage`` — every instance filed, by source, calling AE and transfer syntax, and its bytes
  (one counter increment on the C-STORE path, nothing else);
- ``node`` — each DIMSE request (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET): outcome and latency;
- ``api`` — each DICOMweb request (STOW-RS, QIDO-RS, WADO-RS): status and latency;
- ``pipeline`` — each job's duration by model and outcome, each stage's steps by model, and each
  dispatch attempt by destination and outcome.

What is a state rather than an event (queue depth, running jobs, free disk, index size, the model
cache, GPU memory) is read when ``/metrics`` is scraped, by a collector the HTTP layer builds over
its own node (see ``api/routes/metrics.py``); the names it uses are defined here too.
Names follow the Prometheus conventions (base units: seconds and bytes; ``_total`` counters).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Histogram

PREFIX = "nnunet_node"

# Latencies of DIMSE and DICOMweb requests: 1 ms .. 60 s.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Jobs and their stages: 50 ms .. 1 h.
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

INSTANCES_RECEIVED = Counter(
    f"{PREFIX}_instances_received",
    "Instances filed in the archive, by how they came (dimse, stow, job, import), the calling "
    "AE title (declared peers, and the first 32 others; later others as '(other calling AEs)') "
    "and the transfer syntax UID.",
    ["source", "calling_ae", "transfer_syntax"],
)
BYTES_RECEIVED = Counter(
    f"{PREFIX}_received_bytes",
    "Bytes of the instances filed in the archive (Part 10 files), by source and calling AE.",
    ["source", "calling_ae"],
)

DIMSE_REQUESTS = Counter(
    f"{PREFIX}_dimse_requests",
    "DIMSE requests handled (PS3.7), by service and outcome (success or failure).",
    ["service", "outcome"],
)
DIMSE_SECONDS = Histogram(
    f"{PREFIX}_dimse_request_seconds",
    "Time spent handling one DIMSE request (for C-STORE: filing the received dataset; for "
    "C-FIND/C-MOVE/C-GET: the whole query or retrieval).",
    ["service"],
    buckets=_REQUEST_BUCKETS,
)

DICOMWEB_REQUESTS = Counter(
    f"{PREFIX}_dicomweb_requests",
    "DICOMweb requests (PS3.18) by service (stow, qido, wado) and HTTP status code.",
    ["service", "status"],
)
DICOMWEB_SECONDS = Histogram(
    f"{PREFIX}_dicomweb_request_seconds",
    "Time from a DICOMweb request's arrival to the end of its response body.",
    ["service"],
    buckets=_REQUEST_BUCKETS,
)

JOB_SECONDS = Histogram(
    f"{PREFIX}_job_duration_seconds",
    "Run time of a job in a worker, by model (stage model ids joined with '+') and outcome "
    "(done, failed, cancelled, requeued).",
    ["model", "outcome"],
    buckets=_JOB_BUCKETS,
)
STAGE_SECONDS = Histogram(
    f"{PREFIX}_stage_step_seconds",
    "Time of each step of an inference stage, by model and step (load, model, predict, write, "
    "dicom_export).",
    ["model", "step"],
    buckets=_JOB_BUCKETS,
)

DISPATCHES = Counter(
    f"{PREFIX}_dispatch_attempts",
    "Attempts to send a job's results to a destination, by destination and outcome (sent, failed).",
    ["destination", "outcome"],
)

# Names of the values read at scrape time (api/routes/metrics.py).
JOBS_GAUGE = f"{PREFIX}_jobs"
QUEUE_DEPTH = f"{PREFIX}_job_queue_depth"
RUNNING_JOBS = f"{PREFIX}_jobs_running"
DATA_FREE_BYTES = f"{PREFIX}_data_free_bytes"
INDEX_SIZE = f"{PREFIX}_index_entries"
ARCHIVE_BYTES = f"{PREFIX}_archive_bytes"
MODEL_CACHE_HITS = f"{PREFIX}_model_cache_hits"
MODEL_CACHE_LOADS = f"{PREFIX}_model_cache_loads"
MODEL_CACHE_ENTRIES = f"{PREFIX}_model_cache_entries"
GPU_MEMORY_USED = f"{PREFIX}_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = f"{PREFIX}_gpu_memory_total_bytes"


_RECEIVED: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_RECEIVED_MAX = 10_000

UNDECLARED_CALLING_AE_LABELS = 32
"""How many calling AE titles that are not declared peers get a ``calling_ae`` label of their
own; the rest are counted under :data:`OTHER_CALLING_AE`. In ``open`` or ``open-store`` access
any title may call, and each new label value is a new series for Prometheus to keep for ever
(an unbounded label: https://prometheus.io/docs/practices/naming/#labels)."""
OTHER_CALLING_AE = "(other calling AEs)"
"""The ``calling_ae`` label of undeclared calling AEs past :data:`UNDECLARED_CALLING_AE_LABELS`:
19 characters, so never an AE title (16 at most, PS3.5 6.2)."""
_declared_calling_aes: frozenset[str] = frozenset()
_undeclared_calling_aes: set[str] = set()
_labels_lock = threading.Lock()


def declare_calling_aes(titles: Iterable[str]) -> None:
    """The AE titles of the declared peers (the spec's ``peers`` and ``destinations``): each
    always gets a ``calling_ae`` label of its own (see :data:`UNDECLARED_CALLING_AE_LABELS`)."""
    global _declared_calling_aes
    _declared_calling_aes = frozenset(title.strip() for title in titles)


def _calling_ae_label(calling_ae: str) -> str:
    title = calling_ae.strip()
    if title in _declared_calling_aes or title in _undeclared_calling_aes:
        return title
    with _labels_lock:
        if len(_undeclared_calling_aes) < UNDECLARED_CALLING_AE_LABELS:
            _undeclared_calling_aes.add(title)
            return title
    return OTHER_CALLING_AE


Event = tuple[Any, ...]
"""A recorded event, as :func:`replay` takes it: ``("instance", source, calling_ae,
transfer_syntax, size)``, ``("dimse", service, outcome, seconds)`` or ``("refused", service)``."""

_forwarded: list[Event] | None = None
_forward_lock = threading.Lock()


def forward_events() -> None:
    """From now on this process keeps its DIMSE and instance events for another process to
    :func:`replay` (the node's receiver processes, node/receivers.py: the node's ``/metrics``
    counts what they received) instead of counting them itself; :func:`take_events` hands
    them over."""
    global _forwarded
    with _forward_lock:
        if _forwarded is None:
            _forwarded = []


def take_events() -> list[Event]:
    """The events kept since the last call (empty unless :func:`forward_events` was called)."""
    global _forwarded
    with _forward_lock:
        if not _forwarded:
            return []
        events, _forwarded = _forwarded, []
    return events


def replay(events: list[Event]) -> None:
    """Count events another process kept (:func:`take_events`) as if they happened here."""
    for event in events:
        if event[0] == "instance":
            _count_instance(*event[1:])
        elif event[0] == "dimse":
            _count_dimse(*event[1:])
        elif event[0] == "refused":
            _count_refused(*event[1:])


def _keep(event: Event) -> bool:
    if _forwarded is None:
        return False
    with _forward_lock:
        if _forwarded is None:
            return False
        _forwarded.append(event)
    return True


def dimse_request(service: str, outcome: str, seconds: float) -> None:
    """Count one DIMSE request of ``service`` (C-STORE...) that ended in ``outcome`` (success,
    failure) after ``seconds``."""
    if not _keep(("dimse", service, outcome, seconds)):
        _count_dimse(service, outcome, seconds)


def _count_dimse(service: str, outcome: str, seconds: float) -> None:
    DIMSE_REQUESTS.labels(service, outcome).inc()
    DIMSE_SECONDS.labels(service).observe(seconds)


def dimse_refused(service: str) -> None:
    """Count one DIMSE request of ``service`` refused before its handler ran (an invalid
    request, a peer not allowed the service): ``outcome="failure"``, no duration. Forwarded
    from a receiver process like :func:`dimse_request`."""
    if not _keep(("refused", service)):
        _count_refused(service)


def _count_refused(service: str) -> None:
    DIMSE_REQUESTS.labels(service, "failure").inc()


def instance_received(source: str, calling_ae: str, transfer_syntax: str, size: int) -> None:
    """Count one filed instance of ``size`` bytes. On the C-STORE hot path: two increments of
    children looked up once per (source, AE, transfer syntax) and kept (``labels()`` itself
    takes a lock and builds a key: measured 2.5-3.7 times the cost)."""
    if not _keep(("instance", source, calling_ae, transfer_syntax, size)):
        _count_instance(source, calling_ae, transfer_syntax, size)


def _count_instance(source: str, calling_ae: str, transfer_syntax: str, size: int) -> None:
    key = (source, calling_ae, transfer_syntax)
    children = _RECEIVED.get(key)
    if children is None:
        calling_ae = _calling_ae_label(calling_ae)
        children = (
            INSTANCES_RECEIVED.labels(source, calling_ae, transfer_syntax),
            BYTES_RECEIVED.labels(source, calling_ae),
        )
        if len(_RECEIVED) < _RECEIVED_MAX:
            _RECEIVED[key] = children
    children[0].inc()
    children[1].inc(size)


def dicomweb_service(method: str, path: str) -> str | None:
    """Which DICOMweb service a request under ``/dicom-web`` is (PS3.18 10): ``stow`` for a
    POST, ``qido`` for a search (the path ends with ``studies``, ``series`` or ``instances``),
    else ``wado`` (instances, metadata, frames, rendered); None outside ``/dicom-web``."""
    if not path.startswith("/dicom-web"):
        return None
    if method == "POST":
        return "stow"
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return "qido" if last in ("studies", "series", "instances") else "wado"
