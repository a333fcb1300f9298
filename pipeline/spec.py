"""The node's spec: the model registry, each model's parsed DICOM metadata, and the raw YAML.

One file (``MODEL_SERVE_SPEC``) describes models (``inference.spec``), routes and destinations
(``pipeline.routing``). Everything a job needs is parsed here once, at start-up, so bad segment
metadata stops the node with a message naming the model and the segment instead of failing the
first DICOM job that reaches it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nnunet_node.core.errors import ConfigError, InvalidRequest
from nnunet_node.core.settings import Settings
from nnunet_node.export.metadata import SegmentationMetadata, parse_metadata
from nnunet_node.inference.spec import ModelRegistry, ModelSpec

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSpec:
    """What ``model-serve-spec.yaml`` says, validated."""

    registry: ModelRegistry
    metadata: dict[str, SegmentationMetadata] = field(default_factory=dict)
    """Parsed ``metadata`` per canonical model id (models without metadata are absent)."""
    raw: dict[str, Any] = field(default_factory=dict)
    """The whole YAML document (``routes`` and ``destinations`` are read by pipeline.routing)."""
    path: Path | None = None

    @classmethod
    def load(cls, settings: Settings) -> NodeSpec:
        """Read ``settings.model_serve_spec``; :class:`ConfigError` names what is wrong."""
        path = Path(settings.model_serve_spec)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"model-serve spec {path} does not exist") from exc
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"model-serve spec {path} cannot be read: {exc}") from exc
        return cls.from_dict(
            raw,
            base_dir=path.resolve().parent,
            totalseg_weights_path=settings.totalseg_weights_path,
            path=path,
        )

    @classmethod
    def from_dict(
        cls,
        raw: Any,
        *,
        base_dir: Path,
        totalseg_weights_path: Path | None = None,
        path: Path | None = None,
    ) -> NodeSpec:
        if not isinstance(raw, dict):
            raise ConfigError("model-serve spec: the top level must be a mapping")
        registry = ModelRegistry.from_dict(
            raw, base_dir=base_dir, totalseg_weights_path=totalseg_weights_path
        )
        metadata: dict[str, SegmentationMetadata] = {}
        for model in registry.models:
            if model.metadata is None:
                continue
            metadata[model.id] = parse_metadata(
                model.metadata,
                base_dir=base_dir,
                model_id=model.id,
                labels=_model_labels(registry, model),
            )
        LOGGER.info(
            "spec %s: %d model(s), DICOM metadata for %s",
            path or base_dir,
            len(registry.models),
            sorted(metadata) or "none",
        )
        return cls(registry=registry, metadata=metadata, raw=raw, path=path)

    def metadata_for(self, model_id: str) -> SegmentationMetadata:
        """The parsed metadata of a model, or :class:`InvalidRequest` (DICOM outputs need it)."""
        model = self.registry.resolve(model_id)
        try:
            return self.metadata[model.id]
        except KeyError:
            raise InvalidRequest(
                f"is_dicom: model {model.id!r} has no metadata in the model-serve spec, so no "
                "DICOM-SEG or RTSTRUCT can be written for it"
            ) from None


def _model_labels(registry: ModelRegistry, model: ModelSpec) -> list[int] | None:
    """The model's label values when its files are there (checked against the metadata)."""
    files = registry.files(model)
    if files.error or not files.labels:
        return None
    return sorted(set(files.labels.values()))
