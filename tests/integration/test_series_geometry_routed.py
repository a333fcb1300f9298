"""A series as scanners send it, through a real C-STORE (dcmtk storescu) into the running node:
a phantom CT series holding a localizer, a true repeat and an identical copy. The routing rule's
job ends `done`, its result's ``warnings`` say what was left out and kept, and the SEG and
RTSTRUCT pass dciodvfy and reference exactly the instances the volume was built from."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from nnunet_node.storage.models import JobStatus
from tests.export.export_helpers import dciodvfy
from tests.node.peers import free_port
from tests.support.dcmtk import storescu
from tests.support.routed import DimseNode, dimse_settings, routed_spec
from tests.support.series_cases import (
    copy_instance,
    localizer,
    phantom_series,
    repeat_instance,
    rtstruct_references,
    seg_references,
    sop_uid,
)

pytestmark = pytest.mark.slow


def test_routed_series_with_localizer_repeat_and_copy(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    _, files = phantom_series(folder, seed=32)
    originals = [sop_uid(f) for f in files]
    scout = localizer(files[2], folder / "L1.dcm", other_matrix=False)
    repeat = repeat_instance(files[15], folder / "R1.dcm", 77, acquisition=2)
    copy_instance(files[4], folder / "C1.dcm", InstanceNumber=5)
    kept = {*originals, repeat} - {originals[15]}

    spec = routed_spec(tmp_path, free_port(), move_port=free_port(), quiet=1)
    node = DimseNode(dimse_settings(tmp_path, spec))
    try:
        storescu(node.port, folder)
        job = node.wait_job(timeout=240)
    finally:
        node.stop()
    assert job.status == JobStatus.DONE, job.error
    warnings = " ".join(job.result["warnings"])
    assert "localizer image(s) (ImageType LOCALIZER) left out: image 900" in warnings
    assert "image 77 kept over image 16" in warnings
    assert "1 identical copy" in warnings
    (seg_path,) = job.result["dicom_segmentation"]
    (rt_path,) = job.result["dicom_struct"]
    assert dciodvfy(Path(seg_path)) == [] and dciodvfy(Path(rt_path)) == []
    seg, rt = pydicom.dcmread(seg_path), pydicom.dcmread(rt_path)
    listed, frames = seg_references(seg)
    # of the two identical images at slice 5 either may be the one kept
    assert scout not in listed and originals[15] not in listed and repeat in listed
    assert len(listed) == 32 and listed - kept <= {sop_uid(folder / "C1.dcm")}
    assert frames <= listed
    rt_listed, contours = rtstruct_references(rt)
    assert rt_listed == listed and contours <= listed
