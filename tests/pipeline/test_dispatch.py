"""Dispatch: results C-STOREd to a real dcmtk storescp, retries with backoff recorded in the
database, a destination that stays down, a manual retry, and the dispatcher thread."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import Conflict, SendError
from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.pipeline.dispatch import Dispatcher, send_files, storage_contexts
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.pipeline.stored_send import data_set_offset
from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.models import (
    Dispatch,
    DispatchStatus,
    InputKind,
    Job,
    JobArtifact,
    JobStatus,
)
from tests.node.peers import free_port, received, storescp


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Stand-ins for a job's DICOM results (any Part 10 files will do)."""
    files = write_dicom_series(
        make_phantom(5, shape=(16, 40, 40), spacing=(1.0, 1.0, 2.5)), tmp_path_factory.mktemp("res")
    )
    return files[:3]


def _routing(port: int, **retry: object) -> RoutingTable:
    return RoutingTable.from_spec(
        {
            "destinations": {
                "PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": port, **retry}
            },
            "routes": [{"name": "r", "nnunet_id": "m", "destinations": ["PACS"]}],
        }
    )


def _done_job(sessions: sessionmaker[Session], files: list[Path]) -> str:
    with unit_of_work(sessions) as session:
        job = Job(
            id="j1",
            source="dimse",
            status=JobStatus.DONE,
            input_kind=InputKind.ARCHIVE,
            request={},
            route_name="r",
        )
        job.artifacts = [JobArtifact(kind="dicom_segmentation", path=str(p)) for p in files]
        job.artifacts.append(JobArtifact(kind="nifti_prediction", path="/nowhere.nii.gz"))
        session.add(job)
    return "j1"


def _dispatch(sessions: sessionmaker[Session]) -> Dispatch:
    with sessions() as session:
        return session.scalars(select(Dispatch)).one()


def test_send_files_to_storescp(tmp_path: Path, results: list[Path]) -> None:
    with storescp(tmp_path / "pacs") as port:
        dest = _routing(port).destinations["PACS"]
        report = send_files(dest, results, calling_ae="NNUNET_NODE")
    assert report.sent == len(results)
    got = received(tmp_path / "pacs")
    assert sorted(pydicom.dcmread(p).SOPInstanceUID for p in got) == sorted(
        pydicom.dcmread(p).SOPInstanceUID for p in results
    )
    # each data set arrives as stored, byte for byte (only the File Meta is storescp's own)
    assert sorted(_data_set(p) for p in got) == sorted(_data_set(p) for p in results)


def _data_set(path: Path) -> bytes:
    return path.read_bytes()[data_set_offset(path) :]


def test_send_to_nobody_raises(results: list[Path]) -> None:
    dest = _routing(free_port()).destinations["PACS"]
    with pytest.raises(SendError, match="could not be reached"):
        send_files(dest, results, calling_ae="NNUNET_NODE", timeout_s=2)


def test_destination_down_then_back(
    tmp_path: Path, sessions: sessionmaker[Session], results: list[Path]
) -> None:
    port = free_port()
    dispatcher = Dispatcher(
        sessions,
        _routing(port, retry_delay_s=0.2, max_attempts=5),
        calling_ae="NNUNET_NODE",
        archive_dir=tmp_path,
    )
    job_id = _done_job(sessions, results)
    dispatcher.on_job_done(job_id)
    dispatcher.on_job_done(job_id)  # idempotent: one dispatch per destination
    assert dispatcher.run_due() == 1
    first = _dispatch(sessions)
    assert first.status == DispatchStatus.PENDING and len(first.attempts) == 1
    assert first.attempts[0]["ok"] is False and "could not be reached" in first.attempts[0]["error"]
    assert dispatcher.run_due() == 0  # not due yet: backoff

    with storescp(tmp_path / "pacs", port=port):
        deadline = time.monotonic() + 10
        while _dispatch(sessions).status == DispatchStatus.PENDING and time.monotonic() < deadline:
            dispatcher.run_due()
            time.sleep(0.05)
    final = _dispatch(sessions)
    assert final.status == DispatchStatus.SENT, final.attempts
    assert final.attempts[-1] == {**final.attempts[-1], "ok": True, "sent": len(results)}
    assert len(received(tmp_path / "pacs")) == len(results)
    with sessions() as session:
        assert session.get(Job, job_id).status == JobStatus.DONE  # type: ignore[union-attr]


def test_destination_that_stays_down_fails_and_can_be_retried(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    results: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    dispatcher = Dispatcher(
        sessions,
        _routing(port, retry_delay_s=0, max_attempts=2),
        calling_ae="NNUNET_NODE",
        archive_dir=tmp_path,
    )
    dispatcher.on_job_done(_done_job(sessions, results))
    with caplog.at_level("INFO"):
        dispatcher.run_due()
        dispatcher.run_due()
    # One WARNING line per attempt (the last says it failed), no ERROR from anyone.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert "attempt 1 of 2 failed" in warnings[0] and "could not be reached" in warnings[0]
    assert "failed after 2 attempt(s)" in warnings[1]
    assert [r.getMessage() for r in caplog.records if r.levelno >= 40] == []
    failed = _dispatch(sessions)
    assert failed.status == DispatchStatus.FAILED and len(failed.attempts) == 2
    assert failed.next_attempt_at is None
    with sessions() as session:
        assert session.get(Job, "j1").status == JobStatus.DONE  # type: ignore[union-attr]

    with storescp(tmp_path / "pacs", port=port):
        dispatcher.retry(failed.id)
        dispatcher.run_due()
    sent = _dispatch(sessions)
    assert sent.status == DispatchStatus.SENT
    assert [a.get("retry", False) for a in sent.attempts] == [False, False, True, False]
    with pytest.raises(Conflict):
        dispatcher.retry(sent.id)


def test_dispatcher_thread_sends_on_its_own(
    tmp_path: Path, sessions: sessionmaker[Session], results: list[Path]
) -> None:
    with storescp(tmp_path / "pacs") as port:
        dispatcher = Dispatcher(
            sessions, _routing(port), calling_ae="NNUNET_NODE", archive_dir=tmp_path, poll_s=0.2
        )
        dispatcher.start()
        try:
            dispatcher.on_job_done(_done_job(sessions, results))
            deadline = time.monotonic() + 15
            while _dispatch(sessions).status != DispatchStatus.SENT:
                assert time.monotonic() < deadline, _dispatch(sessions).attempts
                time.sleep(0.05)
        finally:
            dispatcher.stop()
    assert len(received(tmp_path / "pacs")) == len(results)


def test_dispatcher_thread_outlives_a_database_that_went_away(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    results: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While its table cannot be read (here renamed away: the same OperationalError as a
    PostgreSQL that went down) the dispatcher's passes fail; once it is back, a new job's
    results are sent. Its wait's query ran outside the pass's ``try``, so one failure ended
    the thread and every later dispatch stayed pending until a restart. The outage is logged
    once with its traceback, not every pass, and its end in one line."""
    caplog.set_level(logging.INFO, logger="nnunet_node.pipeline.dispatch")
    with storescp(tmp_path / "pacs") as port:
        dispatcher = Dispatcher(
            sessions, _routing(port), calling_ae="NNUNET_NODE", archive_dir=tmp_path, poll_s=0.1
        )
        dispatcher.start()
        try:
            with sessions() as session:
                session.execute(text("ALTER TABLE dispatches RENAME TO dispatches_away"))
                session.commit()
            time.sleep(1.0)  # about ten failed passes
            with sessions() as session:
                session.execute(text("ALTER TABLE dispatches_away RENAME TO dispatches"))
                session.commit()
            dispatcher.on_job_done(_done_job(sessions, results))
            dispatcher.wake()
            deadline = time.monotonic() + 15
            while _dispatch(sessions).status != DispatchStatus.SENT:
                assert time.monotonic() < deadline, "the dispatcher thread is gone"
                time.sleep(0.05)
        finally:
            dispatcher.stop()
    assert len(received(tmp_path / "pacs")) == len(results)
    failed = [r for r in caplog.records if "dispatcher pass failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    back = [r.getMessage() for r in caplog.records if "works again" in r.getMessage()]
    assert len(back) == 1 and "dispatcher pass works again after" in back[0], back


def test_job_without_route_destinations_makes_no_dispatch(
    tmp_path: Path, sessions: sessionmaker[Session], results: list[Path]
) -> None:
    dispatcher = Dispatcher(
        sessions, RoutingTable.from_spec({}), calling_ae="NNUNET_NODE", archive_dir=tmp_path
    )
    dispatcher.on_job_done(_done_job(sessions, results))
    with sessions() as session:
        assert session.scalars(select(Dispatch)).all() == []


def test_storage_contexts_offer_each_stored_syntax_alone() -> None:
    """One context per SOP class and stored syntax (the peer can take each file as it is), one
    per class with the uncompressed syntaxes to convert to; past 128, one per class."""
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    explicit, implicit, rle = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5"
    contexts = storage_contexts([(ct, rle), (ct, explicit), (ct, rle), (mr, explicit)])
    shapes = [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in contexts]
    assert shapes == [
        (ct, [rle]),
        (ct, [explicit]),
        (mr, [explicit]),
        (ct, [explicit, implicit]),
        (mr, [explicit, implicit]),
    ]
    many = [(f"1.2.3.{i}", syntax) for i in range(60) for syntax in (rle, explicit)]
    merged = storage_contexts(many)
    assert len(merged) == 60
    assert list(merged[0].transfer_syntax) == [rle, explicit, implicit]
    with pytest.raises(SendError, match="129 SOP classes"):
        storage_contexts([(f"1.2.3.{i}", explicit) for i in range(129)])
