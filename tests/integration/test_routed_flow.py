"""The whole DIMSE flow with real parts: storescu sends a phantom CT series, the routing rule runs
the committed `phantom` model, SEG and RTSTRUCT land in the archive and at the rule's destination
(a dcmtk storescp) on their own; findscu, movescu and getscu then serve them like any series.
Also: a restart during the quiet period still routes the series and runs its job."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.storage.jobs import JobRecord
from nnunet_node.storage.models import Instance, Job, JobStatus, Series
from tests.node.peers import free_port, received, storescp
from tests.support.dcmtk import dcmtk, get_series, retrieve, storescu
from tests.support.routed import DimseNode, dimse_settings, routed_spec

REPO = Path(__file__).resolve().parents[2]


def phantom_ct(folder: Path, seed: int) -> list[Path]:
    # 32^3 voxels: one sliding window of the demo model's 32^3 patch (fast on 2 cores).
    phantom = make_phantom(seed, shape=(32, 32, 32), spacing=(1.2, 1.2, 1.5))
    return write_dicom_series(phantom, folder / "ct")


@dataclass
class Flow:
    node: DimseNode
    job: JobRecord
    pacs: Path
    move_port: int
    study_uid: str
    series_uid: str
    result_series: dict[str, str]  # modality -> series UID


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    tmp = tmp_path_factory.mktemp("flow")
    pacs_port, move_port = free_port(), free_port()
    node = DimseNode(dimse_settings(tmp, routed_spec(tmp, pacs_port, move_port=move_port, quiet=1)))
    try:
        with storescp(tmp / "pacs", port=pacs_port):
            files = phantom_ct(tmp, seed=11)
            storescu(node.port, files[0].parent)
            job = node.wait_job()
            assert job.status == JobStatus.DONE, job.error
            node.wait_dispatched(job.id)  # the dispatcher sends on its own
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        with node.context.session_factory() as session:
            rows = session.execute(
                select(Series.modality, Series.series_instance_uid)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Instance.source == "job")
            ).all()
        yield Flow(
            node,
            job,
            tmp / "pacs",
            move_port,
            first.StudyInstanceUID,
            first.SeriesInstanceUID,
            {modality: uid for modality, uid in rows},
        )
    finally:
        node.stop()


def test_rule_made_a_dimse_job_with_seg_and_rtstruct(flow: Flow) -> None:
    job = flow.job
    assert job.source == "dimse" and job.route_name == "phantom-ct"
    assert job.series_uids == (flow.series_uid,) and job.study_instance_uid == flow.study_uid
    assert job.result is not None and job.result["dicom_segmentation"]
    assert job.result["dicom_struct"]
    assert set(flow.result_series) == {"SEG", "RTSTRUCT"}  # ingested as new series of the study
    assert len(flow.node.jobs()) == 1  # one rule, one job


def test_rule_destination_received_the_results_on_its_own(flow: Flow) -> None:
    got = received(flow.pacs)
    modalities = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in got)
    assert modalities == ["RTSTRUCT", "SEG"]
    with flow.node.context.session_factory() as session:
        job = session.get(Job, flow.job.id)
        assert job is not None
        assert [(d.destination, d.status.value) for d in job.dispatches] == [("PACS", "sent")]


def _find(port: int, *keys: str) -> list[str]:
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    result = dcmtk("findscu", "-v", "-S", "-aec", "NNUNET_NODE", *args, "127.0.0.1", str(port))
    assert "Received Final Find Response (Success)" in result.stdout, result.stdout
    return result.stdout.split("Find Response: ")[1:]


def test_findscu_finds_the_results_at_every_level(flow: Flow) -> None:
    port = flow.node.port
    (study,) = _find(
        port, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={flow.study_uid}", "ModalitiesInStudy"
    )
    assert "SEG" in study and "RTSTRUCT" in study and "CT" in study
    series = _find(
        port,
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={flow.study_uid}",
        "SeriesInstanceUID",
        "Modality",
    )
    assert len(series) == 3
    images = _find(
        port,
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={flow.study_uid}",
        f"SeriesInstanceUID={flow.result_series['SEG']}",
        "SOPInstanceUID",
        "SOPClassUID",
    )
    assert len(images) == 1 and "=SegmentationStorage" in images[0]


def test_movescu_moves_the_results_to_a_storescp(flow: Flow, tmp_path: Path) -> None:
    with storescp(tmp_path / "moved", ae_title="MOVEDEST", port=flow.move_port):
        for uid in flow.result_series.values():
            result = retrieve(
                "movescu",
                flow.node.port,
                "-S",
                "-aem",
                "MOVEDEST",
                QueryRetrieveLevel="SERIES",
                StudyInstanceUID=flow.study_uid,
                SeriesInstanceUID=uid,
            )
            assert "Received Final Move Response (Success)" in result.stdout, result.stdout
    files = received(tmp_path / "moved")
    assert len(files) == 2
    for path in files:
        dump = dcmtk("dcmdump", "-q", str(path))
        assert dump.returncode == 0, dump.stdout
    assert sorted(pydicom.dcmread(p).Modality for p in files) == ["RTSTRUCT", "SEG"]


def test_getscu_gets_the_seg(flow: Flow, tmp_path: Path) -> None:
    keys = {
        "QueryRetrieveLevel": "SERIES",
        "StudyInstanceUID": flow.study_uid,
        "SeriesInstanceUID": flow.result_series["SEG"],
    }
    got = get_series(flow.node.port, tmp_path / "got", keys, "-S")
    assert got.returncode == 0, got.output
    (seg,) = got.files
    ds = pydicom.dcmread(seg)
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == flow.study_uid


def test_restart_during_quiet_period_still_runs_the_job(tmp_path: Path) -> None:
    spec = routed_spec(tmp_path, free_port(), move_port=free_port(), quiet=4)
    settings = dimse_settings(tmp_path, spec)
    node = DimseNode(settings)
    try:
        files = phantom_ct(tmp_path, seed=12)
        storescu(node.port, files[0].parent)
        assert node.jobs() == []  # still quiet
    finally:
        node.stop()  # the node goes down before the series is complete
    restarted = DimseNode(settings)
    try:
        job = restarted.wait_job()
        assert job.status == JobStatus.DONE, job.error
        assert job.route_name == "phantom-ct" and len(restarted.jobs()) == 1
    finally:
        restarted.stop()


def test_demo_sends_a_phantom_study_and_reports_the_results(
    flow: Flow, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from nnunet_node.node.demo import run_demo

    settings = flow.node.context.settings
    # No HTTP API in this process: the demo reads the job from the database instead. Nothing
    # listens at the rule's destination PACS: the demo stands in for it and sees the results.
    with caplog.at_level("INFO"):
        code = run_demo(
            settings,
            "127.0.0.1",
            flow.node.port,
            free_port(),
            timeout_s=180,
            phantom_shape=(32, 32, 32),
        )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "DICOM-SEG:" in out and "RTSTRUCT:" in out and "read via database" in out
    assert "listening as the rule's destination PACS" in out
    received_lines = out.split("5. received at PACS")[1].splitlines()[1:]
    assert sorted(line.split()[0] for line in received_lines if line.startswith("   ")) == [
        "RTSTRUCT",
        "SEG",
    ]
    assert all("from NNUNET_NODE" in line for line in received_lines if line.startswith("   "))
    assert [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []
