"""The model-serve spec (``model-serve-spec.yaml``) and the registry of models it names.

The file keeps the reference server's format: ``model_folder`` (relative to the spec file's folder
when
relative) and a list of ``models``, each with ``id``, ``name``, ``aliases``, ``rel_path``,
``min_mem``,
``default_args`` and ``metadata``; TotalSegmentator entries name a ``totalseg_task`` instead of a
``rel_path``. Other top-level keys (``routes``, ``destinations``) belong to other parts and are left
alone. Everything is validated at load; a model whose files are absent is still registered and fails
with :class:`ModelUnavailable` when it is used, so one missing download does not stop the node.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nnunet_node.core.errors import ConfigError, ModelUnavailable, UnknownModel

LOGGER = logging.getLogger(__name__)

DEFAULT_MIN_MEM_MIB = 4000
_MODEL_KEYS = {
    "id",
    "name",
    "aliases",
    "rel_path",
    "min_mem",
    "default_args",
    "metadata",
    "totalseg_task",
}
# Request fields that describe one request, not a model's defaults.
_NOT_DEFAULTABLE = {"nnunet_id", "study_path", "output_dir", "series_folders"}

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
    ``fold_*``."""

    id: str
    name: str
    aliases: tuple[str, ...]
    rel_path: str | None
    folder: Path
    min_mem: int = DEFAULT_MIN_MEM_MIB
    default_args: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    metadata: dict[str, Any] | str | None = field(default=None, hash=False, compare=False)
    totalseg_task: str | None = None

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
    def from_yaml(cls, path: Path, totalseg_weights_path: Path | None = None) -> ModelRegistry:
        """Load and validate the spec file; raise :class:`ConfigError` naming the model and key."""
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"model-serve spec {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"model-serve spec {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(
            raw, base_dir=Path(path).resolve().parent, totalseg_weights_path=totalseg_weights_path
        )

    @classmethod
    def from_dict(
        cls, raw: Any, base_dir: Path, totalseg_weights_path: Path | None = None
    ) -> ModelRegistry:
        if not isinstance(raw, dict):
            raise ConfigError("model-serve spec: the top level must be a mapping")
        folder_raw = raw.get("model_folder")
        if not isinstance(folder_raw, str) or not folder_raw.strip():
            raise ConfigError("model-serve spec: model_folder must be a non-empty string")
        model_folder = Path(folder_raw).expanduser()
        if not model_folder.is_absolute():
            model_folder = base_dir / model_folder
        model_folder = model_folder.resolve()
        totalseg_root = (
            Path(totalseg_weights_path).expanduser().resolve()
            if totalseg_weights_path
            else model_folder / "totalseg"
        )
        entries = raw.get("models", [])
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise ConfigError("model-serve spec: models must be a list")
        models = [
            _parse_model(entry, i, model_folder, totalseg_root) for i, entry in enumerate(entries)
        ]
        return cls(models, model_folder)

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


def _parse_model(entry: Any, index: int, model_folder: Path, totalseg_root: Path) -> ModelSpec:
    where = f"models[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"model-serve spec: {where} must be a mapping")
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise ConfigError(f"model-serve spec: {where}: id must be a non-empty string")
    where = f"model {model_id!r}"
    unknown = sorted(set(entry) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(
            f"model-serve spec: {where}: unknown key(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(_MODEL_KEYS))})"
        )
    name = entry.get("name", model_id)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model-serve spec: {where}: name must be a non-empty string")
    aliases_raw = entry.get("aliases") or []
    if isinstance(aliases_raw, str):
        aliases_raw = [aliases_raw]
    if not isinstance(aliases_raw, list) or not all(
        isinstance(a, str) and a.strip() for a in aliases_raw
    ):
        raise ConfigError(f"model-serve spec: {where}: aliases must be a list of strings")
    min_mem = entry.get("min_mem", DEFAULT_MIN_MEM_MIB)
    if isinstance(min_mem, bool) or not isinstance(min_mem, int) or min_mem < 0:
        raise ConfigError(f"model-serve spec: {where}: min_mem must be a whole number of MiB >= 0")
    default_args = entry.get("default_args") or {}
    if not isinstance(default_args, dict):
        raise ConfigError(f"model-serve spec: {where}: default_args must be a mapping")
    _check_default_args(default_args, where)
    metadata = entry.get("metadata")
    if metadata is not None and not isinstance(metadata, dict | str):
        raise ConfigError(f"model-serve spec: {where}: metadata must be a mapping or a path")

    task = entry.get("totalseg_task")
    rel_path = entry.get("rel_path")
    if task is not None:
        if not isinstance(task, str) or not task.strip():
            raise ConfigError(f"model-serve spec: {where}: totalseg_task must be a string")
        if rel_path is None:
            dataset_id = TOTALSEG_DATASETS.get(task)
            if dataset_id is None:
                raise ConfigError(
                    f"model-serve spec: {where}: totalseg_task {task!r} is not a single-model task "
                    f"this node knows ({', '.join(sorted(TOTALSEG_DATASETS))}); give rel_path "
                    "(relative to the TotalSegmentator weights folder) instead"
                )
            folder = _find_totalseg_folder(totalseg_root, dataset_id)
        else:
            folder = _resolve_rel(rel_path, totalseg_root, where)
        if name == model_id and "name" not in entry:
            name = f"TotalSegmentator {task}"
    else:
        if not isinstance(rel_path, str) or not rel_path.strip():
            raise ConfigError(f"model-serve spec: {where}: rel_path must be a non-empty string")
        folder = _resolve_rel(rel_path, model_folder, where)
    return ModelSpec(
        id=model_id,
        name=name,
        aliases=tuple(aliases_raw),
        rel_path=rel_path,
        folder=folder,
        min_mem=min_mem,
        default_args=dict(default_args),
        metadata=metadata,
        totalseg_task=task,
    )


def _resolve_rel(rel_path: Any, root: Path, where: str) -> Path:
    if not isinstance(rel_path, str) or not rel_path.strip():
        raise ConfigError(f"model-serve spec: {where}: rel_path must be a non-empty string")
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
    from nnunet_node.inference.request import (
        InferenceRequest,  # the request module imports this one
    )

    bad = sorted(set(default_args) & _NOT_DEFAULTABLE)
    if bad:
        raise ConfigError(
            f"model-serve spec: {where}: default_args cannot set {', '.join(bad)} "
            "(per request only)"
        )
    known = set(InferenceRequest.model_fields)
    unknown = sorted(set(default_args) - known)
    if unknown:
        raise ConfigError(
            f"model-serve spec: {where}: default_args has unknown request field(s) "
            f"{', '.join(unknown)}"
        )
    try:
        InferenceRequest.model_validate({"nnunet_id": "x", **default_args})
    except ValueError as exc:
        raise ConfigError(f"model-serve spec: {where}: default_args: {_first_error(exc)}") from exc


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            loc = ".".join(str(p) for p in errs[0].get("loc", ()))
            return f"{loc}: {errs[0].get('msg')}"
    return str(exc)
