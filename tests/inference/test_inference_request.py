"""Request normalisation: per-model fields, default_args, cascade references, validation messages.

Each defect of ``docs/reference-contract.md`` that lives in normalisation has a test here
(``test_reference_defect_*``); the ones that need a prediction are in test_engine.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from nnunet_node.core.errors import ClientError, InvalidRequest, ModelUnavailable, UnknownModel
from nnunet_node.inference.request import InferenceRequest, normalise
from nnunet_node.inference.spec import ModelRegistry


def _plan(registry: ModelRegistry, **body: Any) -> Any:
    body.setdefault("study_path", "/study")
    body.setdefault("output_dir", "/out")
    return normalise(body, registry)


def test_reference_defect_flat_series_list_is_not_split_into_characters(
    fake_registry: ModelRegistry,
) -> None:
    plan = _plan(fake_registry, nnunet_id="seg", series_folders=["inputs/ct"])
    assert [r.path for r in plan.stages[0].inputs] == ["inputs/ct"]
    plan = _plan(fake_registry, nnunet_id=["pair"], series_folders=["a", "b"])
    assert [r.path for r in plan.stages[0].inputs] == ["a", "b"]
    nested = _plan(fake_registry, nnunet_id="pair", series_folders=[["a", "b"]])
    assert [r.path for r in nested.stages[0].inputs] == ["a", "b"]


def test_reference_defect_flat_use_folds_for_one_model(fake_registry: ModelRegistry) -> None:
    plan = _plan(fake_registry, nnunet_id="seg", series_folders=["ct"], use_folds=[0, 1])
    assert plan.stages[0].use_folds == (0, 1)
    plan = _plan(fake_registry, nnunet_id="seg", series_folders=["ct"], use_folds="all")
    assert plan.stages[0].use_folds == ("all",)


def test_per_model_lists_nested_and_broadcast(fake_registry: ModelRegistry) -> None:
    plan = _plan(
        fake_registry,
        nnunet_id=["seg", "pair"],
        series_folders=[["ct"], ["ct", "mr"]],
        use_folds=[[0, 1], [0]],
        class_idx=[2, [1, 3]],
        proba_threshold=[0.4, None],
        min_confidence=0.6,
        checkpoint_name=["checkpoint_best.pth", None],
        cascade_mode=[None, "crop"],
    )
    seg, pair = plan.stages
    assert seg.use_folds == (0, 1) and pair.use_folds == (0,)
    assert seg.class_idx == [2] and pair.class_idx == [1, 3]
    assert seg.proba_threshold == 0.4 and pair.proba_threshold is None
    assert seg.min_confidence == pair.min_confidence == 0.6
    assert seg.checkpoint_name == "checkpoint_best.pth"
    assert pair.checkpoint_name == "checkpoint_final.pth"
    assert pair.cascade_mode == "crop" and seg.cascade_mode == "intersect"
    # The same folds for every model given flat:
    plan = _plan(
        fake_registry, nnunet_id=["seg", "seg"], series_folders=[["a"], ["b"]], use_folds=[0, 1]
    )
    assert [s.use_folds for s in plan.stages] == [(0, 1), (0, 1)]


def test_class_idx_forms(fake_registry: ModelRegistry) -> None:
    one = _plan(fake_registry, nnunet_id="seg", series_folders=["ct"], class_idx=2)
    assert one.stages[0].class_idx == [2]
    flat = _plan(fake_registry, nnunet_id="seg", series_folders=["ct"], class_idx=[2, 1])
    assert flat.stages[0].class_idx == [1, 2]
    per = _plan(
        fake_registry,
        nnunet_id=["seg", "pair"],
        series_folders=[["a"], ["a", "b"]],
        class_idx=[1, 3],
    )
    assert [s.class_idx for s in per.stages] == [[1], [3]]
    with pytest.raises(InvalidRequest, match="class_idx: model 'seg' has no foreground class"):
        _plan(fake_registry, nnunet_id="seg", series_folders=["ct"], class_idx=5)
    with pytest.raises(InvalidRequest, match="class_idx: 3 entries for 2 models"):
        _plan(
            fake_registry,
            nnunet_id=["seg", "pair"],
            series_folders=[["a"], ["a", "b"]],
            class_idx=[1, 2, 3],
        )


def test_default_args_are_merged_under_the_request(fake_registry: ModelRegistry) -> None:
    plan = _plan(fake_registry, nnunet_id="cube", series_folders=["ct", "lab"])
    assert plan.stages[0].proba_threshold == 0.3 and plan.stages[0].tta is False
    plan = _plan(
        fake_registry, nnunet_id="cube", series_folders=["ct", "lab"], tta=True, proba_threshold=0.7
    )
    assert plan.stages[0].proba_threshold == 0.7 and plan.stages[0].tta is True
    # A per-model null falls back to default_args.
    plan = _plan(
        fake_registry,
        nnunet_id=["seg", "cube"],
        series_folders=[["ct"], ["ct", "lab"]],
        proba_threshold=[0.5, None],
    )
    assert [s.proba_threshold for s in plan.stages] == [0.5, 0.3]


def test_reference_defect_tta_is_honoured_on_every_stage(fake_registry: ModelRegistry) -> None:
    plan = _plan(
        fake_registry,
        nnunet_id=["seg", "pair"],
        series_folders=[["ct"], ["ct", "from:seg"]],
        tta=False,
    )
    assert [s.tta for s in plan.stages] == [False, False]
    plan = _plan(
        fake_registry,
        nnunet_id=["seg", "pair"],
        series_folders=[["ct"], ["ct", "mr"]],
        tta=[True, False],
    )
    assert [s.tta for s in plan.stages] == [True, False]


def test_explicit_cascade_reference_to_an_earlier_stage(fake_registry: ModelRegistry) -> None:
    plan = _plan(
        fake_registry,
        nnunet_id=["seg", "cube"],
        series_folders=[["image"], ["image", "from:seg"]],
    )
    assert plan.model_ids == ["seg", "cube"]
    ref = plan.stages[1].inputs[1]
    assert (ref.stage, ref.label, ref.channel, ref.is_mask) == (0, None, None, True)
    assert plan.stages[1].upstream == [0] and not plan.stages[0].upstream


def test_missing_upstream_stage_is_inserted_and_fed_the_first_series(
    fake_registry: ModelRegistry,
) -> None:
    plan = _plan(fake_registry, nnunet_id="cube", series_folders=["image", "from:Segmenter=2"])
    assert plan.model_ids == ["seg", "cube"]
    inserted, cube = plan.stages
    assert inserted.inserted and not cube.inserted
    assert [r.path for r in inserted.inputs] == ["image"]
    assert cube.inputs[1].stage == 0 and cube.inputs[1].label == 2
    assert cube.upstream == [0]


def test_reference_defect_two_inserted_models_in_one_stage_are_indexed_correctly(
    fake_registry: ModelRegistry,
) -> None:
    plan = _plan(
        fake_registry,
        nnunet_id="tri",
        series_folders=["ct", "mr", "from:cube", "from:seg[2]"],
    )
    assert plan.model_ids == ["cube", "seg", "tri"]
    cube, seg, tri = plan.stages
    assert [r.path for r in cube.inputs] == ["ct", "mr"]  # cube takes two channels
    assert [r.path for r in seg.inputs] == ["ct"]
    assert (tri.inputs[2].stage, tri.inputs[3].stage, tri.inputs[3].channel) == (0, 1, 2)
    assert plan.stages[tri.inputs[2].stage].model.id == "cube"
    assert plan.stages[tri.inputs[3].stage].model.id == "seg"
    assert tri.upstream == [0, 1]


def test_reference_defect_unknown_reference_is_a_client_error(fake_registry: ModelRegistry) -> None:
    with pytest.raises(UnknownModel, match=r"series_folders\[1\]: 'from:ghost'") as info:
        _plan(fake_registry, nnunet_id="cube", series_folders=["ct", "from:ghost"])
    assert isinstance(info.value, ClientError) and info.value.status_code == 400
    with pytest.raises(InvalidRequest, match="from:<model>"):
        _plan(fake_registry, nnunet_id="cube", series_folders=["ct", "from:seg[x]"])
    with pytest.raises(InvalidRequest, match="has no foreground label 7"):
        _plan(fake_registry, nnunet_id="cube", series_folders=["ct", "from:seg=7"])
    with pytest.raises(InvalidRequest, match=r"probability channels 0\.\.2"):
        _plan(fake_registry, nnunet_id="cube", series_folders=["ct", "from:seg[3]"])


def test_series_shape_errors(fake_registry: ModelRegistry) -> None:
    with pytest.raises(InvalidRequest, match="series_folders: field required"):
        _plan(fake_registry, nnunet_id="seg")
    with pytest.raises(InvalidRequest, match="2 models need a list of 2 lists"):
        _plan(fake_registry, nnunet_id=["seg", "seg"], series_folders=["a", "b"])
    with pytest.raises(InvalidRequest, match="1 lists of series for 2 model"):
        _plan(fake_registry, nnunet_id=["seg", "seg"], series_folders=[["a"]])
    with pytest.raises(InvalidRequest, match="model 'pair' takes 2 input"):
        _plan(fake_registry, nnunet_id="pair", series_folders=["a"])
    with pytest.raises(UnknownModel, match=r"nnunet_id\[1\]: unknown model 'x'"):
        _plan(fake_registry, nnunet_id=["seg", "x"], series_folders=[["a"], ["b"]])


def test_unknown_fields_are_rejected_naming_them(fake_registry: ModelRegistry) -> None:
    with pytest.raises(InvalidRequest, match="unknown field 'colour'"):
        _plan(fake_registry, nnunet_id="seg", series_folders=["a"], colour="red")
    with pytest.raises(InvalidRequest, match="proba_threshold"):
        _plan(fake_registry, nnunet_id="seg", series_folders=["a"], proba_threshold="high")


def test_value_checks_name_the_field(fake_registry: ModelRegistry) -> None:
    base = {"nnunet_id": "seg", "series_folders": ["a"]}
    cases = [
        ({"save_proba_map": True}, "proba_threshold: save_proba_map needs a threshold"),
        ({"proba_threshold": 1.5}, "proba_threshold: model 'seg': 1.5 is not between 0 and 1"),
        ({"use_folds": [3]}, "use_folds: model 'seg' has no fold 3"),
        ({"use_folds": ["x"]}, "use_folds: 'x' is not a fold"),
        ({"checkpoint_name": "checkpoint_x.pth"}, "checkpoint_name: model 'seg' has no"),
        ({"checkpoint_name": "../../etc/passwd"}, "not a checkpoint file name"),
        ({"suffix": "../x"}, "suffix"),
        ({"crop_padding": [1, -1, 1]}, "crop_padding"),
        ({"cascade_mode": "union"}, "cascade_mode"),
        ({"remove_objects_smaller_than": 5}, "remove_objects_smaller_than"),
        ({"proba_threshold": [0.1, 0.2]}, "proba_threshold: 2 values for 1 model"),
    ]
    for extra, message in cases:
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
            _plan(fake_registry, **base, **extra)


def test_save_proba_map_with_threshold_is_accepted(fake_registry: ModelRegistry) -> None:
    plan = _plan(
        fake_registry,
        nnunet_id="seg",
        series_folders=["a"],
        save_proba_map=True,
        proba_threshold=0.2,
    )
    assert plan.save_proba_map and plan.stages[0].save_proba_map


def test_reference_defect_accepted_fields_are_carried_not_dropped(
    fake_registry: ModelRegistry,
) -> None:
    plan = _plan(
        fake_registry,
        nnunet_id="seg",
        series_folders=["a"],
        remove_objects_smaller_than=0.25,
        tmp_dir="scratch",
        suffix="v2",
        crop_from="masks/roi.nii.gz",
        intersect_with="masks/organ.nii.gz",
        min_intersection=0.5,
        crop_padding=[1, 2, 3],
    )
    stage = plan.stages[0]
    assert stage.remove_objects_smaller_than == 0.25
    assert plan.tmp_dir == "scratch" and plan.suffix == "v2"
    assert stage.crop_padding == (1, 2, 3) and stage.min_intersection == 0.5
    assert stage.filter_components
    assert plan.paths() == [
        ("study_path", "/study"),
        ("output_dir", "/out"),
        ("tmp_dir", "scratch"),
        ("series_folders[0][0]", "a"),
        ("crop_from[0]", "masks/roi.nii.gz"),
        ("intersect_with[0]", "masks/organ.nii.gz"),
    ]


def test_request_schema_lists_the_seed_fields() -> None:
    fields = set(InferenceRequest.model_json_schema()["properties"])
    assert {
        "nnunet_id", "study_path", "series_folders", "output_dir", "class_idx", "checkpoint_name",
        "tmp_dir", "is_dicom", "tta", "use_folds", "proba_threshold", "min_confidence",
        "intersect_with", "min_intersection", "crop_from", "crop_padding", "cascade_mode",
        "save_proba_map", "save_nifti_inputs", "save_rt_struct_output", "suffix",
    } <= fields  # fmt: skip


def test_unavailable_model_fails_when_used(tmp_path: Any, fake_registry: ModelRegistry) -> None:
    registry = ModelRegistry.from_dict(
        {"model_folder": str(tmp_path / "none"), "models": [{"id": "gone", "rel_path": "gone"}]},
        base_dir=tmp_path,
    )
    with pytest.raises(ModelUnavailable, match="model 'gone'"):
        normalise({"nnunet_id": "gone", "series_folders": ["a"]}, registry)
