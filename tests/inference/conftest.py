"""Fixtures for the inference tests: fake model folders (for spec and request checks, no weights
needed) and the committed demo models (for the engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from nnunet_node.inference.spec import ModelRegistry

REPO = Path(__file__).resolve().parents[2]


def make_model_folder(
    folder: Path,
    *,
    channels: int = 1,
    labels: dict[str, int] | None = None,
    folds: tuple[str, ...] = ("0",),
    checkpoints: tuple[str, ...] = ("checkpoint_final.pth",),
) -> Path:
    """A model folder with dataset.json, plans.json and empty checkpoint files: enough for the
    registry and the request checks, not for prediction."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = {
        "channel_names": {str(i): f"ch{i}" for i in range(channels)},
        "labels": labels or {"background": 0, "sphere": 1, "cube": 2},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset))
    (folder / "plans.json").write_text("{}")
    for fold in folds:
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        for ckpt in checkpoints:
            (folder / f"fold_{fold}" / ckpt).write_bytes(b"")
    return folder


@pytest.fixture
def model_folder() -> Any:
    """The :func:`make_model_folder` helper, for tests that build their own spec."""
    return make_model_folder


@pytest.fixture
def fake_registry(tmp_path: Path) -> ModelRegistry:
    """Fake models: ``seg`` (1 channel, labels 1 and 2), ``cube`` (2 channels, label 1), ``pair``
    (2 channels, labels 1..3), ``tri`` (4 channels, label 1)."""
    models = tmp_path / "models"
    make_model_folder(
        models / "seg",
        folds=("0", "1", "all"),
        checkpoints=("checkpoint_final.pth", "checkpoint_best.pth"),
    )
    make_model_folder(models / "cube", channels=2, labels={"background": 0, "cube": 1})
    make_model_folder(models / "pair", channels=2, labels={"background": 0, "a": 1, "b": 2, "c": 3})
    make_model_folder(models / "tri", channels=4, labels={"background": 0, "x": 1})
    raw: dict[str, Any] = {
        "model_folder": "models",
        "models": [
            {"id": "seg", "name": "Segmenter", "aliases": ["s", "seg-alias"], "rel_path": "seg"},
            {
                "id": "cube",
                "rel_path": "cube",
                "default_args": {"proba_threshold": 0.3, "tta": False},
            },
            {"id": "pair", "rel_path": "pair"},
            {"id": "tri", "rel_path": "tri"},
        ],
        "routes": [{"name": "r", "nnunet_id": "seg"}],
    }
    spec = tmp_path / "model-serve-spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    return ModelRegistry.from_yaml(spec)
