"""The engine on the committed demo models (``phantom``: 1 channel, 1 sphere 2 cube;
``phantom_cube``:
image + phantom label map, 1 cube), on the CPU, against the phantom's ground truth.

Runs are shared through a module-scoped cache of results (mirroring off except where a test is about
it), so each request form is predicted once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_node.core.errors import JobCancelled
from nnunet_node.core.phantom import (
    CUBE_LABEL,
    SPHERE_LABEL,
    Phantom,
    make_phantom,
    write_dicom_series,
    write_nifti,
)
from nnunet_node.inference.cache import PredictorCache
from nnunet_node.inference.device import DevicePolicy
from nnunet_node.inference.engine import InferenceEngine, StageResult, cache_key
from nnunet_node.inference.request import normalise
from nnunet_node.inference.spec import ModelRegistry
from nnunet_node.inference.volumes import bounding_box

REPO = Path(__file__).resolve().parents[2]
IMAGE = "nifti/image.nii.gz"

pytestmark = pytest.mark.slow


@dataclass
class Study:
    root: Path
    phantom: Phantom

    @property
    def truth(self) -> np.ndarray:
        return self.phantom.labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    registry = ModelRegistry.from_yaml(REPO / "model-serve-spec.yaml")
    registry.require(registry.resolve("phantom"))  # phantom_cube is checked where it is used
    return registry


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    # "auto" on a machine without CUDA is the CPU fallback under test.
    return InferenceEngine(
        PredictorCache(ttl_s=600, max_entries=4, sweep_s=60), DevicePolicy("auto")
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("study")
    # One 32^3 patch of the model after resampling: every prediction is a single network pass.
    ph = make_phantom(9001, shape=(32, 32, 32), spacing=(1.0, 1.0, 1.25))
    write_nifti(ph, root / IMAGE, root / "nifti" / "labels.nii.gz")
    write_nifti(ph, root / "only_one" / "ct.nrrd")
    write_dicom_series(ph, root / "dicom" / "ct")
    _, labels = _sitk_pair(ph)
    # The label map on a coarser, shifted grid: a second input the engine must resample.
    coarse = sitk.Resample(
        labels,
        [int(s * 0.7) for s in labels.GetSize()],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        [o + 0.3 for o in labels.GetOrigin()],
        [sp / 0.7 for sp in labels.GetSpacing()],
        labels.GetDirection(),
        0,
        labels.GetPixelID(),
    )
    (root / "coarse").mkdir()
    sitk.WriteImage(coarse, str(root / "coarse" / "labels.mha"))
    sphere = sitk.Cast(labels == SPHERE_LABEL, sitk.sitkUInt8)
    (root / "masks").mkdir()
    sitk.WriteImage(sphere, str(root / "masks" / "sphere.nii.gz"))
    return Study(root, ph)


def _sitk_pair(ph: Phantom) -> tuple[sitk.Image, sitk.Image]:
    from nnunet_node.core.phantom import to_sitk

    return to_sitk(ph)


@pytest.fixture(scope="module")
def run(
    engine: InferenceEngine,
    registry: ModelRegistry,
    study: Study,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., list[StageResult]]:
    """``run(name, **body)``: the results of one request, computed once per module."""
    done: dict[str, list[StageResult]] = {}

    def _run(name: str, **body: Any) -> list[StageResult]:
        if name not in done:
            body.setdefault("tta", False)
            plan = normalise(body, registry)
            out = tmp_path_factory.mktemp(name)
            done[name] = engine.run(plan, study.root, out)
        return done[name]

    return _run


# --- the contract's examples, adapted to the demo models -------------------------------------


def test_single_model_nifti_example(run: Callable[..., list[StageResult]], study: Study) -> None:
    (result,) = run(
        "single",
        nnunet_id="phantom",
        study_path="ignored-by-engine",
        series_folders=[IMAGE],
        output_dir="ignored",
        use_folds=[0],
        save_proba_map=True,
        proba_threshold=0.1,
        min_confidence=0.5,
    )
    labels = result.label_array
    assert dice(labels == SPHERE_LABEL, study.truth == SPHERE_LABEL) > 0.8
    assert dice(labels == CUBE_LABEL, study.truth == CUBE_LABEL) > 0.8
    assert [p.name for p in result.files["nifti_prediction"]] == ["prediction.nii.gz"]
    assert [p.name for p in result.files["nifti_proba"]] == ["proba.nii.gz"]
    assert result.folder.name == "stage_0" and all(p.exists() for p in result.files["nifti_proba"])
    proba = sitk.ReadImage(str(result.files["nifti_proba"][0]))
    assert (
        proba.GetNumberOfComponentsPerPixel() == 3
        and proba.GetSize() == result.prediction.GetSize()
    )
    assert result.labels == [1, 2] and result.probabilities is not None
    assert not result.is_dicom and result.source_dicom_files == []
    # Geometry of the first input.
    image = sitk.ReadImage(str(study.root / IMAGE))
    written = sitk.ReadImage(str(result.files["nifti_prediction"][0]))
    for img in (result.prediction, written):
        assert img.GetSize() == image.GetSize()
        np.testing.assert_allclose(img.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), image.GetOrigin(), atol=1e-4)
    # Every kept voxel passed the threshold.
    fg_max = result.probabilities[1:].max(axis=0)
    assert (fg_max[labels > 0] >= 0.1).all()


def _dicom_cascade(run: Callable[..., list[StageResult]]) -> list[StageResult]:
    return run(
        "dicom_cascade",
        nnunet_id=["phantom", "phantom_cube"],
        series_folders=[["dicom/ct"], ["dicom/ct", "from:phantom"]],
        is_dicom=True,
        cascade_mode="intersect",
        save_rt_struct_output=True,
        save_nifti_inputs=True,
        suffix="v1",
    )


def test_cascade_dicom_example_with_outputs(
    run: Callable[..., list[StageResult]], study: Study
) -> None:
    results = _dicom_cascade(run)
    first, second = results
    assert [r.model_id for r in results] == ["phantom", "phantom_cube"]
    assert dice(first.label_array == CUBE_LABEL, study.truth == CUBE_LABEL) > 0.8
    assert dice(second.label_array == 1, study.truth == CUBE_LABEL) > 0.8
    for r in results:
        assert r.is_dicom and len(r.source_dicom_files) == r.prediction.GetSize()[2]
        assert [p.name for p in r.files["nifti_prediction"]] == ["prediction_v1.nii.gz"]
    assert [p.name for p in second.files["nifti_inputs"]] == [
        "input_0_v1.nii.gz",
        "input_1_v1.nii.gz",
    ]
    fed = sitk.GetArrayFromImage(sitk.ReadImage(str(second.files["nifti_inputs"][1])))
    np.testing.assert_array_equal(fed, first.label_array)  # the upstream label map, same grid
    assert second.options.upstream == [0]


# --- cascades: explicit and auto-inserted references, each mode -----------------------------------


@pytest.mark.parametrize("mode", ["intersect", "crop"])
@pytest.mark.parametrize("form", ["explicit", "inserted"])
def test_two_stage_cascade_matches_the_phantom(
    run: Callable[..., list[StageResult]], study: Study, mode: str, form: str
) -> None:
    if form == "explicit" and mode == "intersect":
        results = _dicom_cascade(run)  # the seed's cascade example is this case
        body = None
    elif form == "explicit":
        body = {
            "nnunet_id": ["phantom", "phantom_cube"],
            "series_folders": [[IMAGE], [IMAGE, "from:phantom"]],
        }
    else:
        body = {"nnunet_id": "phantom_cube", "series_folders": [IMAGE, "from:demo"]}  # an alias
    if body is not None:
        results = run(f"cascade_{form}_{mode}", cascade_mode=mode, **body)
    assert all(r.options.cascade_mode == mode for r in results)
    assert [r.model_id for r in results] == ["phantom", "phantom_cube"]
    assert results[0].options.inserted is (form == "inserted")
    cube = results[1].label_array
    assert dice(cube == 1, study.truth == CUBE_LABEL) > 0.8
    assert set(np.unique(cube)) <= {0, 1}


def test_a_later_model_without_references_is_fed_by_the_one_before(
    run: Callable[..., list[StageResult]], study: Study
) -> None:
    """The seed's cascade example has no ``from:``: stage 2 is intersected with stage 1's mask."""
    sphere_then_cube = run(
        "implicit",
        nnunet_id=["phantom", "phantom"],
        series_folders=[[IMAGE], [IMAGE]],
        class_idx=[1, 2],
    )
    first, second = sphere_then_cube
    assert second.options.upstream == [0] and second.options.cascade_mode == "intersect"
    assert dice(first.label_array == SPHERE_LABEL, study.truth == SPHERE_LABEL) > 0.8
    assert not second.label_array.any()  # the cube does not overlap the sphere
    assert second.dropped_components["intersection"] >= 1


def test_second_input_on_another_grid_is_resampled(
    run: Callable[..., list[StageResult]], study: Study
) -> None:
    (result,) = run("coarse", nnunet_id="phantom_cube", series_folders=[IMAGE, "coarse/labels.mha"])
    assert result.prediction.GetSize() == sitk.ReadImage(str(study.root / IMAGE)).GetSize()
    assert dice(result.label_array == 1, study.truth == CUBE_LABEL) > 0.8


def test_a_folder_holding_one_image_file(
    run: Callable[..., list[StageResult]], study: Study
) -> None:
    (result,) = run("folder", nnunet_id="phantom", series_folders=["only_one"])
    (argmax,) = run("argmax", nnunet_id="phantom", series_folders=[IMAGE])
    np.testing.assert_array_equal(result.label_array, argmax.label_array)


# --- options change the output as documented ------------------------------------------------------


def test_engine_argmax_equals_nnunets_own_prediction(
    run: Callable[..., list[StageResult]],
    engine: InferenceEngine,
    registry: ModelRegistry,
    study: Study,
) -> None:
    (result,) = run("argmax", nnunet_id="phantom", series_folders=[IMAGE])
    plan = normalise({"nnunet_id": "phantom", "series_folders": [IMAGE], "tta": False}, registry)
    model = engine.model_for(plan.stages[0])
    image = sitk.ReadImage(str(study.root / IMAGE))
    bare = model.predictor.predict_single_npy_array(
        sitk.GetArrayFromImage(image).astype(np.float32)[None],
        {"spacing": list(reversed(image.GetSpacing()))},
        None,
        None,
        False,
    )
    np.testing.assert_array_equal(result.label_array, bare)


def test_class_idx_keeps_only_that_class_with_its_value(
    run: Callable[..., list[StageResult]], study: Study
) -> None:
    (result,) = run("class2", nnunet_id="phantom", series_folders=[IMAGE], class_idx=2)
    labels = result.label_array
    assert set(np.unique(labels)) == {0, 2}
    assert dice(labels == 2, study.truth == CUBE_LABEL) > 0.8
    assert result.labels == [2] and result.probabilities is not None
    assert result.probabilities.shape[0] == 2  # background + the kept class, renormalised
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-4)


def test_thresholds_drop_uncertain_voxels(run: Callable[..., list[StageResult]]) -> None:
    (low,) = run("t_low", nnunet_id="phantom", series_folders=[IMAGE], proba_threshold=0.01)
    (high,) = run("t_high", nnunet_id="phantom", series_folders=[IMAGE], proba_threshold=0.99)
    assert (high.label_array > 0).sum() < (low.label_array > 0).sum()
    assert high.probabilities is not None
    assert (high.probabilities[1:].max(axis=0)[high.label_array > 0] >= 0.99).all()
    # min_confidence above every component's peak empties the map.
    assert low.probabilities is not None
    peak = float(low.probabilities[1:].max())
    if peak < 1.0:
        (none,) = run(
            "conf",
            nnunet_id="phantom",
            series_folders=[IMAGE],
            proba_threshold=0.05,
            min_confidence=min(1.0, peak + 1e-6),
        )
        assert none.label_array.sum() == 0


def test_small_objects_are_removed_relative_to_the_largest(
    run: Callable[..., list[StageResult]], study: Study
) -> None:
    (argmax,) = run("argmax", nnunet_id="phantom", series_folders=[IMAGE])
    sizes = {v: int((argmax.label_array == v).sum()) for v in (1, 2)}
    _, larger = sorted(sizes, key=sizes.get)  # type: ignore[arg-type]
    (result,) = run(
        "small", nnunet_id="phantom", series_folders=[IMAGE], remove_objects_smaller_than=0.999
    )
    present = set(np.unique(result.label_array)) - {0}
    assert present == {larger}
    assert result.dropped_components["size"] >= 1


def test_intersect_with_keeps_components_mostly_inside_the_mask(
    run: Callable[..., list[StageResult]], study: Study
) -> None:
    (result,) = run(
        "intersect",
        nnunet_id="phantom",
        series_folders=[IMAGE],
        intersect_with="masks/sphere.nii.gz",
        min_intersection=0.5,
    )
    labels = result.label_array
    assert set(np.unique(labels)) == {0, SPHERE_LABEL}  # the cube lies outside the mask
    assert dice(labels == SPHERE_LABEL, study.truth == SPHERE_LABEL) > 0.8


def test_crop_from_predicts_inside_the_box_and_pads_back(
    run: Callable[..., list[StageResult]], engine: InferenceEngine, study: Study
) -> None:
    (result,) = run(
        "crop",
        nnunet_id="phantom",
        series_folders=[IMAGE],
        crop_from="masks/sphere.nii.gz",
        crop_padding=[3, 4, 5],
    )
    labels = result.label_array
    assert labels.shape == study.truth.shape  # padded back to the input's grid
    box = bounding_box(study.truth == SPHERE_LABEL, (3, 4, 5))
    assert box is not None
    outside = np.ones_like(labels, dtype=bool)
    outside[box] = False
    assert not labels[outside].any()
    # Inside the box: exactly what nnU-Net predicts for the cropped volume.
    image = sitk.ReadImage(str(study.root / IMAGE))
    cropped = sitk.GetArrayFromImage(image).astype(np.float32)[box]
    model = engine.model_for(result.options)
    bare = model.predictor.predict_single_npy_array(
        cropped[None], {"spacing": list(reversed(image.GetSpacing()))}, None, None, False
    )
    np.testing.assert_array_equal(labels[box], bare)
    (argmax,) = run("argmax", nnunet_id="phantom", series_folders=[IMAGE])
    assert (labels != argmax.label_array).any()


def test_reference_defect_tta_is_used_after_the_first_stage(
    engine: InferenceEngine, registry: ModelRegistry
) -> None:
    """The reference mirrors only the first stage. Here each stage gets a predictor whose
    ``use_mirroring`` is its own ``tta`` (part of the cache key, so no stage changes another's)."""
    plan = normalise(
        {
            "nnunet_id": ["phantom", "phantom_cube"],
            "series_folders": [[IMAGE], [IMAGE, "from:phantom"]],
            "tta": [False, True],
        },
        registry,
    )
    first, second = plan.stages
    assert (first.tta, second.tta) == (False, True)
    assert engine.model_for(first).predictor.use_mirroring is False
    mirrored = engine.model_for(second)
    assert mirrored.predictor.use_mirroring is True
    assert cache_key(second, mirrored.device) in engine.cache
    plan_all = normalise(
        {"nnunet_id": "phantom_cube", "series_folders": [IMAGE, "from:phantom"], "tta": True},
        registry,
    )
    assert [s.tta for s in plan_all.stages] == [True, True]  # the inserted stage too


# --- running: cache reuse, concurrency, cancellation, scratch folder ------------------------------


def test_warm_runs_reuse_the_cached_predictor(
    run: Callable[..., list[StageResult]], engine: InferenceEngine
) -> None:
    run("argmax", nnunet_id="phantom", series_folders=[IMAGE])
    loads = engine.cache.stats.loads
    run("warm", nnunet_id="phantom", series_folders=[IMAGE])
    assert engine.cache.stats.loads == loads
    assert engine.cache.stats.hits >= 1


def test_two_jobs_at_once_load_the_model_once(
    registry: ModelRegistry, study: Study, tmp_path: Path
) -> None:
    engine = InferenceEngine(
        PredictorCache(ttl_s=60, max_entries=2, sweep_s=60), DevicePolicy("cpu")
    )
    plan = normalise({"nnunet_id": "phantom", "series_folders": [IMAGE], "tta": False}, registry)
    outcomes: list[Any] = []

    def job(i: int) -> None:
        try:
            outcomes.append(engine.run(plan, study.root, tmp_path / f"job{i}")[0])
        except Exception as exc:  # pragma: no cover - reported below
            outcomes.append(exc)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(o, StageResult) for o in outcomes) and len(outcomes) == 2
    np.testing.assert_array_equal(outcomes[0].label_array, outcomes[1].label_array)
    assert engine.cache.stats.loads == 1


def test_progress_tmp_dir_and_cancellation(
    engine: InferenceEngine, registry: ModelRegistry, study: Study, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    plan = normalise(
        {"nnunet_id": "phantom", "series_folders": [IMAGE], "tta": False, "tmp_dir": str(scratch)},
        registry,
    )
    events: list[dict[str, Any]] = []
    in_scratch: list[list[Path]] = []

    def progress(event: dict[str, Any]) -> None:
        events.append(event)
        in_scratch.append(list(scratch.iterdir()))

    engine.run(plan, study.root, tmp_path / "ok", progress=progress)
    assert events[0]["step"] == "load" and events[-1]["step"] == "done"
    assert events[-1]["fraction"] == 1.0
    assert any(in_scratch)  # the run worked inside tmp_dir
    assert list(scratch.iterdir()) == []  # and left it as it found it
    assert (tmp_path / "ok" / "stage_0" / "prediction.nii.gz").exists()
    assert not (tmp_path / "ok" / ".tmp").exists()

    seen: list[str] = []
    with pytest.raises(JobCancelled):
        engine.run(
            plan,
            study.root,
            tmp_path / "stopped",
            progress=lambda e: seen.append(e["step"]),
            should_stop=lambda: "model" in seen,  # stops before predicting
        )
    assert not (tmp_path / "stopped" / "stage_0").exists()  # no half-written stage
    assert list((tmp_path / "stopped").iterdir()) == []


def test_a_cancel_during_the_sliding_window_skips_the_remaining_tiles(
    engine: InferenceEngine, registry: ModelRegistry, tmp_path: Path
) -> None:
    """A job cancelled (or a node shutting down) while nnU-Net's sliding window runs stops
    after the tile in progress, not after every tile: a 64^3 volume is 27 tiles of 32^3 here."""
    ph = make_phantom(9002, shape=(64, 64, 64), spacing=(1.0, 1.0, 1.3))
    write_nifti(ph, tmp_path / "big" / "ct.nii.gz")
    plan = normalise({"nnunet_id": "phantom", "series_folders": ["big"], "tta": False}, registry)
    network = engine.model_for(plan.stages[0]).predictor.network
    calls = {"asked": 0, "tiles": 0, "computed": 0}

    def tile(*_: Any) -> None:  # every forward call of the window, computed or not
        calls["tiles"] += 1

    def computed(*_: Any) -> None:  # the encoder runs only when the tile is computed
        calls["computed"] += 1

    counting = [
        network.register_forward_pre_hook(tile),
        network.encoder.register_forward_hook(computed),
    ]
    seen: list[str] = []

    def should_stop() -> bool:  # true from the third tile on
        if "predict" in seen:
            calls["asked"] += 1
        return calls["asked"] > 2

    try:
        with pytest.raises(JobCancelled, match="sliding window"):
            engine.run(
                plan,
                tmp_path,
                tmp_path / "stopped",
                progress=lambda e: seen.append(e["step"]),
                should_stop=should_stop,
            )
        assert calls["computed"] == 2  # the tiles before the cancel, and no more
        assert calls["tiles"] > 10  # the window went on, through tiles not computed
        assert "forward" not in vars(network)  # the network is itself again
        assert list((tmp_path / "stopped").iterdir()) == []
        calls.update(tiles=0, computed=0)
        engine.run(plan, tmp_path, tmp_path / "again")  # the cached model still predicts
        assert calls["computed"] == calls["tiles"] > 10
    finally:
        for handle in counting:
            handle.remove()
    labels = sitk.GetArrayFromImage(
        sitk.ReadImage(str(tmp_path / "again" / "stage_0" / "prediction.nii.gz"))
    )
    assert dice(labels == SPHERE_LABEL, ph.labels == SPHERE_LABEL) > 0.8


def test_a_trainer_class_that_cannot_be_imported_still_loads(
    registry: ModelRegistry, study: Study, tmp_path: Path, run: Callable[..., list[StageResult]]
) -> None:
    """TotalSegmentator and many published models name trainers (nnUNetTrainerNoMirroring, ...)
    whose lookup imports torchvision, which fails beside a CPU-only torch (docs/facts.md)."""
    import shutil

    import torch

    from nnunet_node.inference.engine import load_model

    source = registry.resolve("phantom").folder
    copy = tmp_path / "model"
    shutil.copytree(source, copy)
    path = copy / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerNoMirroring"
    torch.save(checkpoint, path)
    model = load_model(copy, (0,), "checkpoint_final.pth", False, torch.device("cpu"))
    assert model.predictor.trainer_name == "nnUNetTrainerNoMirroring"
    image = sitk.ReadImage(str(study.root / IMAGE))
    seg = model.predictor.predict_single_npy_array(
        sitk.GetArrayFromImage(image).astype(np.float32)[None],
        {"spacing": list(reversed(image.GetSpacing()))},
        None,
        None,
        False,
    )
    (argmax,) = run("argmax", nnunet_id="phantom", series_folders=[IMAGE])
    np.testing.assert_array_equal(seg, argmax.label_array)
