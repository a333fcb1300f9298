"""Routed jobs on series in character sets that highdicom refuses as they are (ISO 2022 code
extensions, GB18030 written as UTF-8, an unknown term): each job ends done, its SEG and RTSTRUCT
pass dciodvfy and carry the source's patient name, and a fallback is noted in the job's warnings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.storage.models import Job, JobStatus
from tests.charsets import CASES, PLACEHOLDER, CharsetCase, recode
from tests.export.export_helpers import dciodvfy
from tests.node.peers import free_port
from tests.support.dcmtk import storescu
from tests.support.routed import DimseNode, dimse_settings, routed_spec

ROUTED = [c for c in CASES if c.id in ("ISO 2022 IR 87", "ISO 2022 IR 149", "unknown term")]


def _wait_for(node: DimseNode, patient_id: str, timeout: float = 180) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in node.jobs():
            finished = job.status in (JobStatus.DONE, JobStatus.FAILED)
            if job.patient_id == patient_id and finished:
                return job
        time.sleep(0.2)
    raise AssertionError(f"no finished job for {patient_id}: {node.jobs()}")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Job]]:
    tmp = tmp_path_factory.mktemp("routed-charsets")
    spec_path = routed_spec(tmp, free_port(), move_port=free_port(), quiet=1)
    spec = yaml.safe_load(spec_path.read_text())
    spec["routes"][0]["destinations"] = []
    spec_path.write_text(yaml.safe_dump(spec))
    node = DimseNode(dimse_settings(tmp, spec_path))
    out: dict[str, Job] = {}
    try:
        for index, case in enumerate(ROUTED):
            phantom = make_phantom(20 + index, shape=(32, 32, 32), spacing=(1.2, 1.2, 1.5))
            files = write_dicom_series(
                phantom, tmp / f"ct{index}", patient_id=f"RC{index}", patient_name=PLACEHOLDER
            )
            for path in files:
                recode(path, case)
            storescu(node.port, files[0].parent)
            out[case.id] = _wait_for(node, f"RC{index}")
        yield out
    finally:
        node.stop()


@pytest.mark.slow
@pytest.mark.parametrize("case", ROUTED, ids=[c.id for c in ROUTED])
def test_routed_job_writes_valid_seg_and_rtstruct_with_the_name(
    jobs: dict[str, Job], case: CharsetCase
) -> None:
    job = jobs[case.id]
    assert job.status == JobStatus.DONE, job.error
    assert job.result is not None
    written = [*job.result["dicom_segmentation"], *job.result["dicom_struct"]]
    assert len(written) == 2
    for path in written:
        assert dciodvfy(Path(path)) == [], path
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == case.expected
        assert ds.SpecificCharacterSet == "ISO_IR 192"
    noted = [w for w in job.result.get("warnings", []) if "character set" in w]
    assert bool(noted) == (case.id == "unknown term"), noted
