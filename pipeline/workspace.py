"""The folders of a job under ``<data>/jobs/`` and of an upload under ``<data>/uploads/``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from nnunet_node.core.settings import Settings
from nnunet_node.storage.jobs import JobRecord
from nnunet_node.storage.models import InputKind

LOGGER = logging.getLogger(__name__)


def job_folder(settings: Settings, job_id: str) -> Path:
    """``<jobs>/<job_id>/``: inputs of archive jobs, default outputs, the download zip."""
    return settings.jobs_dir / job_id


def archive_inputs(settings: Settings, job_id: str) -> Path:
    """Where an archive job's series are exported: ``<jobs>/<id>/inputs/<SeriesInstanceUID>/``."""
    return job_folder(settings, job_id) / "inputs"


def output_folder(settings: Settings, job: JobRecord) -> Path:
    """The job's output folder: the one it recorded, else ``<jobs>/<id>/``."""
    return Path(job.output_dir) if job.output_dir else job_folder(settings, job.id)


def discard_upload(settings: Settings, job: JobRecord) -> None:
    """Remove the folder an ``/infer_file`` upload was extracted to (the caller knows the job is
    over: done, failed or cancelled). Does nothing for other jobs, or for a folder that is not
    strictly inside the uploads folder."""
    if job.input_kind != InputKind.UPLOAD or not job.study_path:
        return
    uploads = settings.uploads_dir.resolve()
    path = Path(job.study_path).resolve()
    if not path.is_relative_to(uploads) or path == uploads:
        LOGGER.warning("job %s: upload folder %s is not under %s: kept", job.id, path, uploads)
        return
    shutil.rmtree(uploads / path.relative_to(uploads).parts[0], ignore_errors=True)


def delete_job_folder(settings: Settings, job_id: str) -> None:
    """Remove ``<jobs>/<id>/`` (inputs, default outputs, zip); the row stays."""
    folder = job_folder(settings, job_id)
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "archive_inputs",
    "delete_job_folder",
    "discard_upload",
    "job_folder",
    "output_folder",
]
