"""The model-serve spec: loading, validation messages, lookup and what /model_info reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nnunet_node.core.errors import ConfigError, ModelUnavailable, UnknownModel
from nnunet_node.inference.spec import ModelRegistry


def _load(tmp_path: Path, raw: Any, **kwargs: Any) -> ModelRegistry:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    return ModelRegistry.from_yaml(spec, **kwargs)


def test_id_name_and_aliases_resolve_to_one_model(fake_registry: ModelRegistry) -> None:
    seg = fake_registry.resolve("seg")
    assert fake_registry.resolve("Segmenter") is seg
    assert fake_registry.resolve("s") is seg
    assert fake_registry.resolve("seg-alias") is seg
    with pytest.raises(UnknownModel, match=r"'nope'.*known models: cube, pair, seg, tri"):
        fake_registry.resolve("nope")


def test_relative_model_folder_is_resolved_against_the_spec_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_folder: Any
) -> None:
    sub = tmp_path / "conf"
    model_folder(sub / "models" / "m")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working folder must not matter
    registry = _load(sub, {"model_folder": "models", "models": [{"id": "m", "rel_path": "m"}]})
    assert registry.resolve("m").folder == (sub / "models" / "m").resolve()
    assert registry.info()["m"]["available"] is True


def test_info_reports_channels_labels_folds_and_checkpoints(fake_registry: ModelRegistry) -> None:
    info = fake_registry.info()
    assert set(info) == {"seg", "cube", "pair", "tri"}
    seg = info["seg"]
    assert seg["channels"] == 1
    assert seg["labels"] == {"background": 0, "sphere": 1, "cube": 2}
    assert seg["folds"] == ["0", "1", "all"]
    assert seg["checkpoints"] == ["checkpoint_best.pth", "checkpoint_final.pth"]
    assert seg["aliases"] == ["s", "seg-alias"]
    assert seg["min_mem"] == 4000
    assert info["cube"]["channels"] == 2
    assert info["cube"]["default_args"] == {"proba_threshold": 0.3, "tta": False}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"rel_path": "m"}, r"models\[0\]\.id: required"),
        ({"id": "m"}, r"model 'm': rel_path must be"),
        (
            {"id": "m", "rel_path": "m", "colour": 1},
            r"model 'm': unknown key\(s\) 'colour' \(allowed: aliases, ",
        ),
        ({"id": "m", "rel_path": "m", "min_mem": -1}, r"model 'm': min_mem"),
        ({"id": "m", "rel_path": "m", "aliases": [1]}, r"model 'm': aliases"),
        ({"id": "m", "rel_path": "m", "default_args": {"bogus": 1}}, r"model 'm'.*bogus"),
        ({"id": "m", "rel_path": "m", "default_args": {"tta": "maybe"}}, r"model 'm'.*tta"),
        (
            {"id": "m", "rel_path": "m", "default_args": {"study_path": "/x"}},
            r"model 'm'.*study_path",
        ),
        ({"id": "m", "totalseg_task": "no_such_task"}, r"model 'm'.*totalseg_task 'no_such_task'"),
    ],
)
def test_bad_entries_are_refused_naming_model_and_key(
    tmp_path: Path, model: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, {"model_folder": "models", "models": [model]})


def test_a_name_used_twice_is_refused(tmp_path: Path) -> None:
    raw = {
        "model_folder": "m",
        "models": [{"id": "a", "rel_path": "a"}, {"id": "b", "rel_path": "b", "aliases": ["a"]}],
    }
    with pytest.raises(ConfigError, match="model 'b': 'a' already names model 'a'"):
        _load(tmp_path, raw)


def test_top_level_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_folder"):
        _load(tmp_path, {"models": []})
    with pytest.raises(ConfigError, match="does not exist"):
        ModelRegistry.from_yaml(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ModelRegistry.from_yaml(tmp_path / "bad.yaml")


def test_missing_model_files_fail_when_used_not_at_load(tmp_path: Path) -> None:
    registry = _load(
        tmp_path, {"model_folder": "models", "models": [{"id": "gone", "rel_path": "x"}]}
    )
    info = registry.info()["gone"]
    assert info["available"] is False and "absent" in info["error"]
    with pytest.raises(ModelUnavailable, match="model 'gone'"):
        registry.require(registry.resolve("gone"))


def test_totalsegmentator_entries(tmp_path: Path, model_folder: Any) -> None:
    raw = {"model_folder": "models", "models": [{"id": "ts", "totalseg_task": "total_fast"}]}
    weights = tmp_path / "weights"
    registry = _load(tmp_path, raw, totalseg_weights_path=weights)
    spec = registry.resolve("ts")
    assert spec.name == "TotalSegmentator total_fast"
    info = registry.info()["ts"]
    assert info["available"] is False
    assert "TOTALSEG_WEIGHTS_PATH" in info["error"] and "total_fast" in info["error"]
    with pytest.raises(ModelUnavailable, match="TotalSegmentator task 'total_fast'"):
        registry.require(spec)

    # With weights present the entry resolves to the nnU-Net results folder inside them.
    folder = (
        weights / "Dataset297_TotalSegmentator_total_3mm" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    )
    model_folder(folder, labels={"background": 0, "spleen": 1})
    registry = _load(tmp_path, raw, totalseg_weights_path=weights)
    assert registry.resolve("ts").folder == folder.resolve()
    assert registry.info()["ts"]["available"] is True


def test_totalsegmentator_default_weights_folder_is_under_model_folder(tmp_path: Path) -> None:
    raw = {"model_folder": "models", "models": [{"id": "ts", "totalseg_task": "body"}]}
    registry = _load(tmp_path, raw)
    assert registry.resolve("ts").folder.is_relative_to(
        (tmp_path / "models" / "totalseg").resolve()
    )
