"""Files received in fragments (Archive.open_incoming / ingest_incoming): a full disk, a flush that
fails after the rows committed, and recovery of what a crash left in ``.incoming``."""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import InvalidDicom, StorageFull
from nnunet_node.storage import archive as archive_module
from nnunet_node.storage import incoming as incoming_module
from nnunet_node.storage.archive import Archive, IncomingFile
from nnunet_node.storage.locks import ProcessLocks
from nnunet_node.storage.models import Instance


def _receive(archive: Archive, data: bytes, *, fragment: int = 4096) -> IncomingFile:
    """What the DIMSE receiver does: the head first, then the dataset in fragments."""
    split = 132 + 12 + int.from_bytes(data[140:144], "little")  # after the File Meta group
    incoming = archive.open_incoming(data[:split])
    for start in range(split, len(data), fragment):
        incoming.write(data[start : start + fragment])
        incoming.read_ahead()
    incoming.complete()
    return incoming


def _rows(sessions: sessionmaker[Session]) -> list[Instance]:
    with sessions() as session:
        return list(session.scalars(select(Instance)))


def _data_files(archive: Archive) -> list[Path]:
    return [p for p in archive.root.rglob("*") if p.is_file() and p.stat().st_size > 0]


def test_a_received_instance_is_filed_like_an_ingested_one(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    data = make_instance(size=64)
    result = archive.ingest_incoming(_receive(archive, data), source="dimse", calling_ae="CT1")
    assert result.path.read_bytes() == data
    (row,) = _rows(index_sessions)
    assert (row.sop_instance_uid, row.size_bytes, row.calling_ae) == (
        result.sop_instance_uid,
        len(data),
        "CT1",
    )
    archive.close()  # the spare files made meanwhile go too
    assert list(archive.incoming.iterdir()) == []


def test_a_big_endian_instance_is_filed_whole(
    archive: Archive, make_dataset: Callable[..., Dataset]
) -> None:
    """Explicit VR Big Endian (retired, still sent by old modalities): the header is pydicom's
    to read, and the pixel data checks, which read little-endian lengths, leave it alone."""
    ds = make_dataset(size=64)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    result = archive.ingest_incoming(_receive(archive, data), source="dimse")
    assert result.path.read_bytes() == data


def test_spare_files_are_made_ahead_and_used(archive: Archive) -> None:
    first = archive.open_incoming(b"x")
    deadline = time.monotonic() + 5
    # Ready once handed over, not once on the disk (made first, then handed over).
    while len(archive._spares._ready) < incoming_module.SPARE_FILES:
        assert time.monotonic() < deadline, "no spare files were made"
        time.sleep(0.01)
    spares = {p for p in archive.incoming.iterdir() if p != first.path}
    second = archive.open_incoming(b"y")
    assert second.path in spares
    first.discard()
    second.discard()
    archive.close()
    assert list(archive.incoming.iterdir()) == []
    third = archive.open_incoming(b"z")  # still works once closed, without spares
    third.discard()


def test_a_disk_that_fills_up_during_the_transfer_refuses_it_and_keeps_nothing(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    data = make_instance(size=64)
    incoming = archive.open_incoming(data[:200])
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, incoming._fd)  # type: ignore[arg-type]  # from now on: ENOSPC
    finally:
        os.close(full)
    assert incoming.write(data[200:]) == 0  # the receiving thread is not interrupted
    assert incoming.error is not None and incoming.error.errno == errno.ENOSPC
    with pytest.raises(StorageFull):
        archive.ingest_incoming(incoming, source="dimse")
    assert not incoming.path.exists()
    assert _rows(index_sessions) == []


def test_unreadable_data_is_refused_and_deleted(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    data = make_instance(size=64)
    incoming = archive.open_incoming(data[:200])
    incoming.write(b"\xff" * 500)  # not elements
    incoming.complete()
    with pytest.raises(InvalidDicom):
        archive.ingest_incoming(incoming, source="dimse")
    assert not incoming.path.exists()
    assert _rows(index_sessions) == []


def _failing_flush(incoming: IncomingFile) -> None:
    def sync() -> None:
        incoming.close()
        raise OSError(errno.EIO, "Input/output error")

    incoming.sync = sync  # type: ignore[method-assign]


def test_a_flush_that_fails_after_the_commit_takes_the_new_row_back(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    incoming = _receive(archive, make_instance(size=64))
    _failing_flush(incoming)
    with pytest.raises(OSError, match="Input/output"):
        archive.ingest_incoming(incoming, source="dimse")
    assert _rows(index_sessions) == []
    assert _data_files(archive) == []


def test_a_flush_that_fails_for_a_resent_instance_keeps_the_copy_in_place(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid()}
    older = make_instance(**uids, InstanceNumber=1)
    kept = archive.ingest(older, source="dimse")
    incoming = _receive(archive, make_instance(**uids, InstanceNumber=2, size=8))
    _failing_flush(incoming)
    with pytest.raises(OSError):
        archive.ingest_incoming(incoming, source="dimse")
    (row,) = _rows(index_sessions)
    assert (row.instance_number, row.size_bytes) == (1, len(older))
    assert kept.path.read_bytes() == older
    assert _data_files(archive) == [kept.path]


def test_recover_completes_a_streamed_file_whose_row_committed(
    archive: Archive,
    index_sessions: sessionmaker[Session],
    make_instance: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_instance(size=64)

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt("killed between the commit and the rename")

    incoming = _receive(archive, data)
    monkeypatch.setattr(archive_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        archive.ingest_incoming(incoming, source="dimse")
    monkeypatch.undo()
    archive.close()  # the spares, as a stopped process leaves none that matter
    assert [p.name.count(".") for p in archive.incoming.iterdir()] == [1]  # "<random>.tmp"

    report = archive.recover()
    assert (report.completed, report.dropped) == (1, 0)
    (row,) = _rows(index_sessions)
    assert archive.path_for(row).read_bytes() == data
    assert list(archive.incoming.iterdir()) == []


@pytest.mark.parametrize("resent", [False, True])
def test_recover_drops_a_file_cut_short_whose_row_committed(
    archive: Archive,
    index_sessions: sessionmaker[Session],
    make_instance: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
    resent: bool,
) -> None:
    """A power loss after the rows committed but before the file's flush ended: the instance was
    never acknowledged; the short file goes, and the row goes or describes the copy in place."""
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid()}
    older = make_instance(**uids, InstanceNumber=1)
    if resent:
        archive.ingest(older, source="dimse")
    newer = make_instance(**uids, InstanceNumber=2, size=32)
    incoming = _receive(archive, newer)
    monkeypatch.setattr(
        archive_module.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        archive.ingest_incoming(incoming, source="dimse")
    monkeypatch.undo()
    archive.close()
    os.truncate(incoming.path, len(newer) - 100)  # what the disk kept of it
    (archive.incoming / "0123abcd.tmp").touch()  # and an empty spare

    report = archive.recover()
    assert (report.completed, report.dropped, report.spares) == (0, 1, 1)
    assert list(archive.incoming.iterdir()) == []
    rows = _rows(index_sessions)
    if resent:
        (row,) = rows
        assert (row.instance_number, row.size_bytes) == (1, len(older))
        assert archive.path_for(row).read_bytes() == older
    else:
        assert rows == []
        assert _data_files(archive) == []


def test_closing_waits_for_the_spare_file_being_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spare file the background thread is making while the archive closes is gone once
    ``close`` returns: ``recover`` right after a close (a restart) found it and counted it as
    a second spare (CI's failure of the test above, stop 19)."""
    made, go = threading.Event(), threading.Event()
    real_new_temp = incoming_module.new_temp

    def slow_new_temp(folder: Path) -> tuple[Path, int]:
        made_file = real_new_temp(folder)
        made.set()
        go.wait(10)
        return made_file

    monkeypatch.setattr(incoming_module, "new_temp", slow_new_temp)
    spares = incoming_module.SpareFiles(tmp_path)
    assert spares.take() is None  # none ready yet; the thread starts making one
    assert made.wait(10)
    closer = threading.Thread(target=spares.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # still waiting for the thread's file
    go.set()
    closer.join(10)
    assert not closer.is_alive()
    assert list(tmp_path.iterdir()) == []


def test_recover_after_a_crash_that_left_only_spare_files_reports_nothing_dropped(
    archive: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    """A node killed while idle leaves its spare files (empty, made ahead): recover deletes
    them without the WARNING of interrupted writes, which would send a reader looking for lost
    instances."""
    for name in ("0123abcd.tmp", "4567ef01.tmp"):
        (archive.incoming / name).touch()
    with caplog.at_level("WARNING", logger=archive_module.LOGGER.name):
        report = archive.recover()
    assert (report.completed, report.dropped, report.spares) == (0, 0, 2)
    assert list(archive.incoming.iterdir()) == []
    assert [r.getMessage() for r in caplog.records if r.name == archive_module.LOGGER.name] == []


def test_a_receivers_folder_is_recovered_alone_and_at_start(
    archive: Archive,
    index_sessions: sessionmaker[Session],
    make_instance: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Receiver processes (node/receivers.py) write into ``.incoming/<name>/``: recovering one
    receiver's folder leaves the files being received elsewhere alone; at start, every folder
    is recovered."""
    shared = Archive(archive.root, index_sessions, shared=True, incoming_name="receiver-1")
    assert shared.incoming == archive.incoming / "receiver-1"
    data = make_instance(size=64)
    incoming = _receive(shared, data)
    monkeypatch.setattr(
        archive_module.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):  # the receiver dies between the commit and the rename
        shared.ingest_incoming(incoming, source="dimse")
    monkeypatch.undo()
    shared.close()
    elsewhere = _receive(archive, make_instance(size=64))  # still arriving in the node's folder

    report = archive.recover(shared.incoming)
    assert (report.completed, report.dropped) == (1, 0)
    (row,) = _rows(index_sessions)
    assert archive.path_for(row).read_bytes() == data
    assert elsewhere.path.is_file() and list(shared.incoming.iterdir()) == []

    left = _receive(shared, make_instance(size=64))  # another death: never acknowledged
    shared.close()
    elsewhere.discard()
    archive.close()
    report = archive.recover()  # at start: the node's folder and every receiver's
    assert report.dropped >= 1 and not left.path.exists()
    assert len(_rows(index_sessions)) == 1


def test_process_locks_exclude_other_processes_not_other_locks(tmp_path: Path) -> None:
    path = tmp_path / "locks"
    ready, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the other process: hold lock 0 until told to let go
        try:
            with ProcessLocks(path).hold(0):
                os.write(ready[1], b"x")
                os.read(release[0], 1)
        finally:
            os._exit(0)
    os.read(ready[0], 1)
    locks = ProcessLocks(path)
    with locks.hold(1):  # another lock: not held up
        pass
    started = time.monotonic()
    done: list[float] = []

    def take() -> None:
        with locks.hold(0):
            done.append(time.monotonic() - started)

    taker = threading.Thread(target=take)
    taker.start()
    taker.join(0.3)
    assert done == []  # waits for the other process
    os.write(release[1], b"x")
    taker.join(10)
    assert len(done) == 1 and done[0] >= 0.3
    os.waitpid(pid, 0)
    locks.close()
