"""The run record: ``run.json`` beside a job's outputs, and the same document in the job row.

It says how a result was made, so that a result can be traced and reproduced later: the node's
and its libraries' versions, the device, each model folder with the SHA-256 of every checkpoint
that was loaded, the folds, the effective request (the client's after the model's
``default_args`` and the node's defaults), the input series (UIDs, instance count, geometry), the
timings of each stage, the warnings, and every output file with its size and SHA-256.
TotalSegmentator and nnU-Net write comparable records; the field names here follow nnU-Net's
(``use_folds``, ``checkpoint_name``) and DICOM keywords (``SeriesInstanceUID``).

The runner calls :func:`build_run_record` once, after the last output is written, and
:func:`write_run_record` puts it in the output folder; the job store keeps the same dictionary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pydicom

from nnunet_node.inference.engine import StageResult
from nnunet_node.inference.request import Plan, Stage
from nnunet_node.storage.jobs import ArtifactRecord

LOGGER = logging.getLogger(__name__)

RUN_RECORD_NAME = "run.json"
RUN_RECORD_VERSION = 1

LIBRARIES = ("nnunet-node", "nnunetv2", "torch", "pydicom", "highdicom", "SimpleITK", "numpy")
"""Distributions whose installed versions the record names (PyPI names)."""

_CHUNK = 1 << 20
_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as 64 lower-case hex digits. Raises ``OSError``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(path: Path) -> str:
    """The SHA-256 of a checkpoint, remembered per (path, size, modification time): checkpoints
    of full-size models are hundreds of MB and do not change between jobs."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASHES_LOCK:
        known = _HASHES.get(key)
    if known is not None:
        return known
    value = sha256_file(path)
    with _HASHES_LOCK:
        _HASHES[key] = value
    return value


def library_versions() -> dict[str, str | None]:
    """Installed versions of :data:`LIBRARIES` (None for one that is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def effective_stage(stage: Stage) -> dict[str, Any]:
    """A stage's options after request, ``default_args`` and the node's defaults."""
    options: dict[str, Any] = _jsonable(
        {
            "index": stage.index,
            "model": stage.model.id,
            "inserted": stage.inserted,
            "series_folders": [ref.raw for ref in stage.inputs],
            "use_folds": list(stage.use_folds),
            "checkpoint_name": stage.checkpoint_name,
            "tta": stage.tta,
            "class_idx": stage.class_idx,
            "proba_threshold": stage.proba_threshold,
            "min_confidence": stage.min_confidence,
            "intersect_with": stage.intersect_with,
            "min_intersection": stage.min_intersection,
            "crop_from": stage.crop_from,
            "crop_padding": list(stage.crop_padding),
            "cascade_mode": stage.cascade_mode,
            "remove_objects_smaller_than": stage.remove_objects_smaller_than,
            "save_proba_map": stage.save_proba_map,
        }
    )
    return options


def effective_request(plan: Plan) -> dict[str, Any]:
    """The request as it ran: every field of the body with its default filled in, then one entry
    per stage under ``stages`` with the per-model values that were used."""
    body = plan.request.model_dump(mode="json")
    body["stages"] = [effective_stage(stage) for stage in plan.stages]
    return body


def model_record(stage: Stage) -> dict[str, Any]:
    """The model folder of a stage and the SHA-256 of each checkpoint it loaded
    (``fold_<f>/<checkpoint_name>``, nnU-Net's layout)."""
    folder = Path(stage.model.folder)
    checkpoints = []
    for fold in stage.use_folds:
        path = folder / f"fold_{fold}" / stage.checkpoint_name
        entry: dict[str, Any] = {"fold": fold, "path": str(path)}
        try:
            entry["sha256"] = checkpoint_sha256(path)
            entry["size_bytes"] = path.stat().st_size
        except OSError as exc:
            entry["sha256"] = None
            entry["error"] = str(exc)
        checkpoints.append(entry)
    return {
        "stage": stage.index,
        "id": stage.model.id,
        "name": stage.model.name,
        "folder": str(folder),
        "use_folds": list(stage.use_folds),
        "checkpoint_name": stage.checkpoint_name,
        "checkpoints": checkpoints,
    }


_HEADER_TAGS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "PatientID",
)


def input_record(result: StageResult) -> dict[str, Any]:
    """A stage's first input: its series (UIDs from the first file's header, instance count) and
    its geometry as SimpleITK reports it (size and spacing in x, y, z order; spacing and origin in
    mm, LPS; direction cosines row-major)."""
    image: Any = result.prediction  # SimpleITK's methods are unannotated
    options = getattr(result, "options", None)
    entry: dict[str, Any] = {
        "stage": result.index,
        "series_folder": options.inputs[0].raw if options is not None and options.inputs else None,
        "size_xyz": list(image.GetSize()),
        "spacing_mm_xyz": [round(float(s), 6) for s in image.GetSpacing()],
        "origin_mm": [round(float(s), 6) for s in image.GetOrigin()],
        "direction": [round(float(s), 6) for s in image.GetDirection()],
    }
    files = list(result.source_dicom_files)
    if files:
        entry["number_of_instances"] = len(files)
        try:
            header = pydicom.dcmread(
                files[0], stop_before_pixels=True, specific_tags=list(_HEADER_TAGS)
            )
            for keyword in _HEADER_TAGS:
                value = header.get(keyword)
                entry[keyword] = None if value is None else str(value)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            entry["error"] = f"header not readable: {exc}"
    return entry


def output_records(artifacts: Iterable[ArtifactRecord]) -> list[dict[str, Any]]:
    """Every output file with its kind, stage, size and SHA-256 (and its UIDs when archived)."""
    out: list[dict[str, Any]] = []
    for art in artifacts:
        path = Path(art.path)
        entry: dict[str, Any] = {"kind": art.kind, "stage": art.stage, "path": str(path)}
        try:
            entry["size_bytes"] = path.stat().st_size
            entry["sha256"] = sha256_file(path)
        except OSError as exc:
            entry["sha256"] = None
            entry["error"] = str(exc)
        if art.sop_instance_uid:
            entry["SOPInstanceUID"] = art.sop_instance_uid
            entry["SeriesInstanceUID"] = art.series_instance_uid
        out.append(entry)
    return out


def build_run_record(
    *,
    job_id: str,
    source: str,
    route_name: str | None,
    plan: Plan,
    results: Sequence[StageResult],
    artifacts: Iterable[ArtifactRecord],
    warnings: Sequence[str],
    timings: Mapping[str, float],
    stage_timings: Mapping[int, Mapping[str, float]],
    archive_series: Sequence[str] = (),
    started_at: datetime | None = None,
) -> dict[str, Any]:
    """The run record of a finished job (a JSON-ready dictionary).

    ``timings`` are the job's own steps in seconds (``prepare_s``, ``inference_s``,
    ``dicom_export_s``, ``total_s``); ``stage_timings`` adds per-stage steps measured outside the
    engine (the DICOM export) to the engine's own (``load_s``, ``model_s``, ``predict_s``,
    ``write_s``). ``archive_series`` are the SeriesInstanceUIDs an archive job read.
    """
    devices = sorted({str(getattr(r, "device", "") or "") for r in results} - {""})
    stages = []
    for result in results:
        times = dict(getattr(result, "timings", None) or {})
        times.update(stage_timings.get(result.index, {}))
        stages.append(
            {
                "index": result.index,
                "model": result.model_id,
                "device": str(getattr(result, "device", "") or "") or None,
                "timings_s": {k: round(float(v), 4) for k, v in times.items()},
                "labels": list(result.labels),
                "dropped_components": dict(getattr(result, "dropped_components", None) or {}),
            }
        )
    now = datetime.now(UTC)
    return {
        "run_record_version": RUN_RECORD_VERSION,
        "job_id": job_id,
        "source": source,
        "route_name": route_name,
        "started_at": started_at.isoformat() if started_at else None,
        "finished_at": now.isoformat(),
        "host": platform.node(),
        "versions": library_versions(),
        "device": devices[0] if len(devices) == 1 else (devices or None),
        "models": [model_record(stage) for stage in plan.stages],
        "request": effective_request(plan),
        "inputs": {
            "archive_series": list(archive_series),
            "stages": [input_record(r) for r in results],
        },
        "stages": stages,
        "timings_s": {k: round(float(v), 4) for k, v in timings.items()},
        "warnings": list(warnings),
        "outputs": output_records(artifacts),
    }


def write_run_record(record: Mapping[str, Any], output_dir: Path) -> Path:
    """Write ``<output_dir>/run.json`` (a temporary file renamed into place); returns its path."""
    target = Path(output_dir) / RUN_RECORD_NAME
    tmp = target.with_name(f".{RUN_RECORD_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, target)
    return target
