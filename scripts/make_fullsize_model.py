"""Make a full-size nnU-Net v2 model folder with UNTRAINED weights, for timing only.

nnU-Net's default experiment planner (``ExperimentPlanner``, the one that
``nnUNetv2_plan_and_preprocess`` uses) plans the ``3d_fullres`` configuration from a hand-written
dataset fingerprint of a realistic CT dataset (default: 512 x 512 x 200 voxels of 0.78 x 0.78 x 2.5
mm, 1 channel, 5 labels); the network it plans is built with nnU-Net's own trainer class and saved
as a checkpoint holding what the predictor reads. The result is a results folder like a trained
model's (``dataset.json``, ``plans.json``, ``fold_0/checkpoint_final.pth``), hundreds of MB, whose
outputs mean nothing: loading it is what the predictor cache saves, and predicting with it is what a
real model costs.

Written to /tmp by default; never commit it.

    .venv/bin/python scripts/make_fullsize_model.py --out /tmp/nnunet-fullsize
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path


def fingerprint(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float], cases: int
) -> dict[str, object]:
    """A dataset fingerprint as ``nnUNetv2_extract_fingerprint`` writes it, for CT-like data."""
    return {
        "spacings": [list(spacing_zyx)] * cases,
        "shapes_after_crop": [list(shape_zyx)] * cases,
        "foreground_intensity_properties_per_channel": {
            "0": {
                "mean": 80.0,
                "median": 60.0,
                "std": 150.0,
                "min": -1024.0,
                "max": 3000.0,
                "percentile_99_5": 1200.0,
                "percentile_00_5": -900.0,
            }
        },
        "median_relative_size_after_cropping": 1.0,
    }


def make_model(
    out: Path,
    *,
    shape_zyx: tuple[int, int, int] = (200, 512, 512),
    spacing_zyx: tuple[float, float, float] = (2.5, 0.78, 0.78),
    labels: int = 5,
    seed: int = 0,
) -> Path:
    """Plan, build and save; return the model folder
    (``out/<dataset>/nnUNetTrainer__nnUNetPlans__3d_fullres``)."""
    work = Path(tempfile.mkdtemp(prefix="nnunet-plan-"))
    try:
        raw, pre = work / "raw", work / "preprocessed"
        name = "Dataset990_FullsizeCT"
        (raw / name / "imagesTr").mkdir(parents=True)
        (raw / name / "labelsTr").mkdir(parents=True)
        (pre / name).mkdir(parents=True)
        dataset = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **{f"organ_{i}": i for i in range(1, labels + 1)}},
            "numTraining": 1,
            "file_ending": ".nii.gz",
        }
        (raw / name / "dataset.json").write_text(json.dumps(dataset))
        # The planner picks the image reader from one example case; its content does not matter.
        import SimpleITK as sitk

        example = sitk.Image(8, 8, 8, sitk.sitkInt16)
        sitk.WriteImage(example, str(raw / name / "imagesTr" / "case_000_0000.nii.gz"))
        sitk.WriteImage(
            sitk.Image(8, 8, 8, sitk.sitkUInt8), str(raw / name / "labelsTr" / "case_000.nii.gz")
        )
        (pre / name / "dataset_fingerprint.json").write_text(
            json.dumps(fingerprint(shape_zyx, spacing_zyx, 10))
        )
        os.environ["nnUNet_raw"] = str(raw)  # noqa: SIM112 (nnU-Net's names)
        os.environ["nnUNet_preprocessed"] = str(pre)  # noqa: SIM112
        os.environ.setdefault("nnUNet_results", str(work / "results"))

        import torch
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
            ExperimentPlanner,
        )
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        planner = ExperimentPlanner(name)
        planner.plan_experiment()
        plans = json.loads((pre / name / "nnUNetPlans.json").read_text())
        # Keep the 3d_fullres configuration only (the lowres/cascade ones are not served here).
        plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}

        folder = out / name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "fold_0").mkdir(parents=True)
        (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
        (folder / "plans.json").write_text(json.dumps(plans, indent=2))

        torch.manual_seed(seed)
        manager = PlansManager(plans)
        config = manager.get_configuration("3d_fullres")
        network = nnUNetTrainer.build_network_architecture(
            manager,
            config,
            1,
            labels + 1,
            enable_deep_supervision=False,
        )
        checkpoint = {
            "network_weights": network.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres"},
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
        return folder
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/nnunet-fullsize"))
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(200, 512, 512), metavar=("Z", "Y", "X")
    )
    parser.add_argument(
        "--spacing", type=float, nargs=3, default=(2.5, 0.78, 0.78), metavar=("Z", "Y", "X")
    )
    parser.add_argument("--labels", type=int, default=5)
    args = parser.parse_args(argv)
    folder = make_model(
        args.out, shape_zyx=tuple(args.shape), spacing_zyx=tuple(args.spacing), labels=args.labels
    )
    plans = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    size = (folder / "fold_0" / "checkpoint_final.pth").stat().st_size / 2**20
    print(f"model folder: {folder}")
    print(
        f"3d_fullres patch {plans['patch_size']}, spacing {plans['spacing']}, "
        f"checkpoint {size:.0f} MiB"
    )


if __name__ == "__main__":
    main()
