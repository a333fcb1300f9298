"""Submission: a request checked, normalised and stored as a queued job row.

Three kinds of input (:class:`~nnunet_node.storage.models.InputKind`):

- ``paths``: the request's ``study_path`` (inside the allowed roots) and series folders under it;
- ``upload``: a folder the node chose (an extracted ``/infer_file`` upload), which the job's
  echoed ``request`` does not show; series may not leave it (or the allowed roots);
- ``archive``: series of the node's archive by SeriesInstanceUID (DIMSE and STOW routing rules),
  exported to ``<jobs>/<id>/inputs/<SeriesInstanceUID>/`` when the job runs.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import InvalidRequest, NotFound
from nnunet_node.core.settings import Settings
from nnunet_node.inference.request import Plan, normalise
from nnunet_node.inference.series_check import check_plan
from nnunet_node.pipeline.paths import PathRules
from nnunet_node.pipeline.spec import NodeSpec
from nnunet_node.pipeline.workspace import archive_inputs, job_folder
from nnunet_node.storage.archive import is_valid_uid
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.jobs import JobStore
from nnunet_node.storage.models import InputKind
from nnunet_node.storage.query import series_owners

_SERIES_PLACEHOLDER = re.compile(r"^\{series(?:\[(\d+)\])?\}$")


class JobSubmitter:
    """Validates requests against the spec and the path rules and creates queued job rows."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        spec: NodeSpec,
        store: JobStore,
        paths: PathRules,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.spec = spec
        self.store = store
        self.paths = paths

    def validate(
        self,
        request: dict[str, Any],
        *,
        study_path_required: bool = True,
        study_path: Path | None = None,
        output_dir: Path | None = None,
    ) -> Plan:
        """Normalise ``request`` into a plan and check every path it names against the allowed
        roots (links followed). Raises :class:`~nnunet_node.core.errors.ClientError` subclasses
        naming the field.

        ``study_path`` / ``output_dir`` are the server's own choice (an upload's extraction folder,
        an archive job's input folder) and override the request's; paths relative to such a study
        must stay inside it or the allowed roots.
        """
        if not isinstance(request, dict):
            raise InvalidRequest("the request body must be a JSON object")
        reserved = sorted(k for k in request if isinstance(k, str) and k.startswith("_"))
        if reserved:
            raise InvalidRequest(f"unknown field {reserved[0]!r}")
        effective = dict(request)
        if study_path is not None:
            effective["study_path"] = str(study_path)
        if output_dir is not None:
            effective["output_dir"] = str(output_dir)
        if study_path_required and not effective.get("study_path"):
            raise InvalidRequest("study_path: field required")
        plan = normalise(effective, self.spec.registry)
        self.paths.check(plan, trusted_study=study_path)
        if output_dir is None and plan.output_dir is not None:
            self.paths.check_requested_output(plan.output_dir)
        study = study_path or (Path(plan.study_path) if plan.study_path else None)
        if study is not None and study.is_dir():
            check_plan(plan, study)  # a refused series answers 400 before it is queued
        if plan.is_dicom:
            for stage in plan.stages:
                self.spec.metadata_for(stage.model.id)
        return plan

    def submit(
        self,
        request: dict[str, Any],
        *,
        source: str = "http",
        study_path: Path | None = None,
        output_dir: Path | None = None,
        series_uids: list[str] | None = None,
        route_name: str | None = None,
        client: str | None = None,
    ) -> str:
        """Validate ``request`` and store it as a queued job; return the job id (the row is
        committed when this returns; nothing runs it yet: see ``JobQueue.submit``).

        Without ``series_uids`` and ``study_path`` it is a ``paths`` job. ``study_path`` given
        makes an ``upload`` job on that folder. ``series_uids`` (sources ``dimse``/``stow``)
        make an ``archive`` job: its request's ``series_folders`` defaults to the series UIDs;
        entries ``{series}`` / ``{series[i]}`` stand for the first / i-th series (a route can so
        feed cascades, e.g. ``["{series}", "from:phantom"]``). Outputs go to ``output_dir``
        (argument, else the request's) or ``<jobs>/<id>/``. ``client`` (an HTTP client's address)
        is kept in the row for status pages.
        """
        if not isinstance(request, dict):
            raise InvalidRequest("the request body must be a JSON object")
        job_id = uuid.uuid4().hex
        stored = dict(request)
        study_uid: str | None = None
        patient_id: str | None = None
        if series_uids is not None:
            kind = InputKind.ARCHIVE
            if not series_uids:
                raise InvalidRequest("series_uids: at least one series is needed")
            bad = [uid for uid in series_uids if not is_valid_uid(uid)]
            if bad:
                raise InvalidRequest(f"series_uids: not valid UIDs: {bad}")
            study_uid, patient_id = self._series_owner(series_uids)
            stored.pop("study_path", None)
            stored["series_folders"] = _archive_series_folders(stored, series_uids)
            stored.setdefault("is_dicom", True)
            study_path = archive_inputs(self.settings, job_id)
        else:
            kind = InputKind.UPLOAD if study_path is not None else InputKind.PATHS
        plan = self.validate(
            stored,
            study_path_required=kind != InputKind.ARCHIVE,
            study_path=study_path,
            output_dir=output_dir,
        )
        folders: list[str] = []
        study_column: str | None = None
        if kind == InputKind.UPLOAD:
            assert study_path is not None
            study_column = str(Path(study_path).resolve())
        elif kind == InputKind.PATHS:
            assert plan.study_path is not None
            study_column = str(self.paths.resolve_study(plan.study_path))
        if kind != InputKind.ARCHIVE:
            series = [ref.raw for stage in plan.stages for ref in stage.inputs if ref.is_series]
            folders = list(dict.fromkeys(series))
        out = output_dir or (Path(plan.output_dir) if plan.output_dir else None)
        out_resolved = (
            self.paths.resolve_output(out) if out is not None else job_folder(self.settings, job_id)
        )
        self.store.create(
            job_id=job_id,
            source=source,
            request=stored,
            input_kind=kind,
            study_path=study_column,
            models=plan.model_ids,
            series_uids=series_uids or (),
            series_folders=folders,
            route_name=route_name,
            client=client,
            study_instance_uid=study_uid,
            patient_id=patient_id,
            output_dir=str(out_resolved),
            queue=self.queue_for(route_name, plan.model_ids),
        )
        return job_id

    def queue_for(self, route_name: str | None, model_ids: list[str]) -> str:
        """The queue of a job: its route's ``queue``, else the first of its models' that names
        one, else ``NNUNET_NODE_DEFAULT_QUEUE``."""
        if route_name:
            route = self.spec.routing.route(route_name)
            if route is not None and route.queue:
                return route.queue
        for model_id in model_ids:
            queue = self.spec.registry.resolve(model_id).queue
            if queue:
                return queue
        return self.settings.default_queue

    def _series_owner(self, series_uids: list[str]) -> tuple[str | None, str | None]:
        """Study UID and patient id of archived series (every one must be in the archive)."""
        with unit_of_work(self.session_factory) as session:
            found = series_owners(session, series_uids)
        missing = [uid for uid in series_uids if uid not in found]
        if missing:
            raise NotFound(f"series_uids: not in the archive: {missing}")
        return found[series_uids[0]]


def _archive_series_folders(request: dict[str, Any], series_uids: list[str]) -> list[Any]:
    """``series_folders`` of an archive job: the request's with ``{series}`` placeholders filled,
    or by default every series for each model."""
    given = request.get("series_folders")
    n_models = len(request["nnunet_id"]) if isinstance(request.get("nnunet_id"), list) else 1

    def fill(entry: Any) -> Any:
        if isinstance(entry, list):
            return [fill(e) for e in entry]
        if isinstance(entry, str):
            match = _SERIES_PLACEHOLDER.match(entry.strip())
            if match:
                index = int(match.group(1) or 0)
                if index >= len(series_uids):
                    raise InvalidRequest(
                        f"series_folders: {entry!r} but the job has {len(series_uids)} series"
                    )
                return series_uids[index]
        return entry

    if given is None:
        return list(series_uids) if n_models == 1 else [list(series_uids)] * n_models
    if not isinstance(given, list):
        raise InvalidRequest("series_folders: must be a list")
    return [fill(e) for e in given]


__all__ = ["JobSubmitter"]
