"""Series completion: quiet periods (global and per rule), one job per matching rule, later
instances (rerun or not), our own results never trigger, and state that survives a restart.

The job service is represented by a recorder that creates real job rows through JobStore (the
watcher's decisions are read back from the jobs table); the whole flow with the real JobService
runs in tests/integration.
"""

from __future__ import annotations

import io
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.pipeline.completion import CompletionWatcher, utcnow
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.jobs import JobRecord, JobStore
from nnunet_node.storage.models import InputKind, JobStatus, Series, Study

SPEC: dict[str, Any] = {
    "routes": [
        {
            "name": "ct-fast",
            "match": {"Modality": "CT", "SeriesDescription": "(?i).*phantom.*"},
            "nnunet_id": "phantom",
            "quiet_seconds": 2,
        },
        {
            "name": "ct-slow",
            "match": {"Modality": "CT", "called_ae": "SLOW"},
            "nnunet_id": "phantom",
            "quiet_seconds": 100,
        },
        {
            "name": "mr-once",
            "match": {"Modality": "MR"},
            "nnunet_id": "phantom",
            "rerun": False,
        },
    ]
}


class RecordingJobs:
    """JobService's submit/supersede over a real JobStore."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.store = JobStore(sessions)

    def submit(
        self, request: dict[str, Any], *, source: str, series_uids: list[str], route_name: str
    ) -> str:
        with self.sessions() as session:
            study = session.scalars(
                select(Study.study_instance_uid)
                .join(Series, Series.study_pk == Study.id)
                .where(Series.series_instance_uid == series_uids[0])
            ).one()
        job = self.store.create(
            source=source,
            request=request,
            input_kind=InputKind.ARCHIVE,
            series_uids=series_uids,
            route_name=route_name,
            study_instance_uid=study,
        )
        return job.id

    def supersede(self, old: str, new: str) -> Any:
        return self.store.supersede(old, new)

    def jobs(self) -> list[JobRecord]:
        items, _ = self.store.list(limit=1000)
        return items[::-1]  # oldest first


@pytest.fixture
def archive(tmp_path: Path, sessions: sessionmaker[Session]) -> Archive:
    return Archive(tmp_path / "dicom", sessions)


@pytest.fixture
def jobs(sessions: sessionmaker[Session]) -> RecordingJobs:
    return RecordingJobs(sessions)


def watcher(
    archive: Archive, jobs: RecordingJobs, spec: dict[str, Any] | None = None
) -> CompletionWatcher:
    return CompletionWatcher(
        archive.session_factory,
        archive.root,
        RoutingTable.from_spec(spec or SPEC),
        submit=jobs.submit,
        supersede=jobs.supersede,
        default_quiet_s=10,
    )


def instance(series_uid: str, study_uid: str, n: int, **attributes: Any) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.Modality, ds.InstanceNumber = "P1", "CT", n
    ds.SeriesDescription = "Phantom CT"
    for key, value in attributes.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def receive(
    archive: Archive,
    n: int = 3,
    *,
    source: str = "dimse",
    called: str = "NNUNET_NODE",
    **attrs: Any,
) -> str:
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        archive.ingest(
            instance(series, study, i, **attrs), source=source, calling_ae="CT1", called_ae=called
        )
    return series


def later(seconds: float):  # type: ignore[no-untyped-def]
    return utcnow() + timedelta(seconds=seconds)


def test_series_routes_once_after_its_quiet_period(archive: Archive, jobs: RecordingJobs) -> None:
    series = receive(archive)
    w = watcher(archive, jobs)
    assert w.check(later(0.5)) == []  # still within the quiet period
    made = w.check(later(3))
    assert len(made) == 1
    (job,) = jobs.jobs()
    assert job.route_name == "ct-fast" and job.series_uids == (series,) and job.source == "dimse"
    assert job.request == {"nnunet_id": "phantom", "is_dicom": True}
    assert w.check(later(4)) == []  # handled: no second job for the same arrival
    with archive.session_factory() as session:
        handled = session.scalars(select(Series.completion_handled_at)).one()
    assert handled is not None


def test_each_matching_rule_waits_its_own_quiet_period(
    archive: Archive, jobs: RecordingJobs
) -> None:
    receive(archive, called="SLOW")
    w = watcher(archive, jobs)
    assert len(w.check(later(3))) == 1  # ct-fast only; ct-slow still waits
    assert [j.route_name for j in jobs.jobs()] == ["ct-fast"]
    assert len(w.check(later(101))) == 1
    assert sorted(j.route_name or "" for j in jobs.jobs()) == ["ct-fast", "ct-slow"]
    assert w.check(later(200)) == []


def test_later_instances_run_again_and_supersede(archive: Archive, jobs: RecordingJobs) -> None:
    series = receive(archive)
    w = watcher(archive, jobs)
    (first,) = w.check(later(3))
    with archive.session_factory() as session:
        study = session.scalars(select(Study.study_instance_uid)).one()
    archive.ingest(instance(series, study, 9), source="dimse", called_ae="NNUNET_NODE")
    (second,) = w.check(later(3))
    assert second != first
    by_id = {j.id: j for j in jobs.jobs()}
    assert by_id[first].status == JobStatus.SUPERSEDED and by_id[first].superseded_by == second
    assert by_id[second].status == JobStatus.QUEUED


def test_rule_without_rerun_keeps_the_first_job(archive: Archive, jobs: RecordingJobs) -> None:
    series = receive(archive, Modality="MR")
    w = watcher(archive, jobs)
    assert len(w.check(later(11))) == 1  # default quiet period (10 s)
    with archive.session_factory() as session:
        study = session.scalars(select(Study.study_instance_uid)).one()
    archive.ingest(instance(series, study, 9, Modality="MR"), source="dimse")
    assert w.check(later(11)) == []
    assert [j.status for j in jobs.jobs()] == [JobStatus.QUEUED]


def test_our_own_results_and_unmatched_series_make_no_job(
    archive: Archive, jobs: RecordingJobs
) -> None:
    receive(archive, source="job")
    receive(archive, SeriesDescription="Liver", Modality="PT")
    assert watcher(archive, jobs).check(later(200)) == []
    assert jobs.jobs() == []
    with archive.session_factory() as session:
        assert None not in session.scalars(select(Series.completion_handled_at)).all()


def test_stow_series_make_stow_jobs(archive: Archive, jobs: RecordingJobs) -> None:
    receive(archive, source="stow")
    watcher(archive, jobs).check(later(3))
    assert [j.source for j in jobs.jobs()] == ["stow"]


def test_restart_after_job_created_but_before_marked_makes_no_duplicate(
    archive: Archive, jobs: RecordingJobs
) -> None:
    series = receive(archive)
    # The previous process created the job, then died before marking the series handled.
    jobs.submit(
        {"nnunet_id": "phantom"}, source="dimse", series_uids=[series], route_name="ct-fast"
    )
    assert watcher(archive, jobs).check(later(3)) == []  # a new watcher: state is in the DB
    assert len(jobs.jobs()) == 1


def test_restart_during_quiet_period_still_routes(archive: Archive, jobs: RecordingJobs) -> None:
    receive(archive)
    first = watcher(archive, jobs)
    assert first.check(later(1)) == []
    del first  # "restart"
    assert len(watcher(archive, jobs).check(later(3))) == 1


def test_watcher_thread_routes_on_its_own(archive: Archive, jobs: RecordingJobs) -> None:
    spec = {
        "routes": [
            {"name": "any", "match": {"Modality": "CT"}, "nnunet_id": "m", "quiet_seconds": 0.2}
        ]
    }
    w = watcher(archive, jobs, spec)
    receive(archive)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while not jobs.jobs():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        w.stop()
    assert len(jobs.jobs()) == 1


def test_waiting_lists_unrouted_series_with_their_rules_and_firing_times(
    archive: Archive, jobs: RecordingJobs
) -> None:
    slow = receive(archive, 3, called="SLOW")  # matches ct-fast (2 s) and ct-slow (100 s)
    ours = receive(archive, 2, source="job")  # a result of ours: never routed, never waiting
    w = watcher(archive, jobs)
    [entry] = w.waiting()
    assert entry.series_instance_uid == slow and ours != slow
    assert entry.instances == 3 and entry.calling_ae == "CT1" and entry.modality == "CT"
    fires = dict(entry.rules)
    assert set(fires) == {"ct-fast", "ct-slow"}
    assert fires["ct-slow"] - fires["ct-fast"] == timedelta(seconds=98)
    assert fires["ct-fast"] - entry.last_received_at == timedelta(seconds=2)
    # the fast rule fires; the slow one still waits, so the series stays listed
    assert len(w.check(later(3))) == 1
    assert [e.series_instance_uid for e in w.waiting()] == [slow]
    assert len(w.check(later(101))) == 1
    assert w.waiting() == []


# --- re-sent series: what changed, and which path it came by ------------------------------------
def _send(archive: Archive, data: list[bytes], source: str) -> None:
    for blob in data:
        archive.ingest(blob, source=source, calling_ae="CT1" if source == "dimse" else "")


def _routed(archive: Archive, jobs: RecordingJobs, w: CompletionWatcher) -> tuple[list[bytes], str]:
    """A 3-instance phantom CT series received by C-STORE and routed once: its bytes, the job."""
    study, series = generate_uid(), generate_uid()
    data = [instance(series, study, i) for i in range(3)]
    _send(archive, data, "dimse")
    (job_id,) = w.check(later(3))
    return data, job_id


def _encoded(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _done(jobs: RecordingJobs, job_id: str) -> None:
    assert jobs.store.claim(job_id) is not None
    jobs.store.finish(job_id, {"status": "done"})


def test_identical_resend_of_a_routed_series_makes_no_new_job(
    archive: Archive, jobs: RecordingJobs
) -> None:
    w = watcher(archive, jobs)
    data, first = _routed(archive, jobs, w)
    _done(jobs, first)
    for source in ("stow", "dimse"):  # the same bytes again, by STOW-RS, then by C-STORE
        _send(archive, data, source)
        assert [s.series_instance_uid for s in w.waiting()] != []  # an arrival all the same
        assert w.check(later(3)) == []
        assert w.waiting() == []  # handled, with no job
    (job,) = jobs.jobs()
    assert job.id == first and job.status == JobStatus.DONE and job.superseded_by is None
    # A queued (or running) job covers the series as well.
    data, queued = _routed(archive, jobs, w)
    _send(archive, data[:1], "stow")
    assert w.check(later(3)) == []
    assert jobs.store.get(queued).status == JobStatus.QUEUED


def test_resend_after_a_failed_job_runs_the_rule_again(
    archive: Archive, jobs: RecordingJobs
) -> None:
    w = watcher(archive, jobs)
    data, first = _routed(archive, jobs, w)
    assert jobs.store.claim(first) is not None
    jobs.store.fail(first, "the destination was down")
    _send(archive, data, "stow")  # the PACS user's retry: the same series again
    (second,) = w.check(later(3))
    assert second != first
    assert jobs.store.get(second).source == "stow"
    assert jobs.store.get(first).status == JobStatus.FAILED  # failed jobs are not superseded


def test_changed_or_new_instance_runs_the_rule_again(archive: Archive, jobs: RecordingJobs) -> None:
    w = watcher(archive, jobs)
    data, first = _routed(archive, jobs, w)
    _done(jobs, first)
    ds = pydicom.dcmread(io.BytesIO(data[1]))
    ds.WindowCenter, ds.WindowWidth = 40, 400  # same SOP Instance UID, other bytes
    _send(archive, [data[0], _encoded(ds), data[2]], "stow")
    (second,) = w.check(later(3))
    by_id = {j.id: j for j in jobs.jobs()}
    assert by_id[first].status == JobStatus.SUPERSEDED and by_id[first].superseded_by == second
    # A new instance of the series, by C-STORE: again.
    ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), 7
    _send(archive, [_encoded(ds)], "dimse")
    (third,) = w.check(later(3))
    assert jobs.store.get(third).source == "dimse"
    assert jobs.store.get(second).superseded_by == third


def test_identical_resend_runs_again_when_the_rule_names_other_models(
    archive: Archive, jobs: RecordingJobs
) -> None:
    data, first = _routed(archive, jobs, watcher(archive, jobs))
    _done(jobs, first)
    cascade = {
        "routes": [
            {**SPEC["routes"][0], "nnunet_id": ["phantom", "phantom_cube"]},  # the spec changed
        ]
    }
    _send(archive, data, "dimse")
    (second,) = watcher(archive, jobs, cascade).check(later(3))
    assert jobs.store.get(second).request["nnunet_id"] == ["phantom", "phantom_cube"]


def test_a_series_completed_by_stow_makes_a_stow_job(archive: Archive, jobs: RecordingJobs) -> None:
    """The job's source is the path of the arrival that completed the series, not of its first
    instance: C-STORE first, then a new instance by STOW-RS."""
    w = watcher(archive, jobs)
    data, first = _routed(archive, jobs, w)
    assert jobs.store.get(first).source == "dimse"
    ds = pydicom.dcmread(io.BytesIO(data[0]))
    ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), 5
    _send(archive, [_encoded(ds)], "stow")
    (second,) = w.check(later(3))
    assert jobs.store.get(second).source == "stow"
    with archive.session_factory() as session:
        assert session.scalars(select(Series.last_source)).one() == "stow"
