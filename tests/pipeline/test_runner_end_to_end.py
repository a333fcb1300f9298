"""Whole jobs on the committed demo models through the real context: NIfTI inputs, DICOM inputs
from the archive (as a DIMSE route submits them), a DICOM cascade from a study folder, an empty
prediction, and a series whose files are gone. One node for the module, so the predictor cache is
shared by all tests.
"""

from __future__ import annotations

import asyncio
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import RTStructureSetStorage, SegmentationStorage
from sqlalchemy import select

from nnunet_node.core.phantom import Phantom, make_phantom, to_sitk, write_dicom_series, write_nifti
from nnunet_node.pipeline.context import NodeContext
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.jobs import JobRecord
from nnunet_node.storage.models import Instance, Series, Study
from tests.support.demo_node import demo_node

SHAPE = (40, 48, 48)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeContext]:
    with demo_node(tmp_path_factory.mktemp("node")) as context:
        yield context


@pytest.fixture(scope="module")
def studies(node: NodeContext) -> Path:
    return node.settings.allowed_roots[0]


def run_job(node: NodeContext, request: dict[str, Any], **kw: Any) -> JobRecord:
    job_id = node.job_service.submit(request, **kw)
    return asyncio.run(node.job_service.wait(job_id, timeout=300))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def zip_names(node: NodeContext, job_id: str) -> list[str]:
    with zipfile.ZipFile(node.job_service.zip_path(job_id)) as zf:
        return sorted(zf.namelist())


def phantom(seed: int) -> Phantom:
    return make_phantom(seed, shape=SHAPE)


def test_nifti_job(node: NodeContext, studies: Path) -> None:
    ph = phantom(101)
    write_nifti(ph, studies / "nifti" / "ct" / "image.nii.gz")
    view = run_job(
        node,
        {
            "nnunet_id": "phantom",
            "study_path": str(studies / "nifti"),
            "series_folders": ["ct"],
            "proba_threshold": 0.5,
            "save_proba_map": True,
            "save_nifti_inputs": True,
            "suffix": "v1",
        },
    )
    assert view.status == "done", view.error
    result = view.result
    assert result is not None
    out = node.settings.jobs_dir / view.id / "stage_0"
    assert result["nifti_prediction"] == [str(out / "prediction_v1.nii.gz")]
    assert result["nifti_proba"] == [str(out / "proba_v1.nii.gz")]
    assert result["nifti_inputs"] == [str(out / "input_0_v1.nii.gz")]
    assert result["dicom_segmentation"] == result["dicom_struct"] == []
    assert result["dicom_fractional_segmentation"] == []
    assert result["nnunet_path"].endswith(
        "Dataset501_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres"
    )
    assert result["time_elapsed"] > 0
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(result["nifti_prediction"][0]))
    assert dice(predicted == 1, ph.labels == 1) > 0.8
    assert dice(predicted == 2, ph.labels == 2) > 0.8
    assert sorted(a.kind for a in view.artifacts) == [
        "nifti_inputs",
        "nifti_prediction",
        "nifti_proba",
    ]
    assert zip_names(node, view.id) == [
        "run.json",
        "stage_0/input_0_v1.nii.gz",
        "stage_0/prediction_v1.nii.gz",
        "stage_0/proba_v1.nii.gz",
    ]


def test_archive_job_writes_seg_rtstruct_and_files_them(node: NodeContext, tmp_path: Path) -> None:
    ph = phantom(202)
    files = write_dicom_series(ph, tmp_path / "ct", patient_id="PAT-7")
    for path in files:
        node.archive.ingest(path, source="dimse", calling_ae="SCANNER", called_ae="NNUNET_NODE")
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    view = run_job(
        node,
        {
            "nnunet_id": "phantom",
            "save_rt_struct_output": True,
            "save_proba_map": True,
            "proba_threshold": 0.5,
        },
        source="dimse",
        series_uids=[source.SeriesInstanceUID],
        route_name="phantom-ct",
    )
    assert view.status == "done", view.error
    assert view.study_instance_uid == source.StudyInstanceUID
    assert view.patient_id == "PAT-7"
    assert view.series_uids == (source.SeriesInstanceUID,) and view.input_kind == "archive"
    result = view.result
    assert result is not None
    assert result["metadata"]["algorithm_name"] == "nnU-Net phantom"
    out = node.settings.jobs_dir / view.id / "stage_0"
    assert result["dicom_segmentation"] == [str(out / "prediction.dcm")]
    assert result["dicom_struct"] == [str(out / "struct.dcm")]
    assert result["dicom_fractional_segmentation"] == [str(out / "proba.dcm")]

    seg = pydicom.dcmread(out / "prediction.dcm")
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Sphere", "Cube"]
    frac = pydicom.dcmread(out / "proba.dcm")
    assert frac.SegmentationType == "FRACTIONAL"
    rt = pydicom.dcmread(out / "struct.dcm")
    assert rt.SOPClassUID == RTStructureSetStorage
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["Sphere", "Cube"]

    # every DICOM output is in the archive, in the source study, and listed as an artifact
    with unit_of_work(node.session_factory) as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.source)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Study.study_instance_uid == source.StudyInstanceUID, Instance.source == "job")
        ).all()
    archived = {uid: cls for uid, cls, _ in rows}
    by_kind = {a.kind: a for a in view.artifacts}
    for kind, ds in (
        ("dicom_segmentation", seg),
        ("dicom_struct", rt),
        ("dicom_fractional_segmentation", frac),
    ):
        assert by_kind[kind].sop_instance_uid == ds.SOPInstanceUID
        assert by_kind[kind].series_instance_uid == ds.SeriesInstanceUID
        assert archived[ds.SOPInstanceUID] == ds.SOPClassUID
    assert len(archived) == 3

    assert not (node.settings.jobs_dir / view.id / "inputs").exists()  # exported copies gone
    names = zip_names(node, view.id)
    assert "stage_0/prediction.dcm" in names and "stage_0/struct.dcm" in names
    assert not any(n.startswith("inputs/") or n.startswith("/") or ".." in n for n in names)


def test_dicom_cascade_from_a_study_folder(node: NodeContext, studies: Path) -> None:
    cube_model = node.spec.registry.resolve("phantom_cube")
    if not node.spec.registry.files(cube_model).available:
        pytest.skip("the phantom_cube demo model is not built")
    ph = phantom(303)
    write_dicom_series(ph, studies / "cascade" / "ct")
    view = run_job(
        node,
        {
            "nnunet_id": ["phantom", "phantom_cube"],
            "study_path": str(studies / "cascade"),
            "series_folders": [["ct"], ["ct", "from:phantom"]],
            "is_dicom": True,
            "save_rt_struct_output": True,
        },
    )
    assert view.status == "done", view.error
    result = view.result
    assert result is not None
    assert len(result["nnunet_path"]) == 2 and len(result["metadata"]) == 2
    segs = [pydicom.dcmread(p) for p in result["dicom_segmentation"]]
    assert [Path(p).parent.name for p in result["dicom_segmentation"]] == ["stage_0", "stage_1"]
    assert [[s.SegmentLabel for s in ds.SegmentSequence] for ds in segs] == [
        ["Sphere", "Cube"],
        ["Cube"],
    ]
    assert len(result["dicom_struct"]) == 2
    # HTTP jobs on DICOM inputs file their results in the archive too
    with unit_of_work(node.session_factory) as session:
        archived = set(
            session.scalars(
                select(Instance.sop_instance_uid)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .where(Study.study_instance_uid == segs[0].StudyInstanceUID)
            )
        )
    assert {a.sop_instance_uid for a in view.artifacts if a.kind.startswith("dicom")} == archived
    assert len(archived) == 4
    cube = sitk.GetArrayFromImage(sitk.ReadImage(result["nifti_prediction"][1]))
    assert dice(cube == 1, ph.labels == 2) > 0.8


def test_an_empty_prediction_writes_no_dicom_and_says_so(node: NodeContext, studies: Path) -> None:
    ph = phantom(404)
    write_dicom_series(ph, studies / "empty" / "ct")
    # every component must lie inside an empty mask: nothing is left, whatever the model saw
    _, labels = to_sitk(ph)
    sitk.WriteImage(labels * 0, str(studies / "empty" / "nothing.nii.gz"))
    view = run_job(
        node,
        {
            "nnunet_id": "phantom",
            "study_path": str(studies / "empty"),
            "series_folders": ["ct"],
            "intersect_with": "nothing.nii.gz",
            "is_dicom": True,
            "save_rt_struct_output": True,
        },
    )
    assert view.status == "done", view.error
    result = view.result
    assert result is not None
    assert result["dicom_segmentation"] == [] and result["dicom_struct"] == []
    assert any("empty" in w and "no SEG" in w for w in result["warnings"])
    assert len(result["nifti_prediction"]) == 1
    assert not sitk.GetArrayFromImage(sitk.ReadImage(result["nifti_prediction"][0])).any()


def test_a_series_whose_files_are_gone_fails_cleanly(node: NodeContext, tmp_path: Path) -> None:
    files = write_dicom_series(phantom(505), tmp_path / "ct")
    results = [node.archive.ingest(p, source="dimse") for p in files]
    results[3].path.unlink()  # the disk lost a file after it was acknowledged
    view = run_job(
        node, {"nnunet_id": "phantom"}, source="dimse", series_uids=[results[0].series_instance_uid]
    )
    assert view.status == "failed"
    assert view.error is not None and "missing" in view.error
    assert results[3].sop_instance_uid in view.error
    assert view.result is None and view.artifacts == ()
