"""Engine overhead and cache benefit: the same volume through a bare ``nnUNetPredictor`` and through
:class:`inference.engine.InferenceEngine` with a warm predictor cache.

For each model it prints
- ``engine/bare``: warm engine run (read the input, predict, write prediction.nii.gz) over the bare
  predictor doing the same (``sitk.ReadImage`` + ``predict_single_npy_array`` +
  ``sitk.WriteImage``), both with the predictor already loaded; target at most 1.10;
- ``cold/warm``: the first engine run (which loads the checkpoint) over a warm one: what the cache
  saves.

Models: ``demo`` (the committed ``phantom`` model on a phantom) and ``fullsize`` (nnU-Net's default
3d_fullres network planned for 512 x 512 x 200 CT, untrained weights from
``scripts/make_fullsize_model.py``, made in /tmp when absent). On a CPU the full-size volume
defaults to one patch of the plan (``--fullsize-shape`` to change it); on a GPU use a whole CT
volume.

    .venv/bin/python bench/bench_inference.py --models demo fullsize --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunet_node.core.phantom import make_phantom, write_nifti  # noqa: E402
from nnunet_node.inference.cache import PredictorCache  # noqa: E402
from nnunet_node.inference.device import DevicePolicy  # noqa: E402
from nnunet_node.inference.engine import InferenceEngine, load_model  # noqa: E402
from nnunet_node.inference.request import normalise  # noqa: E402
from nnunet_node.inference.spec import ModelRegistry  # noqa: E402

FULLSIZE_OUT = Path("/tmp/nnunet-fullsize")
FULLSIZE_REL = "Dataset990_FullsizeCT/nnUNetTrainer__nnUNetPlans__3d_fullres"


def _timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ct_like_volume(shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, ...]) -> sitk.Image:
    """Air around a soft-tissue body with brighter organs and bone: HU-like values."""
    rng = np.random.default_rng(0)
    _, y, x = np.ogrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    cy, cx = shape_zyx[1] / 2, shape_zyx[2] / 2
    body = ((y - cy) / (0.42 * shape_zyx[1])) ** 2 + ((x - cx) / (0.45 * shape_zyx[2])) ** 2 < 1
    vol = np.full(shape_zyx, -1000.0, dtype=np.float32)
    vol[np.broadcast_to(body, shape_zyx)] = 40.0
    organ = ((y - cy * 0.8) / (0.12 * shape_zyx[1])) ** 2 + (
        (x - cx * 1.2) / (0.1 * shape_zyx[2])
    ) ** 2 < 1
    vol[np.broadcast_to(organ, shape_zyx)] = 120.0
    spine = ((y - cy * 1.5) / (0.05 * shape_zyx[1])) ** 2 + (
        (x - cx) / (0.05 * shape_zyx[2])
    ) ** 2 < 1
    vol[np.broadcast_to(spine, shape_zyx)] = 700.0
    vol += rng.normal(0, 20, shape_zyx).astype(np.float32)
    image = sitk.GetImageFromArray(vol.astype(np.int16))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    return image


def bench_model(
    label: str,
    registry: ModelRegistry,
    model_id: str,
    image_path: Path,
    repeats: int,
    device_mode: str,
    warmup: bool = True,
) -> dict[str, float]:
    plan = normalise(
        {"nnunet_id": model_id, "series_folders": [str(image_path)], "tta": False}, registry
    )
    stage = plan.stages[0]
    policy = DevicePolicy(device_mode, wait_s=0)  # type: ignore[arg-type]
    device = policy.choose(0)
    work = Path(tempfile.mkdtemp(prefix=f"bench-inf-{label}-"))

    engine = InferenceEngine(PredictorCache(ttl_s=3600, max_entries=2, sweep_s=3600), policy)
    cold = _timed(lambda: engine.run(plan, image_path.parent, work / "cold"))

    model = load_model(stage.model.folder, stage.use_folds, stage.checkpoint_name, False, device)
    predictor = model.predictor

    def bare() -> None:
        image = sitk.ReadImage(str(image_path))
        arr = sitk.GetArrayFromImage(image).astype(np.float32)[None]
        seg = predictor.predict_single_npy_array(
            arr, {"spacing": list(reversed(image.GetSpacing()))}, None, None, False
        )
        out = sitk.GetImageFromArray(seg.astype(np.uint8))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(work / "bare.nii.gz"), useCompression=True)

    if warmup:  # first-call allocations (and cuDNN autotuning on a GPU)
        bare()
        engine.run(plan, image_path.parent, work / "warmup")
    bare_times: list[float] = []
    engine_times: list[float] = []
    for i in range(repeats):  # interleaved so load on the machine hits both alike
        bare_times.append(_timed(bare))
        engine_times.append(_timed(lambda i=i: engine.run(plan, image_path.parent, work / f"w{i}")))
    bare_s = statistics.median(bare_times)
    warm_s = statistics.median(engine_times)
    figures = {
        "cold_s": round(cold, 3),
        "warm_s": round(warm_s, 3),
        "bare_s": round(bare_s, 3),
        "engine_over_bare": round(warm_s / bare_s, 3),
        "cold_over_warm": round(cold / warm_s, 2),
        "volume_zyx": list(reversed(sitk.ReadImage(str(image_path)).GetSize())),
    }
    print(
        f"{label:9s} device={device} volume={figures['volume_zyx']} cold={cold:.2f}s "
        f"warm={warm_s:.2f}s bare={bare_s:.2f}s engine/bare={warm_s / bare_s:.3f} "
        f"(target <= 1.10) cold/warm={cold / warm_s:.2f}",
        flush=True,
    )
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["demo", "fullsize"], choices=["demo", "fullsize"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed warm-up passes (slow CPUs)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--fullsize-dir", type=Path, default=FULLSIZE_OUT)
    parser.add_argument(
        "--fullsize-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
        help="default: one patch on a CPU, 200 x 512 x 512 on a GPU",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-inf-"))
    results: dict[str, dict[str, float]] = {}

    if "demo" in args.models:
        registry = ModelRegistry.from_yaml(REPO / "model-serve-spec.yaml")
        write_nifti(make_phantom(9001), work / "demo" / "image.nii.gz")
        results["demo"] = bench_model(
            "demo",
            registry,
            "phantom",
            work / "demo" / "image.nii.gz",
            args.repeats,
            args.device,
            not args.no_warmup,
        )

    if "fullsize" in args.models:
        folder = args.fullsize_dir / FULLSIZE_REL
        if not (folder / "fold_0" / "checkpoint_final.pth").exists():
            sys.path.insert(0, str(REPO / "scripts"))
            from make_fullsize_model import make_model

            make_model(args.fullsize_dir)
        plans = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
        spacing = tuple(plans["spacing"])
        gpu = args.device != "cpu" and torch.cuda.is_available()
        shape = tuple(args.fullsize_shape or ((200, 512, 512) if gpu else plans["patch_size"]))
        image = ct_like_volume(shape, spacing)  # type: ignore[arg-type]
        (work / "full").mkdir()
        sitk.WriteImage(image, str(work / "full" / "ct.nii.gz"), useCompression=True)
        registry = ModelRegistry.from_dict(
            {
                "model_folder": str(args.fullsize_dir),
                "models": [{"id": "full", "rel_path": FULLSIZE_REL}],
            },
            base_dir=work,
        )
        results["fullsize"] = bench_model(
            "fullsize",
            registry,
            "full",
            work / "full" / "ct.nii.gz",
            args.repeats,
            args.device,
            not args.no_warmup,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
