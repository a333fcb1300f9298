"""What the job queue adds to a run: jobs through JobService against the same runs called directly.

Two measurements, each against a baseline taken in the same run:

1. Queue overhead: N jobs whose engine only writes a tiny label map, submitted one after another
   and awaited (database row, claim, progress, finish, wake-up of the waiter), against the same
   engine called N times directly. Prints milliseconds per job and the ratio.
2. With the demo models built: N sequential jobs on the ``phantom`` model (NIfTI input, warm
   predictor cache) through JobService against N direct ``InferenceEngine.run`` calls.

    .venv/bin/python bench/bench_jobs.py [--jobs 50] [--model-jobs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunet_node.core.settings import Settings  # noqa: E402
from nnunet_node.inference.request import normalise  # noqa: E402
from nnunet_node.pipeline.context import build_context  # noqa: E402
from nnunet_node.pipeline.jobs import JobService  # noqa: E402
from nnunet_node.pipeline.spec import NodeSpec  # noqa: E402
from nnunet_node.storage.archive import Archive  # noqa: E402
from nnunet_node.storage.db import make_engine, make_sessionmaker  # noqa: E402
from nnunet_node.storage.migrations import upgrade  # noqa: E402


@dataclass
class _Stage:
    index: int
    model_id: str
    folder: Path
    prediction: sitk.Image
    probabilities: Any
    labels: list[int]
    files: dict[str, list[Path]]
    is_dicom: bool = False
    source_dicom_files: list[Path] = field(default_factory=list)


class TinyEngine:
    """Writes an 8^3 label map per stage: the cheapest run that still produces a file."""

    def run(  # the Engine protocol of pipeline/ports.py
        self,
        plan: Any,
        study_path: Path,
        output_dir: Path,
        *,
        progress=None,
        should_stop=None,
        layouts=None,
    ):
        out = []
        for stage in plan.stages:
            if progress:
                progress({"stage": stage.index, "step": "predict", "fraction": 0.5})
            folder = output_dir / f"stage_{stage.index}"
            folder.mkdir(parents=True, exist_ok=True)
            image = sitk.GetImageFromArray(np.ones((8, 8, 8), dtype=np.uint8))
            path = folder / "prediction.nii.gz"
            sitk.WriteImage(image, str(path))
            out.append(
                _Stage(
                    stage.index,
                    stage.model.id,
                    folder,
                    image,
                    None,
                    [1],
                    {"nifti_prediction": [path]},
                )
            )
        return out


def _toy_node(root: Path) -> tuple[Settings, JobService, Path]:
    model = root / "models" / "toy"
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}})
    )
    (model / "plans.json").write_text("{}")
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    spec = root / "spec.yaml"
    spec.write_text(
        json.dumps({"model_folder": "models", "models": [{"id": "toy", "rel_path": "toy"}]})
    )
    study = root / "studies" / "s"
    (study / "ct").mkdir(parents=True)
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32)), str(study / "ct" / "image.nii.gz")
    )
    settings = Settings(
        data_dir=root / "data",
        model_serve_spec=spec,
        allowed_roots=[root / "studies", root / "data"],
        min_free_disk_mb=0,
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    service = JobService(
        settings,
        sessions,
        NodeSpec.load(settings),
        Archive(settings.archive_dir, sessions),
        TinyEngine(),
    )
    return settings, service, study


async def _sequential(service: JobService, requests: list[dict[str, Any]]) -> float:
    t0 = time.perf_counter()
    for request in requests:
        job_id = service.submit(request)
        view = await service.wait(job_id)
        assert view.status == "done", view.error
    return time.perf_counter() - t0


def bench_queue(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings, service, study = _toy_node(Path(tmp))
        request = {"nnunet_id": "toy", "study_path": str(study), "series_folders": ["ct"]}
        plan = normalise(request, service.spec.registry)
        engine = TinyEngine()
        t0 = time.perf_counter()
        for i in range(n):
            engine.run(plan, study, settings.jobs_dir / f"direct{i}")
        direct = time.perf_counter() - t0
        service.start()
        try:
            queued = asyncio.run(_sequential(service, [request] * n))
        finally:
            service.stop()
    print(f"queue overhead, {n} sequential jobs with a trivial engine:")
    print(f"  direct engine calls   {1000 * direct / n:8.1f} ms/job")
    print(
        f"  through JobService    {1000 * queued / n:8.1f} ms/job "
        f"(+{1000 * (queued - direct) / n:.1f} ms/job, ratio {queued / direct:.2f})"
    )


def bench_model(n: int) -> None:
    if not (REPO / "models").is_dir():
        print("demo models not built: model benchmark skipped (make demo-model)")
        return
    from nnunet_node.core.phantom import make_phantom, write_nifti

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study = root / "studies" / "s"
        write_nifti(make_phantom(7, shape=(48, 48, 48)), study / "ct" / "image.nii.gz")
        settings = Settings(
            data_dir=root / "data",
            model_serve_spec=REPO / "model-serve-spec.yaml",
            allowed_roots=[root / "studies", root / "data"],
            device="cpu",
            min_free_disk_mb=0,
        )
        context = build_context(settings)
        request = {"nnunet_id": "phantom", "study_path": str(study), "series_folders": ["ct"]}
        plan = normalise(request, context.spec.registry)
        engine = context.inference_engine
        engine.run(plan, study, root / "warm")  # load the predictor once, for both sides
        t0 = time.perf_counter()
        for i in range(n):
            engine.run(plan, study, root / f"direct{i}")
        direct = time.perf_counter() - t0
        context.job_service.start()
        try:
            queued = asyncio.run(_sequential(context.job_service, [request] * n))
        finally:
            context.close()
    print(f"demo model `phantom`, 48^3 NIfTI, {n} sequential warm jobs:")
    print(f"  InferenceEngine.run   {direct / n:8.3f} s/job")
    print(f"  through JobService    {queued / n:8.3f} s/job (ratio {queued / direct:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--model-jobs", type=int, default=10)
    args = parser.parse_args()
    bench_queue(args.jobs)
    if args.model_jobs > 0:
        bench_model(args.model_jobs)


if __name__ == "__main__":
    main()
