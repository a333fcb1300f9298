"""The run record of a real job on the demo model: ``run.json`` beside the outputs, the same
document in the job row and in the download zip. Checked against what a user would check by hand:
``sha256sum`` of the checkpoint, ``pip show`` versions, the request with the model's defaults.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pydicom
import pytest

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.pipeline.context import NodeContext
from tests.support.demo_node import demo_node

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = (
    REPO
    / "models/Dataset501_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeContext]:
    if not CHECKPOINT.is_file():
        pytest.skip("the demo models are not built (make demo-model)")
    with demo_node(tmp_path_factory.mktemp("record")) as context:
        yield context


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_record_of_an_archive_job(node: NodeContext, tmp_path: Path) -> None:
    files = write_dicom_series(make_phantom(11, shape=(40, 48, 48)), tmp_path / "ct")
    for path in files:
        node.archive.ingest(path, source="dimse", calling_ae="SCANNER", called_ae="NNUNET_NODE")
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    # The request leaves tta, folds and checkpoint to the model's default_args.
    job_id = node.job_service.submit(
        {"nnunet_id": "demo", "save_rt_struct_output": True},
        source="dimse",
        series_uids=[header.SeriesInstanceUID],
        route_name="phantom-ct",
    )
    view = asyncio.run(node.job_service.wait(job_id, timeout=300))
    assert view.status == "done", view.error

    on_disk = json.loads((node.settings.jobs_dir / job_id / "run.json").read_text())
    assert view.run_record == on_disk  # the job row keeps the same document

    # checkpoint: the hash of the file that was loaded
    [model] = on_disk["models"]
    assert model["id"] == "phantom" and model["use_folds"] == [0]
    [checkpoint] = model["checkpoints"]
    assert Path(checkpoint["path"]).resolve() == CHECKPOINT.resolve()
    assert checkpoint["sha256"] == sha256(CHECKPOINT)

    # versions: the installed ones
    for name in ("nnunetv2", "torch", "pydicom", "highdicom"):
        assert on_disk["versions"][name] == metadata.version(name)
    assert on_disk["device"] == "cpu"

    # the effective request: the model's default_args (tta false) and the node's defaults filled
    request = on_disk["request"]
    assert request["nnunet_id"] == "demo"
    assert request["is_dicom"] is True  # an archive job's default
    assert request["save_rt_struct_output"] is True
    assert request["series_folders"] == [header.SeriesInstanceUID]
    [stage] = request["stages"]
    assert stage["model"] == "phantom"
    assert stage["tta"] is False  # default_args, over the request model's default (true)
    assert stage["checkpoint_name"] == "checkpoint_final.pth"
    assert stage["min_intersection"] == 0.1 and stage["cascade_mode"] == "intersect"

    # inputs: the series that was read, with its geometry
    assert on_disk["inputs"]["archive_series"] == [header.SeriesInstanceUID]
    [series] = on_disk["inputs"]["stages"]
    assert series["SeriesInstanceUID"] == header.SeriesInstanceUID
    assert series["StudyInstanceUID"] == header.StudyInstanceUID
    assert series["number_of_instances"] == len(files) == 40
    assert series["size_xyz"] == [48, 48, 40]

    # timings of each stage and of the job
    timings = on_disk["stages"][0]["timings_s"]
    assert {"load_s", "model_s", "predict_s", "write_s", "dicom_export_s"} <= set(timings)
    assert on_disk["timings_s"]["total_s"] >= on_disk["timings_s"]["inference_s"] > 0

    # outputs: every file with its checksum, archived objects with their UIDs
    outputs = {Path(o["path"]).name: o for o in on_disk["outputs"]}
    assert set(outputs) == {"prediction.nii.gz", "prediction.dcm", "struct.dcm"}
    for entry in outputs.values():
        assert entry["sha256"] == sha256(Path(entry["path"]))
    seg = pydicom.dcmread(outputs["prediction.dcm"]["path"], stop_before_pixels=True)
    assert outputs["prediction.dcm"]["SOPInstanceUID"] == seg.SOPInstanceUID

    # the download zip carries it
    with zipfile.ZipFile(node.job_service.zip_path(job_id)) as zf:
        assert json.loads(zf.read("run.json")) == on_disk
