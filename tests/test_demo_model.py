"""The committed demo models: genuine nnU-Net v2 models that segment any phantom of the definition.

Each model is loaded with nnU-Net's own ``nnUNetPredictor`` (CPU, no mirroring) and run on fresh
phantoms (seeds never used in training, non-square pixels), scored by Dice against the known labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from nnunet_node.core.phantom import CUBE_LABEL, SPHERE_LABEL, Phantom, make_phantom

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "model-serve-spec.yaml"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
PHANTOM_DIR = ROOT / "models" / "Dataset501_Phantom" / TRAINER_FOLDER
CUBE_DIR = ROOT / "models" / "Dataset502_PhantomCube" / TRAINER_FOLDER
PREDICTOR_KEYS = {
    "network_weights",
    "trainer_name",
    "init_args",
    "inference_allowed_mirroring_axes",
}

pytestmark = pytest.mark.slow


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return float(2 * np.logical_and(pred, truth).sum() / total) if total else 1.0


def _predictor(folder: Path) -> Any:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        device=torch.device("cpu"),
        use_mirroring=False,
        perform_everything_on_device=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth"
    )
    return predictor


def _predict(predictor: Any, ph: Phantom, *extra_channels: np.ndarray) -> np.ndarray:
    data = np.stack([ph.image, *extra_channels]).astype(np.float32)
    spacing_zyx = [ph.spacing[2], ph.spacing[1], ph.spacing[0]]
    seg = predictor.predict_single_npy_array(data, {"spacing": spacing_zyx}, None, None, False)
    return np.asarray(seg)


@pytest.fixture(scope="module")
def fresh_phantoms() -> list[Phantom]:
    """Seeds far from the training seeds; non-square pixels, one with thick slices."""
    return [
        make_phantom(424242, shape=(48, 52, 60), spacing=(0.8, 1.1, 1.3)),
        make_phantom(515151, shape=(56, 44, 40), spacing=(1.15, 0.85, 1.5)),
    ]


@pytest.fixture(scope="module")
def phantom_predictor() -> Any:
    return _predictor(PHANTOM_DIR)


@pytest.fixture(scope="module")
def cube_predictor() -> Any:
    return _predictor(CUBE_DIR)


@pytest.fixture(scope="module")
def phantom_predictions(phantom_predictor: Any, fresh_phantoms: list[Phantom]) -> list[np.ndarray]:
    return [_predict(phantom_predictor, ph) for ph in fresh_phantoms]


def test_phantom_model_segments_fresh_phantoms(
    fresh_phantoms: list[Phantom], phantom_predictions: list[np.ndarray]
) -> None:
    for ph, seg in zip(fresh_phantoms, phantom_predictions, strict=True):
        assert seg.shape == ph.labels.shape
        assert set(np.unique(seg)) <= {0, SPHERE_LABEL, CUBE_LABEL}
        assert _dice(seg == SPHERE_LABEL, ph.labels == SPHERE_LABEL) > 0.8
        assert _dice(seg == CUBE_LABEL, ph.labels == CUBE_LABEL) > 0.8


def test_phantom_cube_model_segments_the_cube_from_image_and_labels(
    cube_predictor: Any, fresh_phantoms: list[Phantom]
) -> None:
    ph = fresh_phantoms[1]
    seg = _predict(cube_predictor, ph, ph.labels.astype(np.float32))
    assert set(np.unique(seg)) <= {0, 1}
    assert _dice(seg == 1, ph.labels == CUBE_LABEL) > 0.8


def test_cascade_of_the_two_models_finds_the_cube(
    cube_predictor: Any, fresh_phantoms: list[Phantom], phantom_predictions: list[np.ndarray]
) -> None:
    """Stage 2 fed with stage 1's label map, as ``[["image"], ["image", "from:phantom"]]`` does."""
    ph, stage1 = fresh_phantoms[0], phantom_predictions[0]
    seg = _predict(cube_predictor, ph, stage1.astype(np.float32))
    assert _dice(seg == 1, ph.labels == CUBE_LABEL) > 0.8


@pytest.mark.parametrize(
    ("folder", "channels", "labels"),
    [
        (PHANTOM_DIR, {"0": "CT"}, {"background": 0, "sphere": 1, "cube": 2}),
        (CUBE_DIR, {"0": "CT", "1": "noNorm"}, {"background": 0, "cube": 1}),
    ],
    ids=["phantom", "phantom_cube"],
)
def test_committed_model_folder_is_small_and_complete(
    folder: Path, channels: dict[str, str], labels: dict[str, int]
) -> None:
    import torch

    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == channels
    assert dataset["labels"] == labels
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [32, 32, 32]
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    assert checkpoint.stat().st_size < 2_000_000
    content = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert set(content) == PREDICTOR_KEYS
    assert content["trainer_name"] == "nnUNetTrainer"
    assert content["init_args"] == {"configuration": "3d_fullres"}


def test_spec_lists_the_demo_models() -> None:
    spec = yaml.safe_load(SPEC.read_text())
    assert spec["model_folder"] == "models"
    models = {m["id"]: m for m in spec["models"]}
    assert {"phantom", "phantom_cube"} <= set(models)
    for model_id, folder in (("phantom", PHANTOM_DIR), ("phantom_cube", CUBE_DIR)):
        entry = models[model_id]
        assert (SPEC.parent / spec["model_folder"] / entry["rel_path"]).resolve() == folder
        dataset = json.loads((folder / "dataset.json").read_text())
        foreground = {v for v in dataset["labels"].values() if v}
        described = {s["number"] for s in entry["metadata"]["segment_names"]}
        assert described == foreground, model_id
    assert "demo" in models["phantom"]["aliases"]


def test_spec_metadata_describes_every_label() -> None:
    """The inline metadata parses (export's contract) and names each label with codes."""
    from nnunet_node.export.metadata import parse_metadata

    spec = yaml.safe_load(SPEC.read_text())
    for entry in spec["models"]:
        if entry["id"] not in {"phantom", "phantom_cube"}:
            continue
        labels = [1, 2] if entry["id"] == "phantom" else [1]
        parsed = parse_metadata(
            entry["metadata"], base_dir=SPEC.parent, model_id=entry["id"], labels=labels
        )
        assert sorted(parsed.segments) == labels
        for segment in parsed.segments.values():
            assert segment.category.value == "260787004"  # SCT Physical object
            assert segment.type.scheme == "99NNUNODE"
