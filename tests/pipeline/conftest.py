"""Fixtures for the job tests: a migrated SQLite database, settings in a temporary data folder, a
spec with a stand-in model folder (for queue mechanics) or the committed demo models (end to end).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nnunet_node.core.settings import Settings
from tests.support.database import copy_database

REPO = Path(__file__).resolve().parents[2]

TOY_METADATA: dict[str, Any] = {
    "algorithm_name": "toy",
    "algorithm_version": "1",
    "manufacturer": "tests",
    "series_description": "Toy segmentation",
    "segment_names": [
        {
            "name": "Toy thing",
            "label": "Thing",
            "number": 1,
            "code": "THING",
            "scheme": "99TEST",
            "category": "260787004",
        }
    ],
}


def make_toy_model(folder: Path, channels: int = 1) -> Path:
    """A model folder with the files the registry looks for (no usable weights): enough for
    request validation; jobs on it run through a stand-in engine."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {str(i): f"CT{i}" for i in range(channels)},
                "labels": {"background": 0, "thing": 1},
                "file_ending": ".nii.gz",
            }
        )
    )
    (folder / "plans.json").write_text("{}")
    (folder / "fold_0").mkdir(exist_ok=True)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    return folder


def _settings(tmp_path: Path, template: Path, spec: Path, **values: Any) -> Settings:
    """Settings of a node in ``tmp_path/data`` (a copy of the migrated ``template`` as its
    database) on ``spec``; requests may name paths under ``tmp_path/studies`` and the data
    folder."""
    data = tmp_path / "data"
    copy_database(template, data / "nnunet-node.db")
    (tmp_path / "studies").mkdir()
    return Settings(
        data_dir=data,
        model_serve_spec=spec,
        allowed_roots=[tmp_path / "studies", data],
        min_free_disk_mb=0,
        **values,
    )


@pytest.fixture
def toy_settings(tmp_path: Path, migrated_template: Path) -> Settings:
    """Settings of a node in ``tmp_path/data`` whose spec holds the stand-in model ``toy``;
    requests may name paths under ``tmp_path/studies`` and the data folder."""
    models = tmp_path / "models"
    make_toy_model(models / "toy")
    spec = {
        "model_folder": str(models),
        "models": [
            {
                "id": "toy",
                "name": "Toy model",
                "aliases": ["toy_alias"],
                "rel_path": "toy",
                "default_args": {"tta": False},
                "metadata": TOY_METADATA,
            }
        ],
        "routes": [],
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return _settings(tmp_path, migrated_template, spec_path, workers=2)


@pytest.fixture
def demo_settings(tmp_path: Path, migrated_template: Path) -> Iterator[Settings]:
    """Settings of a node on the committed demo models (``model-serve-spec.yaml``)."""
    spec = REPO / "model-serve-spec.yaml"
    if not (REPO / "models").is_dir():
        pytest.skip("the demo models are not built (make demo-model)")
    yield _settings(tmp_path, migrated_template, spec, workers=1, device="cpu")


@pytest.fixture
def toy_model() -> Any:
    """The function that writes a stand-in model folder (``make_toy_model``)."""
    return make_toy_model


@pytest.fixture
def toy_metadata() -> dict[str, Any]:
    return json.loads(json.dumps(TOY_METADATA))
