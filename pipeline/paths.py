"""Path rules of a job: every path a request names lies inside the allowed roots.

Checked when a job is submitted (a bad path is refused before any row exists) and again when it
runs (links may have changed meanwhile). ``study_path`` is resolved with links followed; series,
``crop_from`` and ``intersect_with`` are relative to it; ``output_dir`` may also lie in the jobs
folder; ``tmp_dir`` is relative to the output folder.
"""

from __future__ import annotations

from pathlib import Path

from nnunet_node.core.errors import InvalidRequest
from nnunet_node.core.paths import resolve_inside
from nnunet_node.core.settings import Settings
from nnunet_node.inference.request import Plan


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
