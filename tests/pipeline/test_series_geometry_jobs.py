"""Whole jobs on series as hospitals send them (README "Series geometry"), on the committed demo
models through the real context: repeated positions, localizers, uneven spacing and gantry tilt
end `done` with the decisions in ``warnings``, a prediction that matches the phantom, and a SEG
and RTSTRUCT that pass dciodvfy and reference exactly the instances the volume was built from;
a missing slice or two volumes in one series fail the job before any model is loaded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nnunet_node.core.errors import InvalidRequest
from nnunet_node.core.phantom import SPHERE_LABEL
from nnunet_node.pipeline.context import NodeContext
from nnunet_node.storage.jobs import JobRecord
from tests.export.export_helpers import dciodvfy
from tests.support.demo_node import demo_node
from tests.support.series_cases import (
    copy_instance,
    localizer,
    nifti_centroid,
    phantom_series,
    repeat_instance,
    rtstruct_references,
    seg_centroid,
    seg_references,
    sop_uid,
    tilted_series,
    uneven_series,
)

pytestmark = pytest.mark.slow

DICOM_ARGS = {"nnunet_id": "phantom", "is_dicom": True, "save_rt_struct_output": True}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeContext]:
    with demo_node(tmp_path_factory.mktemp("geometry")) as context:
        yield context


@pytest.fixture(scope="module")
def studies(node: NodeContext) -> Path:
    return node.settings.allowed_roots[0]


def run(node: NodeContext, study: Path, **extra: Any) -> JobRecord:
    job_id = node.job_service.submit(
        {**DICOM_ARGS, "study_path": str(study), "series_folders": ["ct"], **extra}
    )
    return asyncio.run(node.job_service.wait(job_id, timeout=300))


def run_archived(node: NodeContext, folder: Path) -> JobRecord:
    """As a route submits it: the files archived, the job naming their series."""
    uids = set()
    for path in sorted(folder.iterdir()):
        ingested = node.archive.ingest(path, source="dimse", calling_ae="CT1")
        uids.add(ingested.series_instance_uid)
    job_id = node.job_service.submit(DICOM_ARGS, source="dimse", series_uids=sorted(uids))
    return asyncio.run(node.job_service.wait(job_id, timeout=300))


def outputs(view: JobRecord) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """The job's SEG and RTSTRUCT, each checked by dciodvfy."""
    assert view.status == "done", view.error
    result = view.result
    assert result is not None
    (seg_path,) = result["dicom_segmentation"]
    (rt_path,) = result["dicom_struct"]
    for path in (seg_path, rt_path):
        assert dciodvfy(Path(path)) == [], path
    return pydicom.dcmread(seg_path), pydicom.dcmread(rt_path)


def assert_references_exactly(view: JobRecord, kept: set[str]) -> None:
    seg, rt = outputs(view)
    listed, frames = seg_references(seg)
    assert listed == kept
    assert frames <= kept and frames
    listed, contours = rtstruct_references(rt)
    assert listed == kept
    assert contours <= kept and contours


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * int((a & b).sum()) / max(int(a.sum()) + int(b.sum()), 1)


def prediction(view: JobRecord) -> sitk.Image:
    assert view.result is not None
    return sitk.ReadImage(view.result["nifti_prediction"][0])


def cache_use(node: NodeContext) -> tuple[int, int, int]:
    stats = node.inference_engine.cache.stats
    return stats.hits, stats.misses, stats.loads


def test_repeated_positions_identical_and_different(node: NodeContext, studies: Path) -> None:
    folder = studies / "repeats" / "ct"
    ph, files = phantom_series(folder, seed=11)
    originals = [sop_uid(f) for f in files]
    # two true repeats (later acquisition, other pixels) and two identical copies
    repeat_a = repeat_instance(files[10], folder / "R1.dcm", 101, acquisition=2)
    repeat_b = repeat_instance(files[20], folder / "R2.dcm", 102, acquisition=2)
    copy_instance(files[5], folder / "C1.dcm", InstanceNumber=103)
    copy_instance(files[6], folder / "C2.dcm", InstanceNumber=6)
    view = run(node, folder.parent)
    warnings = " ".join(view.result["warnings"]) if view.result else ""
    assert "2 identical copies" in warnings
    assert "2 slice position(s) hold repeated images" in warnings
    assert "image 101 kept over image 11" in warnings and "image 102 kept over image 21" in warnings
    image = prediction(view)
    assert image.GetSpacing() == pytest.approx(ph.spacing)
    assert image.GetSize() == (32, 32, 32)
    assert dice(sitk.GetArrayFromImage(image) == 1, ph.labels == 1) > 0.8
    seg, _ = outputs(view)
    listed, _ = seg_references(seg)
    # the repeats replaced slices 11 and 21; of each copied pair one image is referenced
    assert repeat_a in listed and repeat_b in listed
    assert originals[10] not in listed and originals[20] not in listed
    assert len(listed) == 32
    assert_references_exactly(view, listed)


def test_localizers_of_same_and_other_matrix_are_left_out(node: NodeContext, studies: Path) -> None:
    folder = studies / "localizers" / "ct"
    ph, files = phantom_series(folder, seed=32)
    same = localizer(files[3], folder / "L1.dcm", other_matrix=False)
    other = localizer(files[0], folder / "L2.dcm", other_matrix=True)
    view = run(node, folder.parent)
    assert view.result is not None
    warnings = " ".join(view.result["warnings"])
    assert "1 localizer image(s) (ImageType LOCALIZER) left out: image 900" in warnings
    assert "1 coronal image(s) of 40x24 pixels" in warnings and "image 901" in warnings
    image = prediction(view)
    assert image.GetSpacing() == pytest.approx(ph.spacing)  # z spacing not spoilt
    assert dice(sitk.GetArrayFromImage(image) == 1, ph.labels == 1) > 0.8
    kept = {sop_uid(f) for f in files}
    assert same not in kept and other not in kept
    assert_references_exactly(view, kept)


def test_uneven_spacing_is_resampled_and_exported_on_the_source_slices(
    node: NodeContext, studies: Path
) -> None:
    folder = studies / "uneven" / "ct"
    ph, files, indices = uneven_series(folder, seed=33)
    view = run(node, folder.parent)
    assert view.result is not None
    assert any("varies from 1.50 to 2.00 mm" in w for w in view.result["warnings"])
    image = prediction(view)
    # the median gap (gaps of 1.5 and 2.0 mm in turn)
    assert image.GetSpacing()[2] == pytest.approx(0.5 * float(np.median(np.diff(indices))))
    kept = {sop_uid(f) for f in files}
    assert_references_exactly(view, kept)
    # the SEG on the source slices matches the phantom's labels at those slices
    seg, _ = outputs(view)
    order = {sop_uid(f): i for i, f in enumerate(files)}
    mask = np.zeros((len(files), 32, 32), dtype=bool)
    for frame, plane in zip(
        seg.PerFrameFunctionalGroupsSequence, seg.pixel_array.reshape(-1, 32, 32), strict=True
    ):
        if int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != 1:
            continue
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        mask[order[str(source.ReferencedSOPInstanceUID)]] |= plane > 0
    assert dice(mask, ph.labels[indices] == SPHERE_LABEL) > 0.8


def test_gantry_tilt_puts_the_sphere_where_it_is(node: NodeContext, studies: Path) -> None:
    folder = studies / "tilt" / "ct"
    truth, files = tilted_series(folder, seed=34, degrees=12.0)
    view = run(node, folder.parent, save_proba_map=True, proba_threshold=0.5)
    assert view.result is not None
    assert any("gantry tilt of 12.0 degrees" in w for w in view.result["warnings"])
    image = prediction(view)
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1), abs=1e-6)
    predicted = nifti_centroid(Path(view.result["nifti_prediction"][0]), SPHERE_LABEL)
    assert np.linalg.norm(predicted - truth) < 2.0, (predicted, truth)
    seg, _ = outputs(view)
    sphere = next(int(s.SegmentNumber) for s in seg.SegmentSequence if s.SegmentLabel == "Sphere")
    assert np.linalg.norm(seg_centroid(seg, sphere) - truth) < 2.0
    kept = {sop_uid(f) for f in files}
    assert_references_exactly(view, kept)
    # the probabilities, too, are mapped back onto the tilted source slices
    (proba_path,) = view.result["dicom_fractional_segmentation"]
    assert dciodvfy(Path(proba_path)) == []
    fractional = pydicom.dcmread(proba_path)
    listed, frames = seg_references(fractional)
    assert listed == kept and frames <= kept


def _missing_slice(folder: Path) -> None:
    _, files = phantom_series(folder, seed=35)
    files[12].unlink()


def _two_volumes(folder: Path) -> None:
    _, files = phantom_series(folder, seed=36)
    for k in range(20):
        localizer(files[k], folder / f"COR{k}.dcm", other_matrix=True)
        ds = pydicom.dcmread(folder / f"COR{k}.dcm")
        ds.ImagePositionPatient = [0, float(k), 0]
        ds.save_as(folder / f"COR{k}.dcm")


def _only_localizers(folder: Path) -> None:
    _, files = phantom_series(folder, seed=37)
    for path in files[1:]:
        path.unlink()
    ds = pydicom.dcmread(files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(files[0])


REFUSED: dict[str, tuple[Any, str]] = {
    "missing slice": (
        _missing_slice,
        "the series is incomplete: about 1 slice(s) missing between image 12 and image 14",
    ),
    "two volumes": (_two_volumes, "holds more than one volume"),
    "only localizers": (_only_localizers, "holds only localizer images"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_series_fail_before_any_model_is_loaded(
    node: NodeContext, tmp_path: Path, studies: Path, case: str
) -> None:
    make, reason = REFUSED[case]
    make(tmp_path / "ct")
    before = cache_use(node)
    view = run_archived(node, tmp_path / "ct")  # checked when the job starts
    assert view.status == "failed"
    assert view.error is not None and reason in view.error, view.error
    assert "series 1 (Phantom CT)" in view.error
    # The node filled in the archive job's series folders: the message names no request field.
    assert "series_folders" not in view.error, view.error
    assert cache_use(node) == before  # the predictor cache was not touched
    assert view.artifacts == ()
    # a study folder is checked at submission: no job at all
    shutil_target = studies / f"refused-{case.replace(' ', '-')}"
    make(shutil_target / "ct")
    with pytest.raises(InvalidRequest, match=reason.split(":")[0]):
        node.job_service.submit(
            {**DICOM_ARGS, "study_path": str(shutil_target), "series_folders": ["ct"]}
        )
    assert cache_use(node) == before
