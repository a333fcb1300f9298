"""NodeSpec: the registry, each model's metadata parsed at load, routing and peers, all typed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nnunet_node.core.errors import ConfigError, InvalidRequest
from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.spec import NodeSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def write_spec(tmp_path: Path, toy_model: Any):
    def write(models: list[dict[str, Any]], **extra: Any) -> Settings:
        toy_model(tmp_path / "models" / "toy")
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({"model_folder": "models", "models": models, **extra}))
        return Settings(data_dir=tmp_path / "data", model_serve_spec=path)

    return write


def test_repository_spec_loads_with_metadata_and_routes() -> None:
    spec = NodeSpec.load(Settings(model_serve_spec=REPO / "model-serve-spec.yaml"))
    assert {m.id for m in spec.registry.models} >= {"phantom", "phantom_cube"}
    meta = spec.metadata_for("demo")  # an alias of `phantom`
    assert meta.model_id == "phantom"
    assert sorted(meta.segments) == [1, 2]
    assert meta.segment(2).label == "Cube"
    assert spec.file is not None and [m.id for m in spec.file.models][:2] == [
        "phantom",
        "phantom_cube",
    ]
    route = spec.routing.route("phantom-ct")
    assert route is not None and route.destinations == ("PACS",)
    assert spec.routing.destinations["PACS"].port == 11113


def test_metadata_is_parsed_per_model_and_the_rest_is_kept(
    write_spec: Any, toy_metadata: Any
) -> None:
    settings = write_spec(
        [
            {"id": "toy", "rel_path": "toy", "metadata": toy_metadata},
            {"id": "plain", "rel_path": "toy"},
        ],
        routes=[{"name": "r", "match": {"Modality": "CT"}, "nnunet_id": "toy"}],
        destinations={"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
    )
    spec = NodeSpec.load(settings)
    assert set(spec.metadata) == {"toy"}
    assert spec.metadata["toy"].segment(1).label == "Thing"
    assert [r.name for r in spec.routing.routes] == ["r"]
    assert spec.routing.route("r").request() == {"nnunet_id": "toy", "is_dicom": True}  # type: ignore[union-attr]
    assert spec.routing.destinations["PACS"].port == 104
    with pytest.raises(InvalidRequest, match="plain"):
        spec.metadata_for("plain")


def test_bad_metadata_stops_the_load_naming_model_and_segment(
    write_spec: Any, toy_metadata: Any
) -> None:
    bad = {
        **toy_metadata,
        "segment_names": [
            {"name": "Thing", "label": "Thing", "code": "X", "scheme": "99T", "colour": "purple"}
        ],
    }
    settings = write_spec([{"id": "toy", "rel_path": "toy", "metadata": bad}])
    with pytest.raises(ConfigError, match=r"model 'toy'.*segment 1"):
        NodeSpec.load(settings)


def test_metadata_must_cover_every_label_of_the_model(write_spec: Any, toy_metadata: Any) -> None:
    meta = {**toy_metadata, "segment_names": [{**toy_metadata["segment_names"][0], "number": 2}]}
    settings = write_spec([{"id": "toy", "rel_path": "toy", "metadata": meta}])
    with pytest.raises(ConfigError, match=r"model 'toy'.*\[1\]"):
        NodeSpec.load(settings)


def test_missing_or_broken_spec_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        NodeSpec.load(Settings(model_serve_spec=tmp_path / "absent.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        NodeSpec.load(Settings(model_serve_spec=broken))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        NodeSpec.load(Settings(model_serve_spec=listy))
