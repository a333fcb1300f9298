"""The whole DIMSE flow with real parts: storescu sends a phantom CT series, the routing rule runs
the committed `phantom` model, SEG and RTSTRUCT land in the archive and at the rule's destination
(a dcmtk storescp) on their own; findscu, movescu and getscu then serve them like any series.
Also: a restart during the quiet period still routes the series and runs its job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml
from sqlalchemy import select

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.core.settings import Settings
from nnunet_node.node.service import DimseService
from nnunet_node.pipeline.context import NodeContext, build_context
from nnunet_node.storage.jobs import JobRecord
from nnunet_node.storage.models import Instance, Job, JobStatus, Series
from tests.node.peers import free_port, received, storescp
from tests.support.dcmtk import dcmtk, retrieve

REPO = Path(__file__).resolve().parents[2]
ROUTE_ARGS = {"is_dicom": True, "save_rt_struct_output": True, "tta": False}


def write_spec(folder: Path, pacs_port: int, move_port: int, quiet: float) -> Path:
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    spec["model_folder"] = str(REPO / "models")
    spec["models"] = [m for m in spec["models"] if m["id"] == "phantom"]
    spec["destinations"] = {
        "PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "retry_delay_s": 0.5},
        "MOVEDEST": {"ae_title": "MOVEDEST", "host": "127.0.0.1", "port": move_port},
    }
    spec["routes"] = [
        {
            "name": "phantom-ct",
            "match": {"Modality": "CT", "SeriesDescription": "(?i).*phantom.*"},
            "nnunet_id": "phantom",
            "args": ROUTE_ARGS,
            "destinations": ["PACS"],
            "quiet_seconds": quiet,
        }
    ]
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Node:
    """A node as ``nnunet-node dicom`` builds it (context, job workers, DIMSE service)."""

    def __init__(self, settings: Settings) -> None:
        self.context: NodeContext = build_context(settings)
        self.service = DimseService(self.context)
        self.context.job_service.start()
        self.service.start_sync()

    @property
    def port(self) -> int:
        assert self.service.port is not None
        return self.service.port

    def stop(self) -> None:
        self.service.stop_sync()
        self.context.close()

    def jobs(self) -> list[JobRecord]:
        items, _ = self.context.job_service.list(limit=1000)
        return items[::-1]  # oldest first

    def wait_dispatched(self, job_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.context.job_service.get(job_id)
            if job.dispatches and all(d.status.value != "pending" for d in job.dispatches):
                return
            time.sleep(0.1)

    def wait_job(self, timeout: float = 120) -> JobRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if jobs and jobs[-1].status in (JobStatus.DONE, JobStatus.FAILED):
                return jobs[-1]
            time.sleep(0.2)
        raise AssertionError(f"no finished job: {[(j.id, j.status) for j in self.jobs()]}")


def settings_for(tmp: Path, spec: Path) -> Settings:
    return Settings(
        data_dir=tmp / "data",
        model_serve_spec=spec,
        dicom_host="127.0.0.1",
        dicom_port=0,
        device="cpu",
        min_free_disk_mb=0,
        series_quiet_s=30,
    )


def phantom_ct(folder: Path, seed: int) -> list[Path]:
    # 32^3 voxels: one sliding window of the demo model's 32^3 patch (fast on 2 cores).
    phantom = make_phantom(seed, shape=(32, 32, 32), spacing=(1.2, 1.2, 1.5))
    return write_dicom_series(phantom, folder / "ct")


def storescu(port: int, folder: Path) -> None:
    result = dcmtk("storescu", "+sd", "-aec", "NNUNET_NODE", "127.0.0.1", str(port), str(folder))
    assert result.returncode == 0, result.stdout


@dataclass
class Flow:
    node: Node
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
    node = Node(settings_for(tmp, write_spec(tmp, pacs_port, move_port, quiet=1)))
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
    out = tmp_path / "got"
    out.mkdir()
    result = retrieve(
        "getscu",
        flow.node.port,
        "-S",
        "-od",
        str(out),
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=flow.study_uid,
        SeriesInstanceUID=flow.result_series["SEG"],
    )
    assert result.returncode == 0, result.stdout
    (got,) = received(out)
    ds = pydicom.dcmread(got)
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == flow.study_uid


def test_restart_during_quiet_period_still_runs_the_job(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, free_port(), free_port(), quiet=4)
    settings = settings_for(tmp_path, spec)
    node = Node(settings)
    try:
        files = phantom_ct(tmp_path, seed=12)
        storescu(node.port, files[0].parent)
        assert node.jobs() == []  # still quiet
    finally:
        node.stop()  # the node goes down before the series is complete
    restarted = Node(settings)
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
