"""The series geometry check over HTTP: a series the node refuses (a missing slice, two volumes)
answers 400 with the reason before anything is queued, on ``/infer``, ``POST /jobs`` and
``/infer_file``; no job row is made, no model is loaded and the upload is cleaned up."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pydicom

from tests.support.series_cases import localizer, phantom_series

MISSING = "the series is incomplete: about 1 slice(s) missing between image 8 and image 10"


def _missing_slice_study(root: Path) -> Path:
    _, files = phantom_series(root / "ct", seed=41)
    files[8].unlink()
    return root


def _two_volumes_study(root: Path) -> Path:
    _, files = phantom_series(root / "ct", seed=42)
    for k in range(20):
        target = root / "ct" / f"COR{k}.dcm"
        localizer(files[k], target, other_matrix=True)
        ds = pydicom.dcmread(target)
        ds.ImagePositionPatient = [0, float(k), 0]
        ds.save_as(target)
    return root


def _no_jobs(node: Any) -> None:
    assert node.client.get("/jobs").json()["items"] == []
    stats = node.context.inference_engine.cache.stats
    assert (stats.hits, stats.misses, stats.loads) == (0, 0, 0)


def test_refused_series_answer_400_before_queuing(node: Any) -> None:
    studies = node.settings.data_dir / "studies"
    gap = _missing_slice_study(studies / "gap")
    body = {"nnunet_id": "phantom", "study_path": str(gap), "series_folders": ["ct"]}
    for endpoint in ("/infer", "/jobs"):
        answer = node.client.post(endpoint, json=body)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error.startswith("series_folders[0][0]: series 1 (Phantom CT): ")
        assert MISSING in error and "Send the complete series again" in error
    two = _two_volumes_study(studies / "two")
    answer = node.client.post("/infer", json={**body, "study_path": str(two)})
    assert answer.status_code == 400
    assert "holds more than one volume" in answer.json()["error"]
    _no_jobs(node)


def test_refused_upload_answers_400_and_leaves_nothing(node: Any, tmp_path: Path) -> None:
    gap = _missing_slice_study(tmp_path / "study")
    content = io.BytesIO()
    with zipfile.ZipFile(content, "w") as zf:
        for path in sorted((gap / "ct").iterdir()):
            zf.write(path, f"ct/{path.name}")
    answer = node.client.post(
        "/infer_file",
        data={"request": json.dumps({"nnunet_id": "phantom", "series_folders": ["ct"]})},
        files={"file": ("study.zip", content.getvalue(), "application/zip")},
    )
    assert answer.status_code == 400, answer.text
    assert MISSING in answer.json()["error"]
    uploads = node.settings.uploads_dir
    assert not [p for p in uploads.rglob("*") if p.is_file()], "the upload was left behind"
    _no_jobs(node)
