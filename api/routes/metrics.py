"""``GET /metrics``: the node's Prometheus metrics in the text exposition format.

The process-wide counters and histograms (:mod:`nnunet_node.core.metrics`) come first; then what
describes this node's state now, read at each scrape by :class:`NodeCollector`: jobs by status
(the queue depth and running jobs among them), free disk under the data folder, the size of the
DICOM index and the archive's bytes, the model cache (hits, loads, entries) and the memory in
use on each GPU (none on a CPU-only node: the metric is listed without samples). Behind the
API key unless ``NNUNET_NODE_METRICS_PUBLIC`` is set.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nnunet_node.api.deps import _api_key_header, get_context, get_settings, require_api_key
from nnunet_node.core import metrics
from nnunet_node.inference.device import cuda_memory
from nnunet_node.pipeline.context import NodeContext
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.query import index_counts

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])


class NodeCollector:
    """Prometheus collector of one node's state, read when scraped (a few small queries)."""

    def __init__(self, context: NodeContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        ctx = self.context
        counts = ctx.job_service.store.count_by_status()
        jobs = GaugeMetricFamily(metrics.JOBS_GAUGE, "Jobs by status.", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily(
            metrics.QUEUE_DEPTH, "Jobs queued and not yet started.", value=counts["queued"]
        )
        yield GaugeMetricFamily(
            metrics.RUNNING_JOBS, "Jobs running in a worker now.", value=counts["running"]
        )
        try:
            free = shutil.disk_usage(ctx.settings.data_dir).free
        except OSError:
            free = 0
        yield GaugeMetricFamily(
            metrics.DATA_FREE_BYTES, "Free bytes on the file system of the data folder.", value=free
        )
        with unit_of_work(ctx.archive.read_sessions) as session:
            index = index_counts(session)
        # Bytes apart from the row counts: one metric, one unit, so that a sum over its labels
        # means something (Prometheus' naming guide).
        archived = index.pop("bytes")
        entries = GaugeMetricFamily(
            metrics.INDEX_SIZE,
            "Rows of the DICOM index by level (patients, studies, series, instances).",
            labels=["level"],
        )
        for level, n in index.items():
            entries.add_metric([level], n)
        yield entries
        yield GaugeMetricFamily(
            metrics.ARCHIVE_BYTES,
            "Bytes of the instances in the archive (their Part 10 files), as indexed.",
            value=archived,
        )
        cache = ctx.inference_engine.cache
        yield CounterMetricFamily(
            metrics.MODEL_CACHE_HITS, "Predictor requests served from the cache.", cache.stats.hits
        )
        yield CounterMetricFamily(
            metrics.MODEL_CACHE_LOADS, "Predictors loaded from disk.", cache.stats.loads
        )
        yield GaugeMetricFamily(
            metrics.MODEL_CACHE_ENTRIES, "Predictors held in the cache now.", value=len(cache)
        )
        used = GaugeMetricFamily(
            metrics.GPU_MEMORY_USED, "Memory in use on each CUDA device.", labels=["device"]
        )
        total = GaugeMetricFamily(
            metrics.GPU_MEMORY_TOTAL, "Memory of each CUDA device.", labels=["device"]
        )
        for device, in_use, size in cuda_memory():
            used.add_metric([device], in_use)
            total.add_metric([device], size)
        yield used
        yield total


def render(context: NodeContext) -> bytes:
    """The exposition text: process-wide metrics, then this node's state."""
    local = CollectorRegistry(auto_describe=False)
    local.register(NodeCollector(context))
    return generate_latest(REGISTRY) + generate_latest(local)


def metrics_access(
    request: Request, header_key: Annotated[str | None, Security(_api_key_header)] = None
) -> None:
    """The API key, unless ``NNUNET_NODE_METRICS_PUBLIC`` is set."""
    if not get_settings(request).metrics_public:
        require_api_key(request, header_key)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"description": "No key"}},
)
async def scrape(request: Request, _: Annotated[None, Security(metrics_access)]) -> Response:
    """Prometheus metrics (text exposition format 0.0.4)."""
    context = get_context(request)
    body = await run_in_threadpool(render, context)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
