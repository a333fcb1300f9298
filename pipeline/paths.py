"""Path rules of a job: every path a request names lies inside the allowed roots.

Checked when a job is submitted (a bad path is refused before any row exists) and again when it
runs (links may have changed meanwhile). ``study_path`` is resolved with links followed; series,
``crop_from`` and ``intersect_with`` are relative to it; ``output_dir`` may also lie in the jobs
folder, but a request's own ``output_dir`` never in the folders the node manages (the data folder
itself, the archive, the uploads, the jobs folder and any job's folder in it); ``tmp_dir`` is
relative to the output folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from nnunet_node.core.errors import InvalidRequest, PathNotAllowed
from nnunet_node.core.paths import resolve_inside
from nnunet_node.core.settings import Settings
from nnunet_node.inference.request import Plan

_JOB_FOLDER = re.compile(r"[0-9a-f]{32}")
"""The name of a job's folder in the jobs folder: its id (``uuid4().hex``)."""


class PathRules:
    """The allowed roots of ``settings`` applied to a plan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def output_roots(self) -> list[Path]:
        return [*self.settings.allowed_roots, self.settings.jobs_dir]

    def resolve_output(self, output_dir: Path | str) -> Path:
        """``output_dir`` resolved inside the allowed roots or the jobs folder
        (:class:`~nnunet_node.core.errors.PathNotAllowed` otherwise)."""
        return resolve_inside(output_dir, self.output_roots, field="output_dir")

    def check_requested_output(self, output_dir: Path | str) -> None:
        """A request's own ``output_dir`` (not a folder the node chose) must not be one the node
        manages, whose files it would overwrite or mix its outputs with: the data folder itself,
        the archive (``dicom/``) or the uploads, the jobs folder, or a job's folder in it
        (``jobs/<job_id>``: another job's outputs, run record and download zip would be
        replaced). Raises :class:`~nnunet_node.core.errors.PathNotAllowed` naming the folder."""
        out = Path(output_dir).expanduser().resolve()
        settings = self.settings
        jobs = settings.jobs_dir.resolve()
        what: str | None = None
        if out == settings.data_dir.resolve():
            what = "the node's data folder"
        elif out == jobs:
            what = "the node's jobs folder"
        elif out.is_relative_to(jobs) and _JOB_FOLDER.fullmatch(out.relative_to(jobs).parts[0]):
            what = f"in the folder of job {out.relative_to(jobs).parts[0]}"
        else:
            for folder, name in (
                (settings.archive_dir, "archive"),
                (settings.uploads_dir, "uploads"),
            ):
                if out == folder.resolve() or out.is_relative_to(folder.resolve()):
                    what = f"in the node's {name} folder"
        if what is not None:
            raise PathNotAllowed(
                f"output_dir: {str(output_dir)!r} is {what}, which the node manages: choose "
                "another folder, or leave output_dir out (outputs then go to the job's own "
                "folder)"
            )

    def resolve_study(self, study_path: Path | str) -> Path:
        """A request's ``study_path`` resolved inside the allowed roots; it must be a folder."""
        study = resolve_inside(study_path, list(self.settings.allowed_roots), field="study_path")
        if not study.is_dir():
            raise InvalidRequest(f"study_path: {str(study_path)!r} is not a folder")
        return study

    def check(self, plan: Plan, *, trusted_study: Path | None = None) -> None:
        """Every path of ``plan`` inside the allowed roots (``trusted_study``, a folder the node
        chose, counts as one); series and masks must exist once the study folder does.

        Raises :class:`~nnunet_node.core.errors.PathNotAllowed` or
        :class:`~nnunet_node.core.errors.InvalidRequest`, naming the field.
        """
        roots = list(self.settings.allowed_roots)
        output_roots = self.output_roots
        study: Path | None = None
        input_roots = roots
        if trusted_study is not None:
            study = Path(trusted_study).resolve()
            input_roots = [*roots, study]
        elif plan.study_path is not None:
            study = self.resolve_study(plan.study_path)
        out: Path | None = None
        if plan.output_dir is not None:
            out = resolve_inside(plan.output_dir, output_roots, field="output_dir")
            if out.exists() and not out.is_dir():
                raise InvalidRequest(f"output_dir: {plan.output_dir!r} is not a folder")
        check_exists = study is None or study.is_dir()
        for field_name, raw in plan.paths():
            if field_name in ("study_path", "output_dir"):
                continue
            if field_name == "tmp_dir":
                base = out or self.settings.jobs_dir
                resolve_inside(raw, [*output_roots, base], base=base, field="tmp_dir")
                continue
            path = resolve_inside(raw, input_roots, base=study, field=field_name)
            if check_exists and not path.exists():
                raise InvalidRequest(f"{field_name}: {raw!r} does not exist under the study")


__all__ = ["PathRules"]
