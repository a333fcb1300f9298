"""The registry of the models that the model-serve spec names.

``core.spec`` validates the file (:class:`~nnunet_node.core.spec.ModelEntry`); this module turns
each model entry into a :class:`ModelSpec`: its folder resolved (``rel_path`` under
``model_folder``, itself relative to the spec file's folder; a TotalSegmentator task under the
weights folder) and its ``default_args`` checked against the request model. A model whose files
are absent is still registered and fails with :class:`ModelUnavailable` when it is used, so one
missing download does not stop the node.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nnunet_node.core.errors import (
    ConfigError,
    ModelUnavailable,
    UnknownModel,
    describe_validation_error,
)
from nnunet_node.core.spec import DEFAULT_MIN_MEM_MIB, MetadataEntry, ModelEntry, SpecFile

LOGGER = logging.getLogger(__name__)

# TotalSegmentator v2 tasks served by one nnU-Net dataset: task -> dataset id. Tasks made of several
# datasets (``total``) are not single nnU-Net models; serve their parts by ``rel_path`` instead.
TOTALSEG_DATASETS: dict[str, int] = {
    "total_fast": 297,
    "total_fastest": 298,
    "total_mr_fast": 852,
    "lung_vessels": 258,
    "body": 299,
    "body_fast": 300,
    "cerebral_bleed": 150,
    "hip_implant": 260,
    "pleural_pericard_effusion": 315,
    "heartchambers_highres": 301,
    "appendicular_bones": 304,
    "tissue_types": 481,
    "vertebrae_body": 302,
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the spec, as validated at load. ``folder`` holds ``dataset.json`` and
    ``fold_*``; ``min_mem`` is MiB of free GPU memory; ``metadata`` is the entry that
    ``export.metadata`` parses into segment descriptions."""

    id: str
    name: str
    aliases: tuple[str, ...]
    rel_path: str | None
    folder: Path
    min_mem: int = DEFAULT_MIN_MEM_MIB
    default_args: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    metadata: MetadataEntry | None = field(default=None, hash=False, compare=False)
    totalseg_task: str | None = None
    queue: str | None = None
    """The job queue of this model's group (workers on the hosts that hold it listen on it)."""

    @property
    def keys(self) -> tuple[str, ...]:
        """Every string that resolves to this model."""
        return (self.id, self.name, *self.aliases)


@dataclass(frozen=True)
class ModelFiles:
    """What the model folder holds on disk right now."""

    channels: int | None
    channel_names: list[str]
    labels: dict[str, int]
    folds: list[str]
    checkpoints: list[str]
    file_ending: str | None
    error: str | None

    @property
    def available(self) -> bool:
        return self.error is None


def inspect_model_folder(folder: Path, model_id: str) -> ModelFiles:
    """Read ``dataset.json`` and list ``fold_*`` folders with their checkpoints; never raises."""
    dataset_json = folder / "dataset.json"
    if not folder.is_dir():
        return ModelFiles(
            None, [], {}, [], [], None, f"model {model_id!r}: folder {folder} is absent"
        )
    try:
        dataset = json.loads(dataset_json.read_text())
        channel_map = dataset.get("channel_names") or dataset.get("modality") or {}
        channel_names = [str(channel_map[k]) for k in sorted(channel_map, key=lambda k: int(k))]
        labels = {str(k): _label_value(v) for k, v in dataset["labels"].items()}
    except FileNotFoundError:
        return ModelFiles(
            None, [], {}, [], [], None, f"model {model_id!r}: {dataset_json} is absent"
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return ModelFiles(
            None, [], {}, [], [], None, f"model {model_id!r}: unreadable {dataset_json}: {exc}"
        )
    folds: list[str] = []
    checkpoints: set[str] = set()
    for sub in sorted(folder.glob("fold_*")):
        found = sorted(p.name for p in sub.glob("*.pth") if p.is_file())
        if found:
            folds.append(sub.name.removeprefix("fold_"))
            checkpoints.update(found)
    error = None
    if not (folder / "plans.json").is_file():
        error = f"model {model_id!r}: {folder / 'plans.json'} is absent"
    elif not folds:
        error = f"model {model_id!r}: no fold_*/<checkpoint>.pth under {folder}"
    folds.sort(key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    return ModelFiles(
        channels=len(channel_names),
        channel_names=channel_names,
        labels=labels,
        folds=folds,
        checkpoints=sorted(checkpoints),
        file_ending=dataset.get("file_ending"),
        error=error,
    )


def _label_value(value: Any) -> int:
    # Region-based models list several labels per region; the region's id is the last one.
    if isinstance(value, list | tuple):
        return int(value[-1])
    return int(value)


class ModelRegistry:
    """The models of the spec, found by id, name or alias (all three resolve to the same model)."""

    def __init__(self, models: list[ModelSpec], model_folder: Path) -> None:
        self._models = list(models)
        self.model_folder = model_folder
        self._by_key: dict[str, ModelSpec] = {}
        for spec in self._models:
            for key in spec.keys:
                other = self._by_key.get(key)
                if other is not None and other.id != spec.id:
                    raise ConfigError(
                        f"model {spec.id!r}: {key!r} already names model {other.id!r}"
                    )
                self._by_key[key] = spec

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def from_spec(
        cls, spec: SpecFile, base_dir: Path, totalseg_weights_path: Path | None = None
    ) -> ModelRegistry:
        """The models of a validated spec file whose folder is ``base_dir``.

        Raises :class:`ConfigError` naming the model and key (``model_folder`` absent, an
        unknown TotalSegmentator task, ``default_args`` that no request could carry, a name
        used by two models)."""
        if spec.model_folder is None:
            raise ConfigError("model-serve spec: model_folder must be a non-empty string")
        model_folder = Path(spec.model_folder).expanduser()
        if not model_folder.is_absolute():
            model_folder = base_dir / model_folder
        model_folder = model_folder.resolve()
        totalseg_root = (
            Path(totalseg_weights_path).expanduser().resolve()
            if totalseg_weights_path
            else model_folder / "totalseg"
        )
        models = [_model_spec(entry, model_folder, totalseg_root) for entry in spec.models]
        return cls(models, model_folder)

    @classmethod
    def from_yaml(cls, path: Path, totalseg_weights_path: Path | None = None) -> ModelRegistry:
        """Read the spec file at ``path`` (:meth:`SpecFile.read`) and build the registry."""
        return cls.from_spec(
            SpecFile.read(path), Path(path).resolve().parent, totalseg_weights_path
        )

    @classmethod
    def from_dict(
        cls, raw: Any, base_dir: Path, totalseg_weights_path: Path | None = None
    ) -> ModelRegistry:
        """Validate a parsed spec document (:meth:`SpecFile.parse`) and build the registry."""
        return cls.from_spec(SpecFile.parse(raw), base_dir, totalseg_weights_path)

    # --- lookup ---------------------------------------------------------------------------
    @property
    def models(self) -> list[ModelSpec]:
        return list(self._models)

    def resolve(self, name_or_alias: str) -> ModelSpec:
        """The model that ``name_or_alias`` names (id, name or alias)."""
        if not isinstance(name_or_alias, str):
            raise UnknownModel(f"model names are strings, got {name_or_alias!r}")
        spec = self._by_key.get(name_or_alias)
        if spec is None:
            known = ", ".join(sorted(s.id for s in self._models)) or "none"
            raise UnknownModel(f"unknown model {name_or_alias!r} (known models: {known})")
        return spec

    def files(self, spec: ModelSpec) -> ModelFiles:
        """What is on disk for ``spec`` now (read at each call: models can be added while
        running)."""
        files = inspect_model_folder(spec.folder, spec.id)
        if files.error and spec.totalseg_task:
            return ModelFiles(
                files.channels,
                files.channel_names,
                files.labels,
                files.folds,
                files.checkpoints,
                files.file_ending,
                f"{files.error} (TotalSegmentator task {spec.totalseg_task!r}: put its weights "
                f"under TOTALSEG_WEIGHTS_PATH; nothing is downloaded)",
            )
        return files

    def require(self, spec: ModelSpec) -> ModelFiles:
        """Like :meth:`files`, raising :class:`ModelUnavailable` when the model cannot run."""
        files = self.files(spec)
        if files.error:
            raise ModelUnavailable(files.error)
        return files

    def info(self) -> dict[str, Any]:
        """What ``GET /model_info`` serves: each model by id with what its folder holds."""
        out: dict[str, Any] = {}
        for spec in self._models:
            files = self.files(spec)
            out[spec.id] = {
                "id": spec.id,
                "name": spec.name,
                "aliases": list(spec.aliases),
                "folder": str(spec.folder),
                "rel_path": spec.rel_path,
                "totalseg_task": spec.totalseg_task,
                "channels": files.channels,
                "channel_names": files.channel_names,
                "labels": files.labels,
                "folds": files.folds,
                "checkpoints": files.checkpoints,
                "min_mem": spec.min_mem,
                "default_args": spec.default_args,
                "has_metadata": spec.metadata is not None,
                "available": files.available,
                "error": files.error,
            }
        return out


def _model_spec(entry: ModelEntry, model_folder: Path, totalseg_root: Path) -> ModelSpec:
    where = f"model {entry.id!r}"
    _check_default_args(entry.default_args, where)
    name = entry.name or entry.id
    task = entry.totalseg_task
    if task is not None:
        if entry.rel_path is None:
            dataset_id = TOTALSEG_DATASETS.get(task)
            if dataset_id is None:
                raise ConfigError(
                    f"model-serve spec: {where}: totalseg_task {task!r} is not a single-model task "
                    f"this node knows ({', '.join(sorted(TOTALSEG_DATASETS))}); give rel_path "
                    "(relative to the TotalSegmentator weights folder) instead"
                )
            folder = _find_totalseg_folder(totalseg_root, dataset_id)
        else:
            folder = _resolve_rel(entry.rel_path, totalseg_root)
        if entry.name is None:
            name = f"TotalSegmentator {task}"
    else:
        assert entry.rel_path is not None  # ModelEntry requires one or the other
        folder = _resolve_rel(entry.rel_path, model_folder)
    return ModelSpec(
        id=entry.id,
        name=name,
        aliases=tuple(entry.aliases),
        rel_path=entry.rel_path,
        folder=folder,
        min_mem=entry.min_mem,
        default_args=dict(entry.default_args),
        metadata=entry.metadata,
        totalseg_task=task,
        queue=entry.queue,
    )


def _resolve_rel(rel_path: str, root: Path) -> Path:
    path = Path(rel_path).expanduser()
    return (path if path.is_absolute() else root / path).resolve()


def _find_totalseg_folder(root: Path, dataset_id: int) -> Path:
    """``<weights>/Dataset<id>_*/<trainer>__<plans>__<config>``; a placeholder path when absent."""
    for dataset in sorted(root.glob(f"Dataset{dataset_id:03d}_*")):
        candidates = sorted(p for p in dataset.iterdir() if p.is_dir() and "__" in p.name)
        if candidates:
            return candidates[0]
    return root / f"Dataset{dataset_id:03d}"


def _check_default_args(default_args: dict[str, Any], where: str) -> None:
    """Every key a request field, every value one a request accepts (``core.spec`` has already
    refused the fields that describe one request)."""
    from nnunet_node.inference.request import (
        InferenceRequest,  # the request module imports this one
    )

    unknown = sorted(set(default_args) - set(InferenceRequest.model_fields))
    if unknown:
        raise ConfigError(
            f"model-serve spec: {where}: default_args has unknown request field(s) "
            f"{', '.join(unknown)}"
        )
    try:
        InferenceRequest.model_validate({"nnunet_id": "x", **default_args})
    except ValidationError as exc:
        raise ConfigError(
            f"model-serve spec: {where}: default_args: {describe_validation_error(exc)}"
        ) from exc
