"""A node with a routing rule on the demo model, for the tests of the routed flow: the spec that
routes phantom CT series to the `phantom` model and a destination PACS, and a node as
``nnunet-node dicom`` builds it (context, job workers, DIMSE service; no HTTP API)."""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from nnunet_node.core.settings import Settings
from nnunet_node.node.service import DimseService
from nnunet_node.pipeline.context import NodeContext, build_context
from nnunet_node.storage.jobs import JobRecord
from nnunet_node.storage.models import JobStatus

REPO = Path(__file__).resolve().parents[2]
ROUTE_ARGS = {"is_dicom": True, "save_rt_struct_output": True, "tta": False}
"""The rule's job: DICOM input, SEG and RTSTRUCT, no test-time augmentation (fast)."""


def routed_spec(
    folder: Path,
    pacs_port: int,
    *,
    quiet: float = 1.0,
    models: Collection[str] | None = ("phantom",),
    queues: dict[str, str] | None = None,
    pacs: dict[str, Any] | None = None,
    move_port: int | None = None,
) -> Path:
    """``folder/spec.yaml``: the repository's spec with ``models`` (None: all of them; ``queues``
    puts a model in a queue), a rule ``phantom-ct`` sending phantom CT series (SeriesDescription
    containing "phantom") to the `phantom` model after ``quiet`` seconds, its results to the
    destination PACS at ``pacs_port`` (``pacs`` adds to it, e.g. ``max_attempts``); with
    ``move_port`` also a C-MOVE destination MOVEDEST."""
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    spec["model_folder"] = str(REPO / "models")
    if models is not None:
        spec["models"] = [m for m in spec["models"] if m["id"] in models]
    for model in spec["models"]:
        if queues and model["id"] in queues:
            model["queue"] = queues[model["id"]]
    destinations: dict[str, Any] = {
        "PACS": {
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": pacs_port,
            "retry_delay_s": 0.5,
            **(pacs or {}),
        }
    }
    if move_port is not None:
        destinations["MOVEDEST"] = {"ae_title": "MOVEDEST", "host": "127.0.0.1", "port": move_port}
    spec["destinations"] = destinations
    spec["routes"] = [
        {
            "name": "phantom-ct",
            "match": {"Modality": "CT", "SeriesDescription": "(?i).*phantom.*"},
            "nnunet_id": "phantom",
            "args": ROUTE_ARGS,
            "destinations": ["PACS"],
            "quiet_seconds": quiet,
        }
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def dimse_settings(tmp: Path, spec: Path) -> Settings:
    """Settings of a node in ``tmp/data`` on ``spec``: DICOM on a free loopback port, CPU, a
    30 s quiet period by default (rules set their own)."""
    return Settings(
        data_dir=tmp / "data",
        model_serve_spec=spec,
        dicom_host="127.0.0.1",
        dicom_port=0,
        device="cpu",
        min_free_disk_mb=0,
        series_quiet_s=30,
    )


class DimseNode:
    """A node as ``nnunet-node dicom`` builds it (context, job workers, DIMSE service), started."""

    def __init__(self, settings: Settings) -> None:
        self.context: NodeContext = build_context(settings)
        self.service = DimseService(self.context)
        self.context.job_service.start()
        self.service.start_sync()

    @property
    def port(self) -> int:
        assert self.service.port is not None
        return self.service.port

    def stop(self) -> None:
        self.service.stop_sync()
        self.context.close()

    def jobs(self) -> list[JobRecord]:
        """Every job, oldest first."""
        items, _ = self.context.job_service.list(limit=1000)
        return items[::-1]

    def wait_dispatched(self, job_id: str, timeout: float = 60) -> None:
        """Return once every dispatch of the job has left ``pending`` (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.context.job_service.get(job_id)
            if job.dispatches and all(d.status.value != "pending" for d in job.dispatches):
                return
            time.sleep(0.1)

    def wait_job(self, timeout: float = 120) -> JobRecord:
        """The newest job once it is done or failed.

        :raises AssertionError: none finished within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if jobs and jobs[-1].status in (JobStatus.DONE, JobStatus.FAILED):
                return jobs[-1]
            time.sleep(0.2)
        raise AssertionError(f"no finished job: {[(j.id, j.status) for j in self.jobs()]}")
