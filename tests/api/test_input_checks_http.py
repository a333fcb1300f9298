"""Inputs that cannot make a job are refused with 400 before any job row exists, over HTTP.

A series entry (or ``crop_from``/``intersect_with``) that is a folder holding no DICOM series and
no image file, a folder of two image files, a file no image reader recognises, or, with
``is_dicom``, a first input that is not a DICOM series: each is found from names and headers
alone (no pixel data decoded) on ``/infer``, ``POST /jobs`` and ``/infer_file``. The answer names
the field, the folder and what was missing; no job row is made and no model is loaded.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_node import LiveNode


@pytest.fixture(scope="module")
def folders(study: Any) -> Path:
    """The module's phantom study with folders that cannot be series beside its good ones."""
    root = Path(study.root)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("the scan is in the other folder\n")
    (root / "empty").mkdir()
    (root / "two_images").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(root / "ct_nifti" / "image.nii.gz", root / "two_images" / name)
    (root / "fake").mkdir()
    (root / "fake" / "image.nii.gz").write_bytes(b"not a NIfTI file at all")
    return root


def _cases(root: Path) -> list[tuple[dict[str, Any], list[str]]]:
    good = {"nnunet_id": "phantom", "study_path": str(root), "series_folders": ["ct_nifti"]}
    dicom_file = sorted((root / "ct_dicom").iterdir())[0].name
    return [
        (
            {**good, "series_folders": ["notes"], "is_dicom": True},
            [
                "series_folders[0][0]",
                str(root / "notes"),
                "holds neither a DICOM series nor an image file",
                "readme.txt",
            ],
        ),
        ({**good, "series_folders": ["empty"]}, [str(root / "empty"), "it is empty"]),
        (
            {**good, "is_dicom": True},
            [str(root / "ct_nifti"), "holds no DICOM series, only image.nii.gz", "is_dicom"],
        ),
        ({**good, "series_folders": ["two_images"]}, ["holds 2 image files"]),
        ({**good, "series_folders": ["fake"]}, [str(root / "fake"), "not an image file"]),
        ({**good, "series_folders": ["notes/readme.txt"]}, ["readme.txt", "not an image file"]),
        (
            {**good, "series_folders": [f"ct_dicom/{dicom_file}"], "is_dicom": True},
            [dicom_file, "is a file", "is_dicom"],
        ),
        ({**good, "crop_from": "notes"}, ["crop_from[0]", "holds neither a DICOM series"]),
        ({**good, "intersect_with": "empty"}, ["intersect_with[0]", "it is empty"]),
    ]


def _no_jobs(node: LiveNode) -> None:
    listed = node.client.get("/jobs").json()
    assert listed["total"] == 0, listed
    stats = node.context.inference_engine.cache.stats
    assert (stats.hits, stats.misses, stats.loads) == (0, 0, 0)
    jobs_dir = node.settings.jobs_dir
    assert not jobs_dir.exists() or not any(jobs_dir.iterdir())


@pytest.mark.parametrize("endpoint", ["/infer", "/jobs"])
def test_inputs_that_hold_no_series_answer_400_before_any_job(
    node: LiveNode, folders: Path, endpoint: str
) -> None:
    for body, expected in _cases(folders):
        answer = node.client.post(endpoint, json=body)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()
        assert error["status"] == "failed"
        for part in expected:
            assert part in error["error"], (part, error["error"])
    _no_jobs(node)


def test_upload_without_a_series_answers_400_and_leaves_nothing(node: LiveNode) -> None:
    content = io.BytesIO()
    with zipfile.ZipFile(content, "w") as zf:
        zf.writestr("study/ct/readme.txt", "no images here\n")
        zf.writestr("study/ct/report.pdf", b"%PDF-1.4")
    request = {"nnunet_id": "phantom", "series_folders": ["ct"], "is_dicom": True}
    answer = node.client.post(
        "/infer_file",
        data={"request": json.dumps(request)},
        files={"file": ("study.zip", content.getvalue(), "application/zip")},
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error.startswith("series_folders[0][0]: ")
    assert "holds neither a DICOM series nor an image file" in error
    assert "readme.txt" in error and "report.pdf" in error
    uploads = node.settings.uploads_dir
    assert not [p for p in uploads.rglob("*") if p.is_file()], "the upload was left behind"
    _no_jobs(node)
