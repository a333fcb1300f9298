"""Runs one job: inputs, inference, DICOM outputs, archive, the /infer response (data flow 5-6).

``paths`` and ``upload`` jobs read their series under the job's ``study_path``. ``archive`` jobs
(DIMSE, STOW) first export their series from the archive into
``<jobs>/<id>/inputs/<SeriesInstanceUID>/`` (hard links where the file system allows) and run
there. Each stage writes under ``<output_dir>/stage_<i>/``; for DICOM inputs the runner adds the
binary SEG, the fractional SEG (``save_proba_map``) and the RTSTRUCT (``save_rt_struct_output``)
of each stage, referencing that stage's own source series, and files them in the archive as new
series of the source study. ``RunOutcome.result`` is the body the reference's ``/infer``
answers.

The runner knows nothing of queues or workers: it gets the job's record, a progress reporter and
a cancel check (:mod:`nnunet_node.pipeline.ports`), and returns the outcome or raises; the caller
records it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.uid import generate_uid

from nnunet_node.core import metrics
from nnunet_node.core.errors import ExportError, InvalidRequest, JobCancelled, NotFound
from nnunet_node.core.settings import Settings
from nnunet_node.export.files import DicomKind
from nnunet_node.export.metadata import SegmentationMetadata
from nnunet_node.export.stage import read_sources, write_stage_dicom
from nnunet_node.inference.engine import StageResult
from nnunet_node.inference.request import Plan, normalise
from nnunet_node.inference.series_check import check_plan
from nnunet_node.pipeline.paths import PathRules
from nnunet_node.pipeline.ports import CancelCheck, Engine, ProgressReporter
from nnunet_node.pipeline.record import build_run_record, write_run_record
from nnunet_node.pipeline.spec import NodeSpec
from nnunet_node.pipeline.workspace import archive_inputs, output_folder
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.jobs import ArtifactRecord, JobRecord
from nnunet_node.storage.models import InputKind
from nnunet_node.storage.query import instance_refs

LOGGER = logging.getLogger(__name__)

RESULT_FILE_KINDS = (
    "nifti_prediction",
    "nifti_proba",
    "nifti_inputs",
    "dicom_segmentation",
    "dicom_struct",
    "dicom_fractional_segmentation",
)


RESULT_KIND: dict[DicomKind, str] = {
    "seg": "dicom_segmentation",
    "fractional": "dicom_fractional_segmentation",
    "rtstruct": "dicom_struct",
}
"""The /infer response field that lists each kind of DICOM object."""


@dataclass
class RunOutcome:
    """What a finished run leaves: the /infer body, every output file, the final progress."""

    result: dict[str, Any]
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)
    run_record: dict[str, Any] | None = None
    """The run record (:mod:`pipeline.record`), also written as ``run.json`` in the outputs."""


class JobRunner:
    """Turns a claimed job into files, archive entries and a result.

    ``engine`` runs the inference (:class:`~nnunet_node.pipeline.ports.Engine`); ``paths`` checks
    the job's paths again when it runs (links may have changed since it was submitted).
    """

    def __init__(
        self,
        settings: Settings,
        spec: NodeSpec,
        archive: Archive,
        engine: Engine,
        paths: PathRules,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.archive = archive
        self.engine = engine
        self.paths = paths

    def run(
        self,
        job: JobRecord,
        *,
        progress: ProgressReporter,
        should_stop: CancelCheck,
    ) -> RunOutcome:
        """Run ``job`` (claimed by the caller); raise on failure, :class:`JobCancelled` when
        ``should_stop`` turns true. An archive job's exported inputs are removed afterwards (the
        archive keeps the originals)."""
        try:
            return self._run(job, progress=progress, should_stop=should_stop)
        finally:
            inputs = archive_inputs(self.settings, job.id)
            if inputs.is_dir():
                shutil.rmtree(inputs, ignore_errors=True)

    def _run(
        self,
        job: JobRecord,
        *,
        progress: ProgressReporter,
        should_stop: CancelCheck,
    ) -> RunOutcome:
        started = time.monotonic()
        started_at = datetime.now(UTC)
        request = dict(job.request)
        output_dir = output_folder(self.settings, job)
        archive_job = job.input_kind == InputKind.ARCHIVE

        def stop_check() -> None:
            if should_stop():
                raise JobCancelled(f"job {job.id} was stopped")

        progress({"step": "preparing", "stage": None, "fraction": 0.0})
        plan, study_path = self._prepare(job, request, output_dir, stop_check)
        # The geometry of every DICOM series, before any model is loaded: a refused series fails
        # the job here, within seconds (README "Series geometry").
        layouts = check_plan(plan, study_path, name_fields=not archive_job)
        warnings: list[str] = [w for layout in layouts.values() for w in layout.warnings]
        output_dir.mkdir(parents=True, exist_ok=True)
        stop_check()
        timings: dict[str, float] = {"prepare_s": time.monotonic() - started}

        stages_total = len(plan.stages)

        def engine_progress(info: dict[str, Any]) -> None:
            progress({"stages": stages_total, **info})

        t_inference = time.monotonic()
        results: Sequence[StageResult] = self.engine.run(
            plan,
            study_path,
            output_dir,
            progress=engine_progress,
            should_stop=should_stop,
            layouts=layouts,
        )
        timings["inference_s"] = time.monotonic() - t_inference
        stop_check()
        stage_timings: dict[int, dict[str, float]] = {}

        files: dict[str, list[str]] = {kind: [] for kind in RESULT_FILE_KINDS}
        artifacts: list[ArtifactRecord] = []
        for stage in results:
            for kind in ("nifti_prediction", "nifti_proba", "nifti_inputs"):
                for path in stage.files.get(kind, []):
                    files[kind].append(str(path))
                    artifacts.append(ArtifactRecord(kind, str(path), stage.index))
        if plan.is_dicom:
            for stage in results:
                stop_check()
                progress(
                    {
                        "stages": stages_total,
                        "stage": stage.index,
                        "step": "dicom export",
                        "fraction": 0.95,
                    }
                )
                t_export = time.monotonic()
                self._export_dicom(job, plan, stage, files, artifacts, warnings)
                stage_timings[stage.index] = {"dicom_export_s": time.monotonic() - t_export}
            timings["dicom_export_s"] = sum(t["dicom_export_s"] for t in stage_timings.values())

        result: dict[str, Any] = {
            "time_elapsed": round(time.monotonic() - started, 3),
            "nnunet_path": _one_or_list([str(s.model.folder) for s in plan.stages]),
            "metadata": _one_or_list(
                [s.model.metadata.as_document() if s.model.metadata else None for s in plan.stages]
            )
            if plan.is_dicom
            else None,
            "request": request,
            "status": "done",
            **files,
            "warnings": warnings,
        }
        timings["total_s"] = time.monotonic() - started
        record = build_run_record(
            job_id=job.id,
            source=job.source,
            route_name=job.route_name,
            plan=plan,
            results=results,
            artifacts=artifacts,
            warnings=warnings,
            timings=timings,
            stage_timings=stage_timings,
            archive_series=list(job.series_uids),
            started_at=started_at,
        )
        write_run_record(record, output_dir)
        for stage_record in record["stages"]:
            for step, seconds in stage_record["timings_s"].items():
                if step != "total_s":
                    step_name = step.removesuffix("_s")
                    metrics.STAGE_SECONDS.labels(stage_record["model"], step_name).observe(seconds)
        final = {"stages": stages_total, "stage": stages_total - 1, "step": "done", "fraction": 1.0}
        return RunOutcome(result=result, artifacts=artifacts, progress=final, run_record=record)

    # --- inputs -----------------------------------------------------------------------------
    def _prepare(
        self,
        job: JobRecord,
        request: dict[str, Any],
        output_dir: Path,
        stop_check: Callable[[], None],
    ) -> tuple[Plan, Path]:
        """The plan and the study folder of ``job``, its paths checked again (links may have
        changed since it was submitted)."""
        trusted: Path | None
        if job.input_kind == InputKind.ARCHIVE:
            study_path = archive_inputs(self.settings, job.id)
            self._export_series(list(job.series_uids), study_path, stop_check)
            trusted = study_path
        elif job.input_kind == InputKind.UPLOAD:
            if not job.study_path:
                raise InvalidRequest("the job's upload folder is not recorded")
            study_path = Path(job.study_path)
            trusted = study_path
        else:
            if not job.study_path:
                raise InvalidRequest("study_path: field required")
            study_path = Path(job.study_path)
            trusted = None
        run_request = {**request, "study_path": str(study_path), "output_dir": str(output_dir)}
        plan = normalise(run_request, self.spec.registry)
        self.paths.check(plan, trusted_study=trusted)
        return plan, study_path.resolve()

    def _export_series(
        self, series_uids: list[str], inputs: Path, stop_check: Callable[[], None]
    ) -> None:
        """Link (or copy) each series' files into ``inputs/<SeriesInstanceUID>/``."""
        if not series_uids:
            raise InvalidRequest("the job names no series to read from the archive")
        if inputs.exists():
            shutil.rmtree(inputs)  # a retried job starts from a clean copy
        for uid in series_uids:
            stop_check()
            with self.archive.read_sessions() as session:
                instances = instance_refs(session, "SERIES", uid)
            if not instances:
                raise NotFound(f"series {uid} is not in the archive (or has no instances)")
            folder = inputs / uid
            folder.mkdir(parents=True, exist_ok=True)
            for instance in instances:
                source = self.archive.root / instance.path
                if not source.is_file():
                    raise NotFound(
                        f"series {uid}: file of instance {instance.sop_instance_uid} is missing"
                    )
                target = folder / f"{instance.sop_instance_uid}.dcm"
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)
            LOGGER.info("series %s: %d instance(s) exported to %s", uid, len(instances), folder)

    # --- DICOM outputs ----------------------------------------------------------------------
    def _export_dicom(
        self,
        job: JobRecord,
        plan: Plan,
        stage: StageResult,
        files: dict[str, list[str]],
        artifacts: list[ArtifactRecord],
        warnings: list[str],
    ) -> None:
        if not stage.source_dicom_files:
            raise ExportError(
                f"stage {stage.index} ({stage.model_id}): its first input is not a DICOM series, "
                "so no DICOM-SEG or RTSTRUCT can reference it"
            )
        metadata = self.spec.metadata_for(stage.model_id)
        probabilities: np.ndarray | None = None
        labels: list[int] = []
        if plan.save_proba_map and stage.probabilities is not None:
            probabilities, labels = _foreground_probabilities(stage, metadata)
            probabilities = stage.on_source_slices(probabilities, is_mask=False)

        def uids(kind: DicomKind) -> tuple[str, str]:
            # Derived from the job: a retried job re-files the same objects instead of new ones.
            seed = [job.id, str(stage.index), kind]
            series_uid = generate_uid(entropy_srcs=[*seed, "series"])
            return series_uid, generate_uid(entropy_srcs=[*seed, "instance"])

        def file_in_archive(ds: Dataset, _path: Path) -> None:
            self.archive.ingest_dataset(ds, source="job")

        written = write_stage_dicom(
            Path(stage.folder),
            # On the source slices the volume was built from (the grid itself unless resampled).
            stage.on_source_slices(sitk.GetArrayFromImage(stage.prediction), is_mask=True),
            read_sources(stage.source_dicom_files),  # headers only: no pixel data in memory
            metadata,
            suffix=plan.suffix,
            rtstruct=plan.save_rt_struct_output,
            probabilities=probabilities if labels else None,
            probability_labels=labels or None,
            uids=uids,
            on_written=file_in_archive,
            subject=f"stage {stage.index} ({stage.model_id})",
        )
        warnings.extend(written.notes)
        for obj in written.objects:
            kind = RESULT_KIND[obj.kind]
            files[kind].append(str(obj.path))
            artifacts.append(
                ArtifactRecord(
                    kind,
                    str(obj.path),
                    stage.index,
                    sop_instance_uid=obj.sop_instance_uid,
                    series_instance_uid=obj.series_instance_uid,
                )
            )


def _foreground_probabilities(
    stage: StageResult, metadata: SegmentationMetadata
) -> tuple[np.ndarray, list[int]]:
    """The kept probability channels without background, and the label value of each."""
    proba = np.asarray(stage.probabilities, dtype=np.float32)
    labels = [int(v) for v in stage.labels if int(v) != 0]
    if proba.shape[0] == len(labels) + 1:
        proba = proba[1:]
    elif proba.shape[0] != len(labels):
        raise ExportError(
            f"stage {stage.index} ({stage.model_id}): {proba.shape[0]} probability channels for "
            f"labels {labels}"
        )
    return proba, labels


def _one_or_list(values: list[Any]) -> Any:
    """The reference answers a single value for one model and a list for several."""
    return values[0] if len(values) == 1 else values
