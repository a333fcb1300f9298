"""A series stored by STOW-RS goes through the same series geometry check as any other way in:
one with a missing slice, routed by the demo spec's ``phantom-ct`` rule, fails its job with the
reason before any model is loaded."""

from __future__ import annotations

import time

import pydicom
import pytest

from tests.support.dicomweb import Node, write_phantom_study


@pytest.mark.slow
def test_stow_series_with_a_missing_slice_fails_its_job_before_any_model(
    node: Node, tmp_path_factory: pytest.TempPathFactory
) -> None:
    study = write_phantom_study(
        tmp_path_factory.mktemp("gap"), seed=23, patient_id="DW-23", description="Phantom CT"
    )
    stats = node.context.inference_engine.cache.stats
    before = (stats.hits, stats.misses, stats.loads)
    sent = [f for i, f in enumerate(study.files) if i != 20]  # image 21 never arrives
    node.dicomweb_client().store_instances([pydicom.dcmread(f) for f in sent])
    deadline = time.monotonic() + 240
    while True:
        jobs, _ = node.context.job_service.list(study_instance_uid=study.study_uid)
        if jobs and jobs[0].status not in ("queued", "running"):
            break
        assert time.monotonic() < deadline, "the routed job did not finish"
        time.sleep(0.5)
    (job,) = jobs
    assert (job.source, job.status) == ("stow", "failed")
    assert job.error is not None
    assert "series 1 (Phantom CT): the series is incomplete" in job.error
    assert "missing between image 20 and image 22" in job.error
    assert "series_folders" not in job.error, job.error  # a field the sender never wrote
    assert (stats.hits, stats.misses, stats.loads) == before  # no model was loaded
    assert job.artifacts == ()
