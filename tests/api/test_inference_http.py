"""The contract's examples (``docs/reference-contract.md``), adapted to the demo models, through a
live node over HTTP.

Each runs the real nnU-Net predictor on the committed tiny models (``phantom``, and the cascade
``phantom`` -> ``phantom_cube``) with NIfTI and DICOM inputs, and checks what a user would: the
response fields the contract lists, the files they name, the segmentation itself, the
download, the job history.
"""

from __future__ import annotations

import io
import json
import statistics
import tarfile
import threading
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nnunet_node.core.phantom import make_phantom
from tests.support.contract import RESULT_FIELDS

pytestmark = pytest.mark.slow


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def _truth() -> np.ndarray:
    return make_phantom(5, shape=(32, 32, 32)).labels  # the conftest's study


def _check_segmentation(prediction: Path) -> None:
    truth = _truth()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
    assert labels.shape == truth.shape
    assert _dice(labels == 1, truth == 1) > 0.75
    assert _dice(labels == 2, truth == 2) > 0.75


def _done(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) >= RESULT_FIELDS
    assert body["status"] == "done"
    assert isinstance(body["job_id"], str)
    for kind in RESULT_FIELDS - {"time_elapsed", "nnunet_path", "metadata", "request", "status"}:
        assert isinstance(body[kind], list)
        for path in body[kind]:
            assert Path(path).is_file(), f"{kind}: {path} does not exist"
    return body


def _zip_names(client: httpx.Client, job_id: str) -> list[str]:
    answer = client.get(f"/download/{job_id}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as zf:
        assert zf.testzip() is None
        return sorted(zf.namelist())


# --- the contract's example 1: one model -----------------------------------------------------
def test_single_model_dicom_exports_seg_and_fractional_seg(node: Any, study: Any) -> None:
    body = {
        "nnunet_id": "phantom",
        "study_path": str(study.root),
        "series_folders": ["ct_dicom"],
        "output_dir": str(node.settings.data_dir / "out" / "single_dicom"),
        "is_dicom": True,
        "save_proba_map": True,
        "proba_threshold": 0.1,
        "suffix": "v1",
    }
    result = _done(node.client.post("/infer", json=body))
    (seg_path,) = result["dicom_segmentation"]
    assert seg_path.endswith("stage_0/prediction_v1.dcm")
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG"
    source = pydicom.dcmread(next((study.root / "ct_dicom").iterdir()))
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    (fractional,) = result["dicom_fractional_segmentation"]
    assert pydicom.dcmread(fractional).SegmentationType == "FRACTIONAL"
    assert result["metadata"] is not None
    _check_segmentation(Path(result["nifti_prediction"][0]))


def test_single_model_nifti_while_healthz_stays_fast(node: Any, study: Any) -> None:
    out = node.settings.data_dir / "out" / "single_nifti"
    body = {
        "nnunet_id": "phantom",
        "study_path": str(study.root),
        "series_folders": ["ct_nifti"],
        "output_dir": str(out),
        "use_folds": [0],
        "tta": False,
        "save_proba_map": True,
        "proba_threshold": 0.1,
        "min_confidence": 0.5,
    }
    answers: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answers.append(node.client.post("/infer", json=body)))
    latencies: list[float] = []
    with httpx.Client(base_url=node.url, timeout=5) as probe:
        worker.start()
        while worker.is_alive():
            started = time.perf_counter()
            assert probe.get("/healthz").json() == {"status": "ok"}
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    worker.join()
    result = _done(answers[0])

    # /healthz answered all along while the job ran in a worker (never in the event loop):
    # typically within 100 ms, never held up for the length of the inference. (Single probes can
    # take longer on a loaded machine; bench/bench_api.py measures the percentiles.)
    assert len(latencies) >= 5
    assert statistics.median(latencies) < 0.1, latencies
    assert max(latencies) < 1.0, latencies

    assert result["request"] == body
    assert result["nifti_prediction"] == [str(out / "stage_0" / "prediction.nii.gz")]
    assert result["nifti_proba"] == [str(out / "stage_0" / "proba.nii.gz")]
    assert result["dicom_segmentation"] == []
    assert Path(result["nnunet_path"]).name == "nnUNetTrainer__nnUNetPlans__3d_fullres"
    _check_segmentation(Path(result["nifti_prediction"][0]))
    names = set(_zip_names(node.client, result["job_id"]))
    assert {"stage_0/prediction.nii.gz", "run.json"} <= names
    record = node.client.get(f"/jobs/{result['job_id']}").json()["run_record"]
    assert record["job_id"] == result["job_id"]
    assert record["request"]["output_dir"] == str(out)
    assert (out / "run.json").is_file()


# --- the contract's example 2: a cascade with DICOM input and RTSTRUCT --------------------
def test_cascade_dicom_with_rtstruct_and_download(node: Any, study: Any) -> None:
    out = node.settings.data_dir / "out" / "cascade_dicom"
    body = {
        "nnunet_id": ["phantom", "phantom_cube"],
        "study_path": str(study.root),
        "series_folders": [["ct_dicom"], ["ct_dicom", "from:phantom"]],
        "output_dir": str(out),
        "is_dicom": True,
        "cascade_mode": "intersect",
        "save_rt_struct_output": True,
    }
    result = _done(node.client.post("/infer", json=body))
    assert len(result["nnunet_path"]) == 2
    assert [Path(p).parent.name for p in result["nifti_prediction"]] == ["stage_0", "stage_1"]
    assert len(result["dicom_segmentation"]) == 2
    assert len(result["dicom_struct"]) == 2
    for path in result["dicom_struct"]:
        assert pydicom.dcmread(path).Modality == "RTSTRUCT"
    cube = sitk.GetArrayFromImage(sitk.ReadImage(result["nifti_prediction"][1]))
    assert _dice(cube == 1, _truth() == 2) > 0.75

    names = _zip_names(node.client, result["job_id"])
    for path in result["nifti_prediction"] + result["dicom_segmentation"] + result["dicom_struct"]:
        assert str(Path(path).relative_to(out)) in names


# --- /infer_file ---------------------------------------------------------------------------------
def _zip_of(folder: Path, prefix: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}/{path.relative_to(folder.parent)}")
    return buffer.getvalue()


def _tar_of(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_infer_file_with_zip_and_tar(node: Any, study: Any, kind: str) -> None:
    if kind == "zip":  # a DICOM study zipped from its parent folder: study01/ct_dicom/*.dcm
        request = {"nnunet_id": "phantom", "series_folders": ["ct_dicom"], "is_dicom": True}
        content = _zip_of(study.root / study.dicom, "study01")
    else:  # NIfTI at the archive's root: ct_nifti/image.nii.gz
        request = {"nnunet_id": "demo", "series_folders": ["ct_nifti"]}
        content = _tar_of(study.root / study.nifti)
    uploads = node.settings.uploads_dir
    answer = node.client.post(
        "/infer_file",
        data={"request": json.dumps(request)},
        files={"file": (f"../../study.{kind}", content, "application/octet-stream")},
    )
    result = _done(answer)
    assert result["request"] == request
    _check_segmentation(Path(result["nifti_prediction"][0]))
    if kind == "zip":
        assert len(result["dicom_segmentation"]) == 1
    names = _zip_names(node.client, result["job_id"])
    assert "stage_0/prediction.nii.gz" in names
    # The upload is gone, and so is the study extracted from it once the job is over.
    assert not list(uploads.glob("*.upload"))
    assert not list(uploads.rglob("ct_*")), "the extracted study was left behind"
    assert not (node.settings.data_dir.parent / f"study.{kind}").exists()


# --- jobs and history ----------------------------------------------------------------------------
def _wait_done(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_post_jobs_answers_at_once_then_reports(node: Any, study: Any) -> None:
    """The cascade with NIfTI input, queued through /jobs: ``phantom_cube`` alone names
    ``from:phantom``, so ``phantom`` is inserted as stage 0 (the contract's injection)."""
    body = {
        "nnunet_id": "phantom_cube",
        "study_path": str(study.root),
        "series_folders": ["ct_nifti", "from:phantom"],
    }
    answer = node.client.post("/jobs", json=body)
    assert answer.status_code == 202
    created = answer.json()
    assert created["status"] == "queued"
    assert answer.headers["location"] == f"/jobs/{created['job_id']}"
    job = _wait_done(node.client, created["job_id"])
    assert job["status"] == "done", job["error"]
    assert job["source"] == "http"
    assert job["models"] == ["phantom", "phantom_cube"]
    assert job["progress"]["fraction"] == 1.0
    result = job["result"]
    assert result["status"] == "done"
    assert len(result["nifti_prediction"]) == 2
    assert {a["kind"] for a in job["artifacts"]} == {"nifti_prediction"}
    assert sorted(a["stage"] for a in job["artifacts"]) == [0, 1]
    # Without an output_dir the outputs live in the job's own folder.
    for path in result["nifti_prediction"]:
        assert Path(path).is_file()
        assert Path(path).is_relative_to(node.settings.jobs_dir / job["job_id"])
    assert job["started_at"] >= job["created_at"]
    assert job["finished_at"] >= job["started_at"]
    finished = node.client.post(f"/jobs/{job['job_id']}/cancel")
    assert finished.status_code == 409
    assert node.client.get(f"/jobs/{job['job_id']}").json()["status"] == "done"
    # Another request cannot write into this job's folder, nor into any other folder the node
    # manages: a request naming the job's folder as its output_dir replaced its run record and
    # stage folders (its DICOM outputs were gone from it) while its row still named them.
    folder = node.settings.jobs_dir / job["job_id"]
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    settings = node.settings
    targets = {
        folder: f"in the folder of job {job['job_id']}",
        folder / "stage_0": f"in the folder of job {job['job_id']}",
        settings.data_dir: "the node's data folder",
        settings.jobs_dir: "the node's jobs folder",
        settings.archive_dir / "out": "in the node's archive folder",
        settings.uploads_dir: "in the node's uploads folder",
    }
    jobs_before = node.client.get("/jobs").json()["total"]
    for target, words in targets.items():
        for path in ("/infer", "/jobs"):
            refused = node.client.post(path, json={**body, "output_dir": str(target)})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"] == (
                f"output_dir: {str(target)!r} is {words}, which the node manages: choose another "
                "folder, or leave output_dir out (outputs then go to the job's own folder)"
            )
    assert node.client.get("/jobs").json()["total"] == jobs_before
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_archive_job_downloads_and_history_filters(node: Any, study: Any) -> None:
    """A job the DIMSE side would start (source dimse, series from the archive) downloads like
    any other, and the history filters find it by patient, study and source."""
    context = node.context
    before = datetime.now(UTC) - timedelta(seconds=1)
    results = [
        context.archive.ingest(path, source="import")
        for path in sorted((study.root / study.dicom).iterdir())
    ]
    job_id = context.job_service.submit(
        {"nnunet_id": "phantom"}, source="dimse", series_uids=[results[0].series_instance_uid]
    )
    job = _wait_done(node.client, job_id)
    assert job["status"] == "done", job["error"]
    assert job["patient_id"] == "PH5"
    assert any(name.endswith(".dcm") for name in _zip_names(node.client, job_id))

    def page(**params: Any) -> dict[str, Any]:
        answer = node.client.get("/jobs", params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    everything = page(limit=1000)
    total = everything["total"]
    assert total >= 7
    created = [item["created_at"] for item in everything["items"]]
    assert created == sorted(created, reverse=True)  # newest first
    assert everything["items"][0]["job_id"] == job_id

    assert [j["job_id"] for j in page(patient_id="PH5")["items"]] == [job_id]
    uid = results[0].study_instance_uid
    assert [j["job_id"] for j in page(study_uid=uid)["items"]] == [job_id]
    assert [j["job_id"] for j in page(source="dimse")["items"]] == [job_id]
    assert page(source="http")["total"] == total - 1
    assert [j["job_id"] for j in page(created_after=before.isoformat())["items"]] == [job_id]
    assert page(created_before=before.isoformat())["total"] == total - 1
    cascades = page(model="phantom_cube")
    assert cascades["total"] >= 2
    assert all("phantom_cube" in j["models"] for j in cascades["items"])
    assert page(model="demo")["total"] == total  # an alias names the model too
    assert page(status=["done"])["total"] == total
    assert page(status=["failed", "queued"])["total"] == 0

    first, second = page(limit=3, offset=0), page(limit=3, offset=3)
    assert first["total"] == second["total"] == total
    ids = [j["job_id"] for j in first["items"]] + [j["job_id"] for j in second["items"]]
    assert ids == [j["job_id"] for j in everything["items"][:6]]
    assert page(limit=5, offset=total)["items"] == []


def test_workers_lists_the_node_itself_when_it_runs_the_jobs(node: Any) -> None:
    """No broker: the node's own threads are the one worker, taking every queue."""
    answer = node.client.get("/workers")
    assert answer.status_code == 200
    (worker,) = answer.json()
    assert worker["queues"] == ["*"]
    assert worker["device"] == "cpu"
    assert worker["current_job"] is None
    assert worker["jobs_done"] >= 4, "the inference tests above ran jobs here"
    loaded = {m["model"] for m in worker["models"]}
    assert {"phantom", "phantom_cube"} <= loaded
    assert worker["model_loads"] >= len(worker["models"])
    done = node.client.get("/jobs", params={"status": "done", "limit": 1}).json()["items"][0]
    assert (done["queue"], done["queue_position"], done["worker"]) == ("default", None, None)


def test_readyz_reports_the_cache_and_expire_empties_it(node: Any) -> None:
    ready = node.client.get("/readyz").json()
    assert ready["status"] == "ok"
    assert ready["database"]["reachable"] is True
    assert set(ready["spec"]["available"]) == {"phantom", "phantom_cube"}
    assert ready["device"]["mode"] == "cpu"
    assert ready["cache"], "the inference tests above loaded models"
    expired = node.client.get("/expire").json()
    assert expired["status"] == "ok"
    assert "dropped" in expired["message"]
    assert node.client.get("/readyz").json()["cache"] == []


# --- restart ------------------------------------------------------------------------------------
def test_queued_jobs_survive_a_restart(tmp_path: Path, make_node: Any, make_study: Any) -> None:
    data = tmp_path / "data"
    study = make_study(data / "studies" / "s", seed=5)
    body = {"nnunet_id": "phantom", "study_path": str(study.root), "series_folders": ["ct_nifti"]}
    with make_node(data) as first:
        first.context.job_service.stop()  # no worker: jobs stay queued
        keep, drop = (first.client.post("/jobs", json=body).json()["job_id"] for _ in range(2))
        queued = first.client.get("/jobs", params={"status": "queued"}).json()
        assert {j["job_id"] for j in queued["items"]} == {keep, drop}
        cancelled = first.client.post(f"/jobs/{drop}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert first.client.post(f"/jobs/{drop}/cancel").status_code == 409
        assert first.client.get(f"/download/{keep}").status_code == 409
    with make_node(data) as second:
        job = _wait_done(second.client, keep)
        assert job["status"] == "done", job["error"]
        assert second.client.get(f"/jobs/{drop}").json()["status"] == "cancelled"
        assert "stage_0/prediction.nii.gz" in _zip_names(second.client, keep)
