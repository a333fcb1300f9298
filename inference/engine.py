"""Runs a :class:`~inference.request.Plan`: series in, one label map (and files) per stage out.

nnU-Net is called in-process: its preprocessor and ``predict_logits_from_preprocessed_data`` on a
predictor from the :class:`~inference.cache.PredictorCache`, never ``predict_from_files`` (it spawns
worker processes, which die inside daemon threads and services; nnU-Net issues #2744, #1572). The
predictor's network holds one fold's weights at a time, so each loaded predictor has a lock; its
mirroring setting is part of the cache key, so no request changes another's ``use_mirroring``.

Outputs of stage ``i`` go to ``<output_dir>/stage_<i>/`` (``prediction[_suffix].nii.gz``,
``proba[_suffix].nii.gz``, ``input_<j>[_suffix].nii.gz``), all in the geometry of the stage's first
input. Each stage is written under ``tmp_dir`` first and moved into place when complete, so a
failed or cancelled job leaves no half-written stage. Paths were checked by the caller; nothing is
written outside ``output_dir`` except the scratch folder under ``tmp_dir`` (inside ``output_dir``
unless the request gave an absolute path), which is removed afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_node.core import images
from nnunet_node.core.errors import InferenceError, InvalidRequest, JobCancelled
from nnunet_node.inference.cache import PredictorCache
from nnunet_node.inference.device import DevicePolicy
from nnunet_node.inference.postprocess import (
    ComponentFilter,
    filter_components,
    labels_from_probabilities,
)
from nnunet_node.inference.request import InputRef, Plan, Stage
from nnunet_node.inference.series_check import SeriesLayout, series_path
from nnunet_node.inference.volumes import (
    SeriesVolume,
    array_onto_grid,
    bounding_box,
    intersect_boxes,
    onto_grid,
    onto_source_slices,
    read_series,
    to_image,
)

LOGGER = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass
class StageResult:
    """What one stage produced. ``labels[i]`` is the label value of ``probabilities[i + 1]``
    (channel 0 is background); with ``class_idx`` only the kept classes are there."""

    index: int
    model_id: str
    folder: Path
    prediction: sitk.Image
    probabilities: np.ndarray | None
    labels: list[int]
    files: dict[str, list[Path]]
    is_dicom: bool
    source_dicom_files: list[Path]
    options: Stage
    dropped_components: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    source_layout: SeriesLayout | None = None
    device: str = ""
    """The torch device the stage's predictor ran on (``cpu``, ``cuda:0``)."""

    @property
    def label_array(self) -> np.ndarray:
        return sitk.GetArrayFromImage(self.prediction)

    def on_source_slices(self, array: np.ndarray, *, is_mask: bool) -> np.ndarray:
        """``array`` ((z, y, x) or (c, z, y, x) on the prediction's grid) on the source slices of
        ``source_dicom_files``, one per file in that order (the grid itself unless the series was
        resampled: gantry tilt, uneven spacing)."""
        return onto_source_slices(array, self.source_layout, is_mask=is_mask)


@dataclass
class LoadedModel:
    """A ready predictor and the lock that serialises its use (its network holds one fold at a
    time)."""

    predictor: Any
    lock: threading.Lock
    label_values: list[int]
    has_regions: bool
    device: torch.device


def cache_key(stage: Stage, device: torch.device) -> tuple[Any, ...]:
    return (
        str(stage.model.folder),
        tuple(str(f) for f in stage.use_folds),
        stage.checkpoint_name,
        stage.tta,
        str(device),
    )


def describe_key(key: Any, model_ids: dict[str, str]) -> dict[str, Any]:
    """A predictor cache key (:func:`cache_key`) as a record: ``model`` (its id, looked up by
    folder in ``model_ids``, else the folder), ``folds``, ``checkpoint``, ``tta``, ``device``."""
    if isinstance(key, tuple) and len(key) == 5:
        folder, folds, checkpoint, tta, device = key
        return {
            "model": model_ids.get(str(folder), str(folder)),
            "folds": list(folds),
            "checkpoint": checkpoint,
            "tta": bool(tta),
            "device": str(device),
        }
    return {"model": str(key)}


def load_model(
    folder: Path, folds: tuple[int | str, ...], checkpoint: str, tta: bool, device: torch.device
) -> LoadedModel:
    """An initialised ``nnUNetPredictor`` for the model folder (slow: reads the checkpoints)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    # nnU-Net prints a notice for every CPU predictor; keep it out of the service's stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
    try:
        try:
            predictor.initialize_from_trained_model_folder(
                str(folder), use_folds=tuple(folds), checkpoint_name=checkpoint
            )
        except (ImportError, RuntimeError, AttributeError) as exc:
            # nnU-Net finds a trainer class by importing every trainer module; some import timm and
            # torchvision, which break beside a CPU-only torch (docs/facts.md). Almost every trainer
            # builds the standard architecture from the plans, so build that instead.
            LOGGER.warning(
                "trainer lookup for %s failed (%s); building the plans' network directly",
                folder,
                exc,
            )
            _initialise_without_trainer_lookup(predictor, folder, folds, checkpoint)
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise InferenceError(f"cannot load the model in {folder}: {exc}") from exc
    label_manager = predictor.label_manager
    values = [int(v) for v in label_manager.all_labels]
    return LoadedModel(
        predictor=predictor,
        lock=threading.Lock(),
        label_values=values,
        has_regions=bool(label_manager.has_regions),
        device=device,
    )


def _initialise_without_trainer_lookup(
    predictor: Any, folder: Path, folds: tuple[int | str, ...], checkpoint: str
) -> None:
    import json

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans = PlansManager(json.loads((folder / "plans.json").read_text()))
    checkpoints = [
        torch.load(folder / f"fold_{f}" / checkpoint, map_location="cpu", weights_only=False)
        for f in folds
    ]
    first = checkpoints[0]
    configuration = plans.get_configuration(first["init_args"]["configuration"])
    network = nnUNetTrainer.build_network_architecture(
        plans,
        configuration,
        determine_num_input_channels(plans, configuration, dataset_json),
        plans.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    parameters = [c["network_weights"] for c in checkpoints]
    network.load_state_dict(parameters[0])
    predictor.manual_initialization(
        network,
        plans,
        configuration,
        parameters,
        dataset_json,
        first["trainer_name"],
        first.get("inference_allowed_mirroring_axes"),
    )


def _probabilities_in_original_shape(
    predictor: Any, logits: torch.Tensor, props: dict[str, Any]
) -> np.ndarray:
    """Softmax probabilities of ``logits`` on the input grid: nnU-Net's resampling, cropping and
    transposition undone as its ``convert_predicted_logits_to_segmentation_with_correct_shape``
    does."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    plans, config = predictor.plans_manager, predictor.configuration_manager
    shape_cropped = props["shape_after_cropping_and_before_resampling"]
    spacing = [props["spacing"][i] for i in plans.transpose_forward]
    current = (
        config.spacing
        if len(config.spacing) == len(shape_cropped)
        else [spacing[0], *config.spacing]
    )
    resampled = config.resampling_fn_probabilities(logits, shape_cropped, current, spacing)
    proba = torch.softmax(torch.as_tensor(resampled).float(), dim=0).numpy()
    full = np.zeros((proba.shape[0], *props["shape_before_cropping"]), dtype=np.float32)
    full[0] = 1.0
    full = insert_crop_into_image(full, proba, props["bbox_used_for_cropping"])
    return np.ascontiguousarray(full.transpose([0, *[i + 1 for i in plans.transpose_backward]]))


class InferenceEngine:
    """Runs plans with predictors from ``cache`` on the devices ``device_policy`` picks."""

    def __init__(
        self,
        cache: PredictorCache,
        device_policy: DevicePolicy,
        *,
        loader: Callable[..., LoadedModel] = load_model,
    ) -> None:
        self.cache = cache
        self.device_policy = device_policy
        self._loader = loader

    # --- public -------------------------------------------------------------------------------
    def model_for(self, stage: Stage, should_stop: Callable[[], bool] | None = None) -> LoadedModel:
        device = self.device_policy.choose(stage.model.min_mem, should_stop=should_stop)
        return self.cache.get(
            cache_key(stage, device),
            lambda: self._loader(
                stage.model.folder, stage.use_folds, stage.checkpoint_name, stage.tta, device
            ),
        )

    def run(
        self,
        plan: Plan,
        study_path: Path,
        output_dir: Path,
        *,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        layouts: dict[Path, SeriesLayout] | None = None,
    ) -> list[StageResult]:
        """Run every stage of ``plan`` in order and return one :class:`StageResult` per stage.

        Series are read under ``study_path``; each stage's files go to
        ``<output_dir>/stage_<i>/`` (label map and probabilities in the geometry of the stage's
        first input; probabilities are (classes, z, y, x), channel 0 background). ``progress`` is
        told each step; ``layouts`` are the series checks already made
        (:func:`series_check.check_plan`), by series path, and series without one are checked when
        read. Raises :class:`JobCancelled` when ``should_stop()`` turns true,
        :class:`InvalidRequest` for series that cannot feed the model (channels, references), and
        :class:`InferenceError` when nnU-Net or a model load fails."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp_root = Path(plan.tmp_dir)
        if not tmp_root.is_absolute():
            tmp_root = output_dir / tmp_root
        made_tmp_root = not tmp_root.exists()
        tmp_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_root))
        need_proba = {r.stage for s in plan.stages for r in s.inputs if r.channel is not None}
        run = _Run(
            self, plan, Path(study_path), output_dir, scratch, need_proba, progress, should_stop
        )
        run.layouts = dict(layouts or {})
        try:
            return [run.stage(stage) for stage in plan.stages]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if made_tmp_root:
                with contextlib.suppress(OSError):
                    tmp_root.rmdir()


@dataclass
class _Window:
    stopped: bool = False
    """``should_stop()`` turned true during the sliding window: its output is not a result."""


@contextlib.contextmanager
def _tiles_skipped_once_stopped(
    network: torch.nn.Module, should_stop: Callable[[], bool] | None, heads: int
) -> Any:
    """While nnU-Net's sliding window runs (``predict_logits_from_preprocessed_data``), ask
    ``should_stop()`` before each tile's forward pass; once it is true, the remaining tiles are
    not computed (zeros of the output's shape, (batch, ``heads``, z, y, x)), so that a job
    cancelled or a node shutting down mid-prediction stops in moments instead of after every
    tile, and the caller raises :class:`JobCancelled` (``window.stopped``). Nothing is raised
    inside the window: nnU-Net feeds it from a thread that would stay blocked for ever on its
    queue, holding the padded image. Yields the :class:`_Window`."""
    window = _Window()
    if should_stop is None:
        yield window
        return
    own = vars(network)
    had_own, previous = "forward" in own, own.get("forward")
    forward = network.forward

    def checked(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if window.stopped or should_stop():
            window.stopped = True
            return x.new_zeros((x.shape[0], heads, *x.shape[2:]))
        return forward(x, *args, **kwargs)

    own["forward"] = checked
    try:
        yield window
    finally:
        if had_own:
            own["forward"] = previous
        else:
            del own["forward"]


class _Run:
    """The state of one :meth:`InferenceEngine.run` call."""

    def __init__(
        self,
        engine: InferenceEngine,
        plan: Plan,
        study_path: Path,
        output_dir: Path,
        scratch: Path,
        need_proba: set[int | None],
        progress: Progress | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.study_path = study_path
        self.output_dir = output_dir
        self.scratch = scratch
        self.need_proba = need_proba
        self._progress = progress
        self._should_stop = should_stop
        self.results: list[StageResult] = []
        self._series_cache: dict[Path, SeriesVolume] = {}
        self.layouts: dict[Path, SeriesLayout] = {}

    # --- helpers ------------------------------------------------------------------------------
    def report(self, stage: Stage, step: str, within: float) -> None:
        if self._should_stop is not None and self._should_stop():
            raise JobCancelled(f"cancelled during stage {stage.index} ({stage.model.id}) at {step}")
        if self._progress is not None:
            n = len(self.plan.stages)
            self._progress(
                {
                    "stage": stage.index,
                    "stages": n,
                    "model": stage.model.id,
                    "step": step,
                    "fraction": round((stage.index + within) / n, 4),
                }
            )

    def path(self, raw: str) -> Path:
        return series_path(raw, self.study_path)

    def series(self, raw: str, what: str) -> SeriesVolume:
        path = self.path(raw)
        if path not in self._series_cache:
            self._series_cache[path] = read_series(path, what=what, layout=self.layouts.get(path))
        return self._series_cache[path]

    def mask(self, raw: str, reference: sitk.Image, what: str) -> np.ndarray:
        image = self.series(raw, what).image
        return sitk.GetArrayFromImage(onto_grid(image, reference, is_mask=True)) > 0

    def upstream_mask(self, ref_stage: int, label: int | None, reference: sitk.Image) -> np.ndarray:
        result = self.results[ref_stage]
        arr = result.label_array
        mask = (arr == label) if label is not None else (arr > 0)
        return (
            array_onto_grid(mask.astype(np.uint8), result.prediction, reference, is_mask=True) > 0
        )

    # --- one stage ------------------------------------------------------------------------------
    def stage(self, stage: Stage) -> StageResult:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.report(stage, "load", 0.0)
        where = f"series_folders[{stage.index}]"
        first = self.series(stage.inputs[0].raw, f"{where}[0]")
        reference = first.image
        channels: list[np.ndarray] = []
        input_images: list[sitk.Image] = []
        for j, ref in enumerate(stage.inputs):
            image = self.input_image(ref, reference, f"{where}[{j}]")
            input_images.append(image)
            channels.append(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))
        data = np.stack(channels)
        spacing_zyx = tuple(reversed(images.spacing(reference)))
        shape = data.shape[1:]

        # Masks that crop the input or filter the output, all on this stage's grid.
        upstream: np.ndarray | None = None
        if stage.upstream:
            labels_by_stage = {r.stage: r.label for r in stage.inputs if r.stage is not None}
            upstream = np.zeros(shape, dtype=bool)
            for u in stage.upstream:
                upstream |= self.upstream_mask(u, labels_by_stage.get(u), reference)
        crop_mask = (
            self.mask(stage.crop_from, reference, f"crop_from[{stage.index}]")
            if stage.crop_from
            else None
        )
        intersect_masks: list[np.ndarray] = []
        if stage.intersect_with:
            intersect_masks.append(
                self.mask(stage.intersect_with, reference, f"intersect_with[{stage.index}]")
            )
        if upstream is not None and stage.cascade_mode == "intersect":
            intersect_masks.append(upstream)
        box: tuple[slice, slice, slice] | None = (
            slice(0, shape[0]),
            slice(0, shape[1]),
            slice(0, shape[2]),
        )
        if crop_mask is not None:
            box = intersect_boxes(box, bounding_box(crop_mask, stage.crop_padding))
        if upstream is not None and stage.cascade_mode == "crop":
            box = intersect_boxes(box, bounding_box(upstream, stage.crop_padding))
        timings["load_s"] = time.perf_counter() - t0

        # Prediction.
        want_proba = (
            stage.save_proba_map
            or stage.proba_threshold is not None
            or stage.min_confidence is not None
            or stage.class_idx is not None
            or stage.index in self.need_proba
        )
        self.report(stage, "model", 0.1)
        t1 = time.perf_counter()
        model = self.engine.model_for(stage, self._should_stop)
        timings["model_s"] = time.perf_counter() - t1
        if stage.class_idx is not None and model.has_regions:
            raise InvalidRequest(
                f"class_idx: model {stage.model.id!r} is region-based; class filtering applies to "
                "label-based models only"
            )
        values = [0, *stage.class_idx] if stage.class_idx is not None else list(model.label_values)
        self.report(stage, "predict", 0.2)
        t2 = time.perf_counter()
        label_map = np.zeros(shape, dtype=np.uint16)
        probabilities: np.ndarray | None = None
        if want_proba:
            probabilities = np.zeros((len(values), *shape), dtype=np.float32)
            probabilities[0] = 1.0
        if box is not None:
            cropped = data[(slice(None), *box)]
            seg, proba = self.predict(model, cropped, spacing_zyx, stage, values, want_proba)
            label_map[box] = seg
            if probabilities is not None and proba is not None:
                probabilities[(slice(None), *box)] = proba
        timings["predict_s"] = time.perf_counter() - t2

        # Post-processing.
        self.report(stage, "postprocess", 0.8)
        dropped: dict[str, int] = {}
        if probabilities is not None and not model.has_regions:
            label_map = labels_from_probabilities(probabilities, values, stage.proba_threshold)
        if stage.filter_components or intersect_masks:
            label_map, dropped = filter_components(
                label_map,
                probabilities,
                values,
                ComponentFilter(
                    threshold=stage.proba_threshold,
                    min_confidence=stage.min_confidence,
                    smaller_than=stage.remove_objects_smaller_than,
                    min_intersection=stage.min_intersection,
                ),
                intersect_masks,
            )
        dtype = np.uint8 if max(values) < 256 else np.uint16
        prediction = to_image(label_map.astype(dtype), reference)

        # Outputs.
        self.report(stage, "write", 0.9)
        t3 = time.perf_counter()
        files = self.write(stage, prediction, probabilities, input_images)
        timings["write_s"] = time.perf_counter() - t3
        timings["total_s"] = time.perf_counter() - t0
        result = StageResult(
            index=stage.index,
            model_id=stage.model.id,
            folder=self.output_dir / f"stage_{stage.index}",
            prediction=prediction,
            probabilities=probabilities,
            labels=values[1:],
            files=files,
            is_dicom=first.is_dicom,
            source_dicom_files=list(first.dicom_files),
            source_layout=first.layout,
            options=stage,
            dropped_components=dropped,
            timings=timings,
            device=str(model.device),
        )
        self.results.append(result)
        self.report(stage, "done", 1.0)
        return result

    def input_image(self, ref: InputRef, reference: sitk.Image, what: str) -> sitk.Image:
        if ref.path is not None:
            image = self.series(ref.path, what).image
            return onto_grid(image, reference, is_mask=False)
        assert ref.stage is not None
        result = self.results[ref.stage]
        if ref.channel is not None:
            if result.probabilities is None:  # pragma: no cover - need_proba guarantees them
                raise InferenceError(f"{what}: stage {ref.stage} kept no probabilities")
            if ref.channel >= result.probabilities.shape[0]:
                raise InvalidRequest(
                    f"{what}: {ref.raw!r}: stage {ref.stage} has "
                    f"{result.probabilities.shape[0]} probability channels"
                )
            source = to_image(result.probabilities[ref.channel], result.prediction)
            return onto_grid(source, reference, is_mask=False)
        arr = result.label_array
        if ref.label is not None:
            arr = (arr == ref.label).astype(np.uint8)
        source = to_image(arr, result.prediction)
        return images.cast(onto_grid(source, reference, is_mask=True), sitk.sitkFloat32)

    def predict(
        self,
        model: LoadedModel,
        data: np.ndarray,
        spacing_zyx: tuple[float, ...],
        stage: Stage,
        values: list[int],
        want_proba: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """nnU-Net's own preprocessing and sliding window, in this process."""
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        predictor = model.predictor
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        pre, _, props = preprocessor.run_case_npy(
            data,
            None,
            {"spacing": list(spacing_zyx)},
            predictor.plans_manager,
            predictor.configuration_manager,
            predictor.dataset_json,
        )
        heads = int(predictor.label_manager.num_segmentation_heads)
        with (
            model.lock,
            _tiles_skipped_once_stopped(predictor.network, self._should_stop, heads) as window,
        ):
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(pre)).cpu()
        if window.stopped:
            where = f"stage {stage.index} ({stage.model.id})"
            raise JobCancelled(f"cancelled during {where}, in the sliding window")
        if stage.class_idx is not None:
            # Softmax over background and the kept classes only: nnU-Net's own conversion insists on
            # every class, so resample and revert the cropping here the same way it does.
            channels = [model.label_values.index(v) for v in values]
            proba = _probabilities_in_original_shape(predictor, logits[channels], props)
            lookup = np.asarray(values, dtype=np.uint16)
            return lookup[np.argmax(proba, axis=0)], proba
        out = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits,
            predictor.plans_manager,
            predictor.configuration_manager,
            predictor.label_manager,
            props,
            return_probabilities=want_proba,
            num_threads_torch=torch.get_num_threads(),
        )
        if want_proba:
            seg, proba = out
            return np.asarray(seg), np.asarray(proba, dtype=np.float32)
        return np.asarray(out), None

    def write(
        self,
        stage: Stage,
        prediction: sitk.Image,
        probabilities: np.ndarray | None,
        inputs: list[sitk.Image],
    ) -> dict[str, list[Path]]:
        suffix = f"_{self.plan.suffix}" if self.plan.suffix else ""
        name = f"stage_{stage.index}"
        work = self.scratch / name
        work.mkdir(parents=True)
        final = self.output_dir / name
        files: dict[str, list[Path]] = {
            "nifti_prediction": [],
            "nifti_proba": [],
            "nifti_inputs": [],
        }
        sitk.WriteImage(prediction, str(work / f"prediction{suffix}.nii.gz"), useCompression=True)
        files["nifti_prediction"].append(final / f"prediction{suffix}.nii.gz")
        if stage.save_proba_map and probabilities is not None:
            image = to_image(probabilities, prediction)
            sitk.WriteImage(image, str(work / f"proba{suffix}.nii.gz"), useCompression=True)
            files["nifti_proba"].append(final / f"proba{suffix}.nii.gz")
        if self.plan.save_nifti_inputs:
            for j, image in enumerate(inputs):
                file_name = f"input_{j}{suffix}.nii.gz"
                sitk.WriteImage(image, str(work / file_name), useCompression=True)
                files["nifti_inputs"].append(final / file_name)
        if final.exists():
            shutil.rmtree(final)
        shutil.move(str(work), str(final))
        return files
