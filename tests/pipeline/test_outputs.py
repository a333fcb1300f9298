"""The download zip: the job's outputs under names relative to its output folder, built once."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from nnunet_node.core.errors import Conflict, NotFound
from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.outputs import build_zip, safe_arcname
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.jobs import ArtifactRecord, JobStore


@pytest.fixture
def store(toy_settings: Settings):
    engine = make_engine(toy_settings.database_url)
    yield JobStore(make_sessionmaker(engine))
    engine.dispose()


def _finished_job(store: JobStore, out: Path, files: dict[str, bytes], extra: list[Path] = ()):
    job = store.create(source="http", request={"nnunet_id": "toy"}, output_dir=str(out))
    store.claim_next()
    arts = []
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        arts.append(ArtifactRecord("nifti_prediction", str(path), 0))
    arts += [ArtifactRecord("dicom_segmentation", str(p), 0) for p in extra]
    return store.finish(job.id, {"status": "done"}, arts)


def test_zip_holds_outputs_under_relative_names(
    store: JobStore, toy_settings: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "studies" / "out"
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (out / "stage_1").mkdir(parents=True)
    (out / "stage_1" / "link.dcm").symlink_to(secret)  # a link that points out of the folder
    job = _finished_job(
        store,
        out,
        {"stage_0/prediction.nii.gz": b"nifti", "stage_0/prediction.dcm": b"DICM" * 100},
        extra=[out / "stage_1" / "link.dcm", secret, out / "stage_1" / "gone.dcm"],
    )
    path = build_zip(toy_settings, job)
    assert path == toy_settings.jobs_dir / job.id / f"{job.id}.zip"
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["stage_0/prediction.dcm", "stage_0/prediction.nii.gz"]
        assert zf.read("stage_0/prediction.nii.gz") == b"nifti"
        assert zf.testzip() is None
    # built once: a second call hands back the same file untouched
    mtime = path.stat().st_mtime_ns
    assert build_zip(toy_settings, store.get(job.id)) == path
    assert path.stat().st_mtime_ns == mtime


def test_zip_in_the_default_output_folder_does_not_hold_itself(
    store: JobStore, toy_settings: Settings
) -> None:
    job_id = "f" * 32
    out = toy_settings.jobs_dir / job_id
    job = store.create(
        job_id=job_id, source="http", request={"nnunet_id": "toy"}, output_dir=str(out)
    )
    store.claim_next()
    (out / "stage_0").mkdir(parents=True)
    (out / "stage_0" / "prediction.nii.gz").write_bytes(b"x")
    job = store.finish(
        job_id,
        {"status": "done"},
        [ArtifactRecord("nifti_prediction", str(out / "stage_0" / "prediction.nii.gz"))],
    )
    with zipfile.ZipFile(build_zip(toy_settings, job)) as zf:
        assert zf.namelist() == ["stage_0/prediction.nii.gz"]


def test_unfinished_or_empty_jobs_have_no_zip(
    store: JobStore, toy_settings: Settings, tmp_path: Path
) -> None:
    job = store.create(source="http", request={"nnunet_id": "toy"})
    with pytest.raises(Conflict, match="queued"):
        build_zip(toy_settings, job)
    store.claim_next()
    job = store.finish(job.id, {"status": "done"}, [])
    with pytest.raises(NotFound, match="no output"):
        build_zip(toy_settings, job)


def test_safe_arcname(tmp_path: Path) -> None:
    root = tmp_path / "out"
    (root / "a").mkdir(parents=True)
    assert safe_arcname(root / "a" / "b.nii.gz", root) == "a/b.nii.gz"
    assert safe_arcname(root / ".." / "x", root) is None
    assert safe_arcname(root, root) is None
    assert safe_arcname(Path("/etc/passwd"), root) is None
