"""The seams of the job pipeline, as protocols: what the runner and the job service depend on.

- :class:`Engine`: runs a validated plan (``inference.engine.InferenceEngine`` is the real one).
- :class:`ProgressReporter` / :class:`CancelCheck`: what a running job reports to and asks; the
  runner gets these, never the job service.
- :class:`JobQueue`: how a queued job gets run. The in-process one is
  :class:`nnunet_node.pipeline.workers.WorkerPool` (threads claiming rows); the broker one is
  :class:`nnunet_node.pipeline.broker.BrokerQueue` (Celery carries the id to ``nnunet-node
  worker`` processes). Running is idempotent on the job id whoever runs it: a plain claim
  (:meth:`nnunet_node.pipeline.execution.JobExecutor.run_job`) only wins ``queued -> running``;
  a worker process claims with a lease (``storage.workers.JobLeases.claim``) and runs the job
  with ``JobService.run_claimed``, which records the outcome only while it holds the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from nnunet_node.inference.engine import StageResult
from nnunet_node.inference.request import Plan
from nnunet_node.inference.series_check import SeriesLayout
from nnunet_node.storage.workers import WorkerInfo


class ProgressReporter(Protocol):
    """Takes a running job's progress: ``{"stage": i, "stages": n, "step": str, "fraction":
    0..1}`` (keys optional); may drop or delay reports (rate limits), never raises."""

    def __call__(self, info: dict[str, Any], /) -> None: ...


class CancelCheck(Protocol):
    """True once the running job should stop (cancelled, superseded, shutdown)."""

    def __call__(self) -> bool: ...


class Engine(Protocol):
    """Runs every stage of ``plan`` on the series under ``study_path``, writing under
    ``output_dir/stage_<i>/``; returns one :class:`StageResult` per stage in order. ``layouts``:
    the series checks already made (``inference.series_check.check_plan``), by series path. Raises
    :class:`~nnunet_node.core.errors.JobCancelled` once ``should_stop()`` is true, and
    :class:`~nnunet_node.core.errors.NodeError` subclasses for bad input or inference failures."""

    def run(
        self,
        plan: Plan,
        study_path: Path,
        output_dir: Path,
        *,
        progress: ProgressReporter | None = None,
        should_stop: CancelCheck | None = None,
        layouts: dict[Path, SeriesLayout] | None = None,
    ) -> Sequence[StageResult]: ...


class JobQueue(Protocol):
    """Runs queued jobs. ``submit`` is called once the job's row is committed as ``queued``; it
    must not run the job in the caller's thread, and losing a submit must lose no job (the row
    stays queued and ``start`` picks it up). ``start`` / ``stop`` bracket the process's life;
    ``workers`` says who runs the jobs."""

    def submit(self, job_id: str) -> None: ...

    def start(self, *, recover: bool = True) -> None: ...

    def stop(self, timeout: float | None = 30.0) -> None: ...

    def workers(self) -> list[WorkerInfo]:
        """The workers that run this queue's jobs, alive now (what ``GET /workers`` lists)."""
        ...


__all__ = ["CancelCheck", "Engine", "JobQueue", "ProgressReporter"]
