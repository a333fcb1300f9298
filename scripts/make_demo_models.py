"""Train the two tiny demo models on phantoms and commit-ready copies of them into ``models/``.

Both are genuine nnU-Net v2 models: nnU-Net raw datasets of ``core.phantom`` volumes, nnU-Net's own
fingerprint, planning and preprocessing, a plans file shrunk to a small network (32^3 patch,
3 stages, 8/16/32 features, batch 2), and the stock ``nnUNetTrainer`` with a short schedule.

- ``phantom`` (Dataset501_Phantom): channel 0 "CT"; labels 1 sphere, 2 cube.
- ``phantom_cube`` (Dataset502_PhantomCube): channel 0 "CT", channel 1 the phantom label map
  ("noNorm", so nnU-Net leaves it as it is); label 1 cube. It is stage 2 of the demo cascade
  ``series_folders: [["image"], ["image", "from:phantom"]]``.

Training phantoms vary in shape (40 to 64 voxels a side) and spacing (square, non-square and thick
slices), so the model segments any phantom of the definition, not only its own. Fold 0 trains on
every training case and validates on separate ones (a ``splits_final.json`` written here), and a
held-out set of fresh phantoms (seeds never used in training) is scored at the end with nnU-Net's
own ``nnUNetPredictor`` on the stripped, copied model.

Checkpoints are stripped to what the predictor reads (``network_weights``, ``trainer_name``,
``init_args["configuration"]``, ``inference_allowed_mirroring_axes``): a few hundred KB a model.

    .venv/bin/python scripts/make_demo_models.py [--work /tmp/nnunet-node-demo-train] [--out models]
        [--epochs 20] [--iterations 25] [--device cpu|cuda] [--only phantom|phantom_cube]

nnU-Net reads its folders from environment variables at import, and uses spawn pools (hence the
``__main__`` guard and the late imports). Training is not seeded: Dice figures vary a little.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nnunet_node.core.phantom import CUBE_LABEL, Phantom, make_phantom, to_sitk  # noqa: E402

TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
CONFIGURATION = "3d_fullres"
STRIPPED_KEYS = ("network_weights", "trainer_name", "inference_allowed_mirroring_axes")


def _training_phantom(seed: int) -> Phantom:
    """A phantom of the definition, with spacing varied over the cases: mostly the generator's
    non-square default, some square 1 mm, some thick-sliced."""
    kind = seed % 4
    if kind == 1:
        return make_phantom(seed, spacing=(1.0, 1.0, 1.0))
    if kind == 3:
        rng = np.random.default_rng(seed + 7)
        sx, sy = (round(float(v), 3) for v in rng.uniform(0.75, 1.25, size=2))
        return make_phantom(seed, spacing=(sx, sy, round(float(rng.uniform(1.3, 1.6)), 3)))
    return make_phantom(seed)


# Seeds: training 1000.., nnU-Net validation 2000.., held-out test 900000.. (never trained on).
TRAIN_SEEDS = range(1000, 1032)
VAL_SEEDS = range(2000, 2004)
TEST_SEEDS = range(900000, 900008)


def _write_case(folder: Path, case: str, ph: Phantom, *, cube_dataset: bool) -> None:
    image, labels = to_sitk(ph)
    sitk.WriteImage(image, str(folder / "imagesTr" / f"{case}_0000.nii.gz"), useCompression=True)
    if cube_dataset:
        label_channel = sitk.Cast(labels, sitk.sitkFloat32)
        sitk.WriteImage(
            label_channel, str(folder / "imagesTr" / f"{case}_0001.nii.gz"), useCompression=True
        )
        target = sitk.Cast(labels == CUBE_LABEL, sitk.sitkUInt8)
    else:
        target = labels
    sitk.WriteImage(target, str(folder / "labelsTr" / f"{case}.nii.gz"), useCompression=True)


def write_raw_dataset(raw: Path, name: str, *, cube_dataset: bool) -> tuple[list[str], list[str]]:
    """Write an nnU-Net raw dataset; returns (training case ids, validation case ids)."""
    folder = raw / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    train, val = [], []
    offset = 500 if cube_dataset else 0  # different phantoms for the two models
    for seed in TRAIN_SEEDS:
        case = f"phantom_{seed + offset}"
        _write_case(folder, case, _training_phantom(seed + offset), cube_dataset=cube_dataset)
        train.append(case)
    for seed in VAL_SEEDS:
        case = f"phantom_{seed + offset}"
        _write_case(folder, case, _training_phantom(seed + offset), cube_dataset=cube_dataset)
        val.append(case)
    if cube_dataset:
        channels = {"0": "CT", "1": "noNorm"}
        labels = {"background": 0, "cube": 1}
    else:
        channels = {"0": "CT"}
        labels = {"background": 0, "sphere": 1, "cube": 2}
    dataset = {
        "name": name,
        "description": "Synthetic CT phantoms of nnunet-node (core.phantom)",
        "channel_names": channels,
        "labels": labels,
        "numTraining": len(train) + len(val),
        "file_ending": ".nii.gz",
        "licence": "Apache-2.0",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return train, val


def shrink_plans(plans_file: Path) -> None:
    """Make the 3d_fullres configuration tiny: 32^3 patch, 3 stages of 8/16/32 features, batch 2.

    The ``data_identifier`` (and so the preprocessed data) stays the same.
    """
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][CONFIGURATION]
    config["patch_size"] = [32, 32, 32]
    config["batch_size"] = 2
    arch = config["architecture"]["arch_kwargs"]
    arch["n_stages"] = 3
    arch["features_per_stage"] = [8, 16, 32]
    arch["kernel_sizes"] = [[3, 3, 3]] * 3
    arch["strides"] = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    arch["n_conv_per_stage"] = [2, 2, 2]
    arch["n_conv_per_stage_decoder"] = [2, 2]
    # Keep only the configuration we train, so nobody mistakes the others for trained ones.
    plans["configurations"] = {CONFIGURATION: config}
    plans_file.write_text(json.dumps(plans, indent=2))


def plan_and_preprocess(dataset_id: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    extract_fingerprints([dataset_id], num_processes=2, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    name = convert_id_to_dataset_name(dataset_id)
    shrink_plans(Path(nnUNet_preprocessed) / name / "nnUNetPlans.json")
    preprocess([dataset_id], configurations=(CONFIGURATION,), num_processes=(2,))


def train(dataset_id: int, train_cases: list[str], val_cases: list[str], args: Any) -> Path:
    """Train fold 0 with the stock nnUNetTrainer on a short schedule; return its results folder."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    name = convert_id_to_dataset_name(dataset_id)
    pre = Path(nnUNet_preprocessed) / name
    (pre / "splits_final.json").write_text(json.dumps([{"train": train_cases, "val": val_cases}]))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8 pops this key in the trainer
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, CONFIGURATION, 0, dataset_json, device=torch.device(args.device))
    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = 4
    trainer.run_training()  # no final validation: we score held-out phantoms ourselves
    return Path(trainer.output_folder_base)


def export_model(results: Path, dest: Path) -> Path:
    """Copy dataset.json, plans.json and a stripped fold_0 checkpoint to ``dest``."""
    import torch

    shutil.rmtree(dest, ignore_errors=True)
    (dest / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(results / name, dest / name)
    full = torch.load(
        results / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    stripped = {key: full[key] for key in STRIPPED_KEYS}
    stripped["init_args"] = {"configuration": full["init_args"]["configuration"]}
    torch.save(stripped, dest / "fold_0" / "checkpoint_final.pth")
    return dest


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    return float(2 * inter / total) if total else 1.0


def score(model_dir: Path, *, cube_model: bool) -> dict[str, list[float]]:
    """Held-out Dice per label on fresh phantoms, with nnU-Net's own predictor, no mirroring."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        device=torch.device("cpu"),
        use_mirroring=False,
        perform_everything_on_device=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    scores: dict[str, list[float]] = {}
    for seed in TEST_SEEDS:
        ph = _training_phantom(seed)
        channels = [ph.image]
        if cube_model:
            channels.append(ph.labels.astype(np.float32))
        data = np.stack(channels).astype(np.float32)
        spacing_zyx = list(ph.spacing[::-1])
        seg = predictor.predict_single_npy_array(data, {"spacing": spacing_zyx}, None, None, False)
        targets = {"cube": (1, CUBE_LABEL)} if cube_model else {"sphere": (1, 1), "cube": (2, 2)}
        for name, (pred_label, true_label) in targets.items():
            scores.setdefault(name, []).append(dice(seg == pred_label, ph.labels == true_label))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnunet-node-demo-train"))
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="training device")
    parser.add_argument(
        "--only", choices=["phantom", "phantom_cube"], help="make one model only (default both)"
    )
    args = parser.parse_args()

    work: Path = args.work.resolve()
    for var, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "preprocessed"),
        ("nnUNet_results", "results"),
    ):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / sub)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")

    models = [
        ("phantom", 501, "Dataset501_Phantom", False),
        ("phantom_cube", 502, "Dataset502_PhantomCube", True),
    ]
    for model_id, dataset_id, name, cube in models:
        if args.only and args.only != model_id:
            continue
        started = time.monotonic()
        for sub in ("preprocessed", "results"):  # no stale cases or checkpoints from an earlier run
            shutil.rmtree(work / sub / name, ignore_errors=True)
        train_cases, val_cases = write_raw_dataset(work / "raw", name, cube_dataset=cube)
        plan_and_preprocess(dataset_id)
        prepared = time.monotonic()
        results = train(dataset_id, train_cases, val_cases, args)
        trained = time.monotonic()
        dest = export_model(results, args.out / name / TRAINER_FOLDER)
        size_kb = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 1024
        scores = score(dest, cube_model=cube)
        summary = ", ".join(
            f"{label} mean {np.mean(v):.3f} min {np.min(v):.3f}" for label, v in scores.items()
        )
        print(
            f"[{model_id}] data+plan+preprocess {prepared - started:.0f} s, "
            f"training {trained - prepared:.0f} s ({args.epochs} epochs x {args.iterations} "
            f"iterations); model {dest} ({size_kb:.0f} KB); held-out Dice on "
            f"{len(TEST_SEEDS)} fresh phantoms: {summary}",
            flush=True,
        )


if __name__ == "__main__":
    main()
