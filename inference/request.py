"""The ``/infer`` request body and its normalisation into a :class:`Plan` of stages.

The body keeps the reference server's fields (``docs/reference-contract.md``). Normalisation fixes
what the reference gets wrong (``docs/reference-contract.md``, "The reference's defects"):

- a flat ``series_folders`` list for one model is that model's list of series (the reference splits
  it into characters), and the same holds for ``use_folds``, ``class_idx`` and every per-model
  field;
- each model's ``default_args`` are merged *under* the request: a field the request sets wins;
- cascade references (``from:<model>``, ``from:<model>=<label>``, ``from:<model>[<i>]``) to a model
  that is not an earlier stage insert that model before the stage that needs it, fed with that
  stage's first N series (N = the inserted model's input channels); several inserted models in one
  stage each get their own index; an unknown model in a reference is a client error (400), not
  a 500;
- every accepted field is honoured (``tta`` on every stage, ``tmp_dir``,
  ``remove_objects_smaller_than``) and every unknown field is rejected, naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nnunet_node.core.errors import InvalidRequest, UnknownModel, describe_validation_error
from nnunet_node.inference.spec import ModelFiles, ModelRegistry, ModelSpec

CascadeMode = Literal["intersect", "crop"]
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHECKPOINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.pth$")
_REF = re.compile(r"^from:(?P<model>[^=\[\]]+?)(?:=(?P<label>-?\d+)|\[(?P<channel>-?\d+)\])?$")

Number = float | None


class InferenceRequest(BaseModel):
    """The body of ``POST /infer`` (and the ``request`` field of ``/infer_file``).

    Per-model fields take one value for every model, or a list with one entry per model (``null``
    entries fall back to the model's ``default_args``). ``study_path`` and ``output_dir`` are
    optional here: the HTTP layer enforces what each endpoint requires.
    """

    model_config = ConfigDict(extra="forbid")

    nnunet_id: str | list[str] = Field(
        description="Model id, name or alias; a list runs the models in order as stages."
    )
    study_path: str | None = Field(None, description="Study root; series paths are relative to it.")
    series_folders: list[str | list[str]] | None = Field(
        None,
        description="Series per model: a list for one model, a list of lists for several. An entry "
        "is a folder holding one DICOM series, an image file (NIfTI, NRRD, MHA) or a folder "
        "holding one, or a cascade reference from:<model>, from:<model>=<label>, "
        "from:<model>[<channel>].",
    )
    output_dir: str | None = Field(None, description="Where stage_<i>/ folders are written.")
    class_idx: int | list[int | list[int] | None] | None = Field(
        None, description="Classes kept (per model); labels keep their values."
    )
    checkpoint_name: str | list[str | None] = Field(
        DEFAULT_CHECKPOINT, description="Checkpoint file in each fold folder (per model)."
    )
    tmp_dir: str = Field(
        ".tmp",
        description="Scratch folder (relative to output_dir) where stages are written before they "
        "are moved into place; removed afterwards.",
    )
    is_dicom: bool = Field(False, description="Inputs are DICOM series; export DICOM-SEG/RTSTRUCT.")
    tta: bool | list[bool | None] = Field(True, description="Mirroring test-time augmentation.")
    use_folds: int | str | list[int | str | list[int | str] | None] = Field(  # type: ignore[assignment]
        default_factory=lambda: [0], description="Folds to ensemble ('all' for fold_all)."
    )
    proba_threshold: float | list[Number] | None = Field(
        None, description="Probability threshold (per model); null means argmax."
    )
    min_confidence: float | list[Number] | None = Field(
        None,
        description="A component is dropped when its maximum probability is below this "
        "(default: proba_threshold).",
    )
    intersect_with: str | list[str | None] | None = Field(
        None, description="Mask image; components mostly outside it are dropped."
    )
    min_intersection: float | list[Number] | None = Field(
        0.1,
        description="Fraction of a component that must lie inside the intersect_with mask or the "
        "upstream stage's mask (coverage, not IoU).",
    )
    crop_from: str | list[str | None] | None = Field(
        None, description="Mask image; inputs are cropped to its bounding box plus crop_padding."
    )
    crop_padding: tuple[int, int, int] | list[tuple[int, int, int] | None] | None = Field(
        (10, 10, 10), description="Voxels added around the crop box (x, y, z)."
    )
    cascade_mode: CascadeMode | list[CascadeMode | None] = Field(
        "intersect",
        description="How a stage fed by an earlier stage uses its mask: intersect or crop.",
    )
    remove_objects_smaller_than: float | list[Number] | None = Field(
        None,
        description="Drop components smaller than this fraction (0..1) of the largest one.",
    )
    save_proba_map: bool = Field(
        False, description="Write proba[_suffix].nii.gz; needs a threshold."
    )
    save_nifti_inputs: bool = Field(False, description="Write each stage's input volumes as NIfTI.")
    save_rt_struct_output: bool = Field(False, description="Also export RTSTRUCT (DICOM inputs).")
    suffix: str | None = Field(None, description="Output names become prediction_<suffix>.nii.gz.")

    @field_validator("suffix")
    @classmethod
    def _safe_suffix(cls, value: str | None) -> str | None:
        if value is not None and not _SUFFIX.match(value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'")
        return value

    @field_validator("nnunet_id")
    @classmethod
    def _non_empty_ids(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one model")
        return value


# Fields that take a value per stage; the rest are request-wide.
PER_STAGE_FIELDS = (
    "class_idx",
    "checkpoint_name",
    "tta",
    "use_folds",
    "proba_threshold",
    "min_confidence",
    "intersect_with",
    "min_intersection",
    "crop_from",
    "crop_padding",
    "cascade_mode",
    "remove_objects_smaller_than",
)
GLOBAL_FIELDS = (
    "is_dicom",
    "save_proba_map",
    "save_nifti_inputs",
    "save_rt_struct_output",
    "suffix",
    "tmp_dir",
)
# Per-stage fields whose value is itself a list, so a flat list is one value, not one per model.
_LIST_VALUED = {"use_folds", "crop_padding"}


@dataclass(frozen=True)
class InputRef:
    """One entry of a stage's ``series_folders``: a series path or an earlier stage's output."""

    raw: str
    path: str | None = None  # a series, relative to study_path
    stage: int | None = None  # index of the referenced stage
    label: int | None = None  # from:<model>=<label>: binary mask of that label
    channel: int | None = None  # from:<model>[<i>]: probability channel i

    @property
    def is_series(self) -> bool:
        return self.path is not None

    @property
    def is_mask(self) -> bool:
        """Resampled with nearest neighbour (label maps and masks), not interpolated."""
        return self.stage is not None and self.channel is None


@dataclass
class Stage:
    """One model run with every option resolved (request over ``default_args`` over defaults)."""

    index: int
    model: ModelSpec
    inputs: list[InputRef]
    inserted: bool = False
    upstream: list[int] = field(default_factory=list)
    class_idx: list[int] | None = None
    checkpoint_name: str = DEFAULT_CHECKPOINT
    tta: bool = True
    use_folds: tuple[int | str, ...] = (0,)
    proba_threshold: float | None = None
    min_confidence: float | None = None
    intersect_with: str | None = None
    min_intersection: float = 0.1
    crop_from: str | None = None
    crop_padding: tuple[int, int, int] = (10, 10, 10)
    cascade_mode: CascadeMode = "intersect"
    remove_objects_smaller_than: float | None = None
    save_proba_map: bool = False
    labels: dict[str, int] = field(default_factory=dict)
    channels: int = 1

    @property
    def model_id(self) -> str:
        return self.model.id

    @property
    def filter_components(self) -> bool:
        """Whether connected components are analysed (threshold, confidence, size or
        intersection)."""
        return (
            self.proba_threshold is not None
            or self.min_confidence is not None
            or self.remove_objects_smaller_than is not None
            or self.intersect_with is not None
        )


@dataclass
class Plan:
    """A validated request: the stages to run in order and the request-wide options."""

    stages: list[Stage]
    request: InferenceRequest
    study_path: str | None
    output_dir: str | None
    is_dicom: bool = False
    save_proba_map: bool = False
    save_nifti_inputs: bool = False
    save_rt_struct_output: bool = False
    suffix: str | None = None
    tmp_dir: str = ".tmp"

    def paths(self) -> list[tuple[str, str]]:
        """Every path the request names, as ``(field, raw path)``, for the caller to check against
        the allowed roots before anything runs. Series, ``crop_from`` and ``intersect_with`` are
        relative to ``study_path``; ``tmp_dir`` to ``output_dir``."""
        out: list[tuple[str, str]] = []
        if self.study_path is not None:
            out.append(("study_path", self.study_path))
        if self.output_dir is not None:
            out.append(("output_dir", self.output_dir))
        out.append(("tmp_dir", self.tmp_dir))
        for stage in self.stages:
            for j, ref in enumerate(stage.inputs):
                if ref.path is not None:
                    out.append((f"series_folders[{stage.index}][{j}]", ref.path))
            if stage.crop_from:
                out.append((f"crop_from[{stage.index}]", stage.crop_from))
            if stage.intersect_with:
                out.append((f"intersect_with[{stage.index}]", stage.intersect_with))
        return out

    @property
    def model_ids(self) -> list[str]:
        return [s.model.id for s in self.stages]


_UNSET: Any = object()


def parse_request(raw: InferenceRequest | dict[str, Any]) -> InferenceRequest:
    """Validate the body; raise :class:`InvalidRequest` naming the field (unknown fields
    included)."""
    if isinstance(raw, InferenceRequest):
        return raw
    if not isinstance(raw, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return InferenceRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc, per_field=True)) from exc


def normalise(raw: InferenceRequest | dict[str, Any], registry: ModelRegistry) -> Plan:
    """Turn a request into a :class:`Plan`, or raise :class:`InvalidRequest` / :class:`UnknownModel`
    naming the field; :class:`~core.errors.ModelUnavailable` when a model's files are absent."""
    req = parse_request(raw)
    ids = [req.nnunet_id] if isinstance(req.nnunet_id, str) else list(req.nnunet_id)
    models: list[ModelSpec] = []
    for i, model_id in enumerate(ids):
        try:
            models.append(registry.resolve(model_id))
        except UnknownModel as exc:
            where = "nnunet_id" if isinstance(req.nnunet_id, str) else f"nnunet_id[{i}]"
            raise UnknownModel(f"{where}: {exc}") from exc
    n = len(models)
    series = _series_per_model(req.series_folders, n)
    per_stage = {name: _per_stage_values(req, name, n) for name in PER_STAGE_FIELDS}

    builder = _PlanBuilder(registry, req, models, per_stage)
    for i, (spec, entries) in enumerate(zip(models, series, strict=True)):
        builder.add_user_stage(i, spec, entries)
    stages = builder.stages

    def global_value(name: str) -> Any:
        if name in req.model_fields_set:
            return getattr(req, name)
        for spec in models:
            if name in spec.default_args:
                return spec.default_args[name]
        return InferenceRequest.model_fields[name].get_default(call_default_factory=True)

    plan = Plan(
        stages=stages,
        request=req,
        study_path=req.study_path,
        output_dir=req.output_dir,
        is_dicom=bool(global_value("is_dicom")),
        save_proba_map=bool(global_value("save_proba_map")),
        save_nifti_inputs=bool(global_value("save_nifti_inputs")),
        save_rt_struct_output=bool(global_value("save_rt_struct_output")),
        suffix=global_value("suffix"),
        tmp_dir=str(global_value("tmp_dir")),
    )
    if plan.suffix is not None and not _SUFFIX.match(plan.suffix):
        raise InvalidRequest(f"suffix: {plan.suffix!r} is not a safe file-name part")
    for stage in stages:
        stage.save_proba_map = plan.save_proba_map and stage.proba_threshold is not None
        if plan.save_proba_map and not stage.inserted and stage.proba_threshold is None:
            raise InvalidRequest(
                f"proba_threshold: save_proba_map needs a threshold for model "
                f"{stage.model.id!r} (stage {stage.index})"
            )
    if not plan.tmp_dir.strip():
        raise InvalidRequest("tmp_dir: must not be empty")
    return plan


def _series_per_model(value: list[str | list[str]] | None, n: int) -> list[list[str]]:
    if value is None:
        raise InvalidRequest("series_folders: field required")
    if not value:
        raise InvalidRequest("series_folders: must not be empty")
    flat = all(isinstance(v, str) for v in value)
    nested = all(isinstance(v, list) for v in value)
    if not (flat or nested):
        raise InvalidRequest("series_folders: mixes strings and lists")
    if flat:
        if n != 1:
            raise InvalidRequest(
                f"series_folders: {n} models need a list of {n} lists of series, got one flat list"
            )
        # One model: the flat list is its series (the reference splits it into characters).
        groups = [[v for v in value if isinstance(v, str)]]
    else:
        groups = [list(v) for v in value if isinstance(v, list)]
        if len(groups) != n:
            raise InvalidRequest(
                f"series_folders: {len(groups)} lists of series for {n} model(s); "
                "give one per model"
            )
    for i, group in enumerate(groups):
        if not group:
            raise InvalidRequest(f"series_folders[{i}]: needs at least one series")
        for j, entry in enumerate(group):
            if not entry.strip():
                raise InvalidRequest(f"series_folders[{i}][{j}]: empty path")
    return groups


def _per_stage_values(req: InferenceRequest, name: str, n: int) -> tuple[list[Any], Any]:
    """``(value per user stage or _UNSET, value for inserted stages or _UNSET)``."""
    if name not in req.model_fields_set:
        return [_UNSET] * n, _UNSET
    value = getattr(req, name)
    if name == "class_idx":
        if value is None or isinstance(value, int):
            return [value] * n, value
        nested = any(isinstance(v, list) or v is None for v in value)
        if n == 1 and not nested:
            return [list(value)], _UNSET
        if len(value) != n:
            raise InvalidRequest(
                f"class_idx: {len(value)} entries for {n} models; give one per model "
                "(an int, a list of ints or null)"
            )
        return [(_UNSET if v is None else v) for v in value], _UNSET
    if name == "use_folds":
        if isinstance(value, int | str):
            return [[value]] * n, [value]
        nested = any(isinstance(v, list) or v is None for v in value)
        if not nested:
            return [list(value)] * n, list(value)
        if len(value) != n:
            raise InvalidRequest(f"use_folds: {len(value)} lists of folds for {n} models")
        return [(_UNSET if v is None else v if isinstance(v, list) else [v]) for v in value], _UNSET
    if name == "crop_padding":
        if value is None or isinstance(value, tuple):
            return [value] * n, value
        if len(value) != n:
            raise InvalidRequest(f"crop_padding: {len(value)} paddings for {n} models")
        return [(_UNSET if v is None else v) for v in value], _UNSET
    if isinstance(value, list):
        if len(value) != n:
            raise InvalidRequest(
                f"{name}: {len(value)} values for {n} model(s); give one per model"
            )
        return [(_UNSET if v is None else v) for v in value], _UNSET
    return [value] * n, value


class _PlanBuilder:
    def __init__(
        self,
        registry: ModelRegistry,
        req: InferenceRequest,
        models: list[ModelSpec],
        per_stage: dict[str, tuple[list[Any], Any]],
    ) -> None:
        self.registry = registry
        self.req = req
        self.per_stage = per_stage
        self.stages: list[Stage] = []
        self._last_by_model: dict[str, int] = {}
        self._last_user_stage: int | None = None
        self._files: dict[str, ModelFiles] = {}
        self.n_user = len(models)

    def files(self, spec: ModelSpec) -> ModelFiles:
        if spec.id not in self._files:
            self._files[spec.id] = self.registry.require(spec)
        return self._files[spec.id]

    def add_user_stage(self, i: int, spec: ModelSpec, entries: list[str]) -> None:
        where = f"series_folders[{i}]" if self.n_user > 1 else "series_folders"
        parsed: list[tuple[str, re.Match[str] | None]] = [
            (e, _REF.match(e.strip())) for e in entries
        ]
        for j, (entry, match) in enumerate(parsed):
            if entry.strip().startswith("from:") and match is None:
                raise InvalidRequest(
                    f"{where}[{j}]: {entry!r} is not from:<model>, from:<model>=<label> or "
                    "from:<model>[<channel>]"
                )
        plain = [e for e, m in parsed if m is None]
        refs: list[InputRef] = []
        upstream: list[int] = []
        for j, (entry, match) in enumerate(parsed):
            if match is None:
                refs.append(InputRef(raw=entry, path=entry))
                continue
            name = match.group("model").strip()
            try:
                ref_spec = self.registry.resolve(name)
            except UnknownModel as exc:
                raise UnknownModel(f"{where}[{j}]: {entry!r}: {exc}") from exc
            stage_index = self._last_by_model.get(ref_spec.id)
            if stage_index is None:
                stage_index = self._insert(ref_spec, plain, f"{where}[{j}]")
            ref = self._make_ref(entry, match, stage_index, f"{where}[{j}]")
            refs.append(ref)
            if stage_index not in upstream:
                upstream.append(stage_index)
        if not upstream and self._last_user_stage is not None:
            # The reference's cascade: a later model without references is fed by the one before.
            upstream = [self._last_user_stage]
        stage = self._make_stage(spec, refs, inserted=False, user_index=i, upstream=upstream)
        self._check_inputs(stage, where)
        self._append(stage)
        self._last_user_stage = stage.index

    def _insert(self, spec: ModelSpec, plain: list[str], where: str) -> int:
        files = self.files(spec)
        needed = files.channels or 1
        if len(plain) < needed:
            raise InvalidRequest(
                f"{where}: model {spec.id!r} must run first and needs {needed} series, but the "
                f"stage lists only {len(plain)} series besides references"
            )
        inputs = [InputRef(raw=p, path=p) for p in plain[:needed]]
        stage = self._make_stage(spec, inputs, inserted=True, user_index=None, upstream=[])
        self._check_inputs(stage, where)
        self._append(stage)
        return stage.index

    def _append(self, stage: Stage) -> None:
        stage.index = len(self.stages)
        self.stages.append(stage)
        self._last_by_model[stage.model.id] = stage.index

    def _make_ref(self, entry: str, match: re.Match[str], stage_index: int, where: str) -> InputRef:
        ref_stage = self.stages[stage_index]
        if match.group("label") is not None:
            label = int(match.group("label"))
            if label not in ref_stage.labels.values() or label == 0:
                raise InvalidRequest(
                    f"{where}: {entry!r}: model {ref_stage.model.id!r} has no foreground label "
                    f"{label} (labels: {_foreground(ref_stage.labels)})"
                )
            return InputRef(raw=entry, stage=stage_index, label=label)
        if match.group("channel") is not None:
            channel = int(match.group("channel"))
            n_classes = len(ref_stage.labels)
            if not 0 <= channel < n_classes:
                raise InvalidRequest(
                    f"{where}: {entry!r}: model {ref_stage.model.id!r} has probability channels "
                    f"0..{n_classes - 1}"
                )
            return InputRef(raw=entry, stage=stage_index, channel=channel)
        return InputRef(raw=entry, stage=stage_index)

    def _option(self, name: str, spec: ModelSpec, user_index: int | None) -> Any:
        values, broadcast = self.per_stage[name]
        value = values[user_index] if user_index is not None else broadcast
        if value is _UNSET and name in spec.default_args:
            value = spec.default_args[name]
        if value is _UNSET:
            value = InferenceRequest.model_fields[name].get_default(call_default_factory=True)
        return value

    def _make_stage(
        self,
        spec: ModelSpec,
        inputs: list[InputRef],
        *,
        inserted: bool,
        user_index: int | None,
        upstream: list[int],
    ) -> Stage:
        files = self.files(spec)
        label = f"model {spec.id!r}"

        def opt(name: str) -> Any:
            return self._option(name, spec, user_index)

        class_idx = opt("class_idx")
        if isinstance(class_idx, int):
            class_idx = [class_idx]
        if class_idx is not None:
            fg = _foreground(files.labels)
            bad = [c for c in class_idx if c not in fg]
            if bad or not class_idx:
                raise InvalidRequest(
                    f"class_idx: {label} has no foreground class {bad or class_idx} "
                    f"(foreground labels: {fg})"
                )
            class_idx = sorted(set(class_idx))
        checkpoint = opt("checkpoint_name")
        if not isinstance(checkpoint, str) or not _CHECKPOINT.match(checkpoint):
            raise InvalidRequest(f"checkpoint_name: {checkpoint!r} is not a checkpoint file name")
        if checkpoint not in files.checkpoints:
            raise InvalidRequest(
                f"checkpoint_name: {label} has no {checkpoint!r} (found: {files.checkpoints})"
            )
        folds_raw = opt("use_folds")
        if isinstance(folds_raw, int | str):
            folds_raw = [folds_raw]
        folds: list[int | str] = []
        for f in folds_raw:
            fold: int | str = f
            if isinstance(f, str) and f.strip().isdigit():
                fold = int(f)
            elif isinstance(f, str) and f != "all":
                raise InvalidRequest(f"use_folds: {f!r} is not a fold number or 'all'")
            if str(fold) not in files.folds:
                raise InvalidRequest(
                    f"use_folds: {label} has no fold {fold!r} with a checkpoint "
                    f"(found: {files.folds})"
                )
            if not (spec.folder / f"fold_{fold}" / checkpoint).is_file():
                raise InvalidRequest(f"use_folds: {label} fold {fold!r} has no {checkpoint!r}")
            if fold not in folds:
                folds.append(fold)
        if not folds:
            raise InvalidRequest(f"use_folds: {label} needs at least one fold")
        threshold = _fraction(opt("proba_threshold"), "proba_threshold", label)
        confidence = _fraction(opt("min_confidence"), "min_confidence", label)
        min_inter = _fraction(opt("min_intersection"), "min_intersection", label)
        smaller = _fraction(
            opt("remove_objects_smaller_than"), "remove_objects_smaller_than", label
        )
        padding = opt("crop_padding")
        padding = (0, 0, 0) if padding is None else tuple(int(p) for p in padding)
        if len(padding) != 3 or any(p < 0 for p in padding):
            raise InvalidRequest(f"crop_padding: {label}: three whole numbers >= 0")
        mode = opt("cascade_mode")
        if mode not in ("intersect", "crop"):
            raise InvalidRequest(f"cascade_mode: {mode!r} is not 'intersect' or 'crop'")
        tta = opt("tta")
        if not isinstance(tta, bool):
            raise InvalidRequest(f"tta: {label}: must be true or false")
        for name in ("crop_from", "intersect_with"):
            value = opt(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidRequest(f"{name}: {label}: must be a path")
        return Stage(
            index=-1,
            model=spec,
            inputs=inputs,
            inserted=inserted,
            upstream=list(upstream),
            class_idx=class_idx,
            checkpoint_name=checkpoint,
            tta=tta,
            use_folds=tuple(folds),
            proba_threshold=threshold,
            min_confidence=confidence,
            intersect_with=opt("intersect_with"),
            min_intersection=0.0 if min_inter is None else min_inter,
            crop_from=opt("crop_from"),
            crop_padding=(padding[0], padding[1], padding[2]),
            cascade_mode=mode,
            remove_objects_smaller_than=smaller,
            labels=dict(files.labels),
            channels=files.channels or 1,
        )

    def _check_inputs(self, stage: Stage, where: str) -> None:
        if len(stage.inputs) != stage.channels:
            raise InvalidRequest(
                f"{where}: model {stage.model.id!r} takes {stage.channels} input(s) "
                f"({', '.join(self.files(stage.model).channel_names)}), got {len(stage.inputs)}"
            )
        if stage.inputs[0].path is None:
            raise InvalidRequest(
                f"{where}: the first input of model {stage.model.id!r} must be a series, not a "
                "reference: it sets the stage's grid"
            )


def _foreground(labels: dict[str, int]) -> list[int]:
    return sorted(v for v in labels.values() if v != 0)


def _fraction(value: Any, name: str, label: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name}: {label}: must be a number between 0 and 1")
    if not 0.0 <= float(value) <= 1.0:
        raise InvalidRequest(f"{name}: {label}: {value} is not between 0 and 1")
    return float(value)
