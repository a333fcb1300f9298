"""The zip of a job's outputs, served by ``GET /download/{job_id}``.

Built once from the job's recorded artifacts, plus its run record (``run.json``), and kept in the
job folder (``<jobs>/<id>/<id>.zip``), so repeated downloads stream the same file. Member names
are relative to the job's output folder (``stage_0/prediction.nii.gz``): never absolute, never
``..``, and a recorded file that lies outside the output folder (a link that points out) is left
out.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import zipfile
from pathlib import Path, PurePosixPath

from nnunet_node.core.errors import Conflict, NotFound
from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.record import RUN_RECORD_NAME
from nnunet_node.storage.jobs import JobRecord
from nnunet_node.storage.models import JobStatus

LOGGER = logging.getLogger(__name__)

_LOCK = threading.Lock()  # one build at a time in this process; the rename makes builds atomic
_HAS_OUTPUTS = (JobStatus.DONE, JobStatus.SUPERSEDED)


def zip_file_for(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id / f"{job_id}.zip"


def safe_arcname(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` in POSIX form, or None when it is not strictly inside."""
    try:
        resolved = path.resolve()
        rel = resolved.relative_to(root.resolve())
    except (OSError, ValueError):
        return None
    name = PurePosixPath(*rel.parts)
    if not rel.parts or name.is_absolute() or ".." in name.parts:
        return None
    return str(name)


def build_zip(settings: Settings, job: JobRecord) -> Path:
    """The zip of ``job``'s output files; built on the first call, reused afterwards."""
    status = job.status
    if status not in _HAS_OUTPUTS or job.result is None:
        raise Conflict(f"job {job.id!r} is {status.value}: only finished jobs have outputs")
    target = zip_file_for(settings, job.id)
    with _LOCK:
        if target.is_file():
            return target
        root = Path(job.output_dir) if job.output_dir else settings.jobs_dir / job.id
        members: dict[str, Path] = {}
        for art in job.artifacts:
            path = Path(art.path)
            arcname = safe_arcname(path, root)
            if arcname is None:
                LOGGER.warning("job %s: %s lies outside %s, not zipped", job.id, path, root)
                continue
            if not path.is_file():
                LOGGER.warning("job %s: output %s is gone, not zipped", job.id, path)
                continue
            members.setdefault(arcname, path)
        record = root / RUN_RECORD_NAME
        if members and record.is_file() and safe_arcname(record, root) == RUN_RECORD_NAME:
            members.setdefault(RUN_RECORD_NAME, record)
        if not members:
            raise NotFound(f"job {job.id!r}: no output files left to download")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with (
                os.fdopen(fd, "wb") as handle,
                zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive,
            ):
                for arcname, path in sorted(members.items()):
                    # gzipped NIfTI would not shrink again: store it as is.
                    kind = zipfile.ZIP_STORED if path.name.endswith(".gz") else zipfile.ZIP_DEFLATED
                    archive.write(path, arcname, compress_type=kind)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        LOGGER.info("job %s: zip of %d file(s) at %s", job.id, len(members), target)
        return target
