"""The node's spec: ``model-serve-spec.yaml`` read once at start-up and turned into working parts.

``core.spec`` validates the whole file (:class:`~nnunet_node.core.spec.SpecFile`); each layer
turns its part into the objects that travel on: the model registry (``inference.spec``), each
model's segment descriptions (``export.metadata``) and the routing table with its destinations
(``pipeline.routing``). Everything is checked here, so a bad spec (a segment that names no SNOMED
CT concept, a rule naming an unknown model) stops the node with a message naming the model, the
segment or the rule, instead of failing the first job that reaches it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_node.core.errors import InvalidRequest
from nnunet_node.core.settings import Settings
from nnunet_node.core.spec import PeerEntry, SpecFile
from nnunet_node.export.metadata import SegmentationMetadata, parse_metadata
from nnunet_node.inference.spec import ModelRegistry, ModelSpec
from nnunet_node.pipeline.routing import RoutingTable

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSpec:
    """What ``model-serve-spec.yaml`` says, validated and resolved."""

    registry: ModelRegistry
    metadata: dict[str, SegmentationMetadata] = field(default_factory=dict)
    """Parsed ``metadata`` per canonical model id (models without metadata are absent)."""
    routing: RoutingTable = field(default_factory=RoutingTable)
    """The routing rules and destinations, their models checked against the registry."""
    peers: tuple[PeerEntry, ...] = ()
    """The declared DICOM peers (``peers:``), as validated."""
    file: SpecFile | None = None
    """The validated document itself."""
    path: Path | None = None

    @classmethod
    def load(cls, settings: Settings, *, quiet: bool = False) -> NodeSpec:
        """Read ``settings.model_serve_spec``; :class:`ConfigError` names what is wrong.
        ``quiet``: without the summary lines (:meth:`from_file`)."""
        path = Path(settings.model_serve_spec)
        return cls.from_file(
            SpecFile.read(path),
            base_dir=path.resolve().parent,
            totalseg_weights_path=settings.totalseg_weights_path,
            path=path,
            quiet=quiet,
        )

    @classmethod
    def from_file(
        cls,
        spec: SpecFile,
        *,
        base_dir: Path,
        totalseg_weights_path: Path | None = None,
        path: Path | None = None,
        quiet: bool = False,
    ) -> NodeSpec:
        """Resolve a validated spec whose folder is ``base_dir`` (template and model paths are
        relative to it); raises :class:`ConfigError` naming the model, segment or rule.

        What it holds is logged in two lines (the routing table, the models and their DICOM
        metadata) unless ``quiet``: for a process that loads the spec its node's process has
        just loaded and logged (a receiver, node/receivers.py). Warnings about the spec's
        content and errors are logged either way."""
        registry = ModelRegistry.from_spec(spec, base_dir, totalseg_weights_path)
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
        routing = RoutingTable.from_spec(spec, quiet=quiet)
        routing.check_models(registry.resolve)
        if not quiet:
            LOGGER.info(
                "spec %s: %d model(s), DICOM metadata for %s",
                path or base_dir,
                len(registry.models),
                sorted(metadata) or "none",
            )
        return cls(
            registry=registry,
            metadata=metadata,
            routing=routing,
            peers=tuple(spec.peers),
            file=spec,
            path=path,
        )

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
