"""recover(): after a crash at any point, every acknowledged instance is in files and index, and
no orphan file or row is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.storage import archive as archive_module
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.models import Instance
from tests.storage.index_checks import assert_aggregates_counted

ROOT = Path(__file__).resolve().parents[2]


def _assert_consistent(archive: Archive, sessions: sessionmaker[Session]) -> set[str]:
    """Files and rows describe the same instances, the kept counts what the rows count; nothing
    is left in .incoming."""
    assert list(archive.incoming.iterdir()) == []
    files = {
        str(p.relative_to(archive.root))
        for p in archive.root.rglob("*.dcm")
        if archive.incoming not in p.parents
    }
    with sessions() as s:
        rows = {i.path: i for i in s.scalars(select(Instance))}
        assert set(rows) == files
        for path, inst in rows.items():
            on_disk = pydicom.dcmread(archive.root / path, stop_before_pixels=True)
            assert on_disk.SOPInstanceUID == inst.sop_instance_uid
            assert (archive.root / path).stat().st_size == inst.size_bytes
        assert_aggregates_counted(s)
        return {i.sop_instance_uid for i in rows.values()}


def _temp(archive: Archive, sop: str, data: bytes) -> Path:
    tmp = archive.incoming / f"{sop}.{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(data)
    return tmp


def test_crash_before_commit_drops_the_temporary_file(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    sop = generate_uid()
    _temp(archive, sop, make_instance(sop_uid=sop))
    report = archive.recover()
    assert (report.completed, report.dropped) == (0, 1)
    assert _assert_consistent(archive, index_sessions) == set()


def test_crash_after_commit_moves_the_file_into_place(
    archive: Archive,
    index_sessions: sessionmaker[Session],
    make_instance: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept = archive.ingest(make_instance(), source="dimse")
    sop = generate_uid()
    data = make_instance(sop_uid=sop)

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt("killed between commit and rename")

    monkeypatch.setattr(archive_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        archive.ingest(data, source="dimse")
    monkeypatch.undo()
    assert len(list(archive.incoming.iterdir())) == 1

    report = archive.recover()
    assert (report.completed, report.dropped) == (1, 0)
    assert _assert_consistent(archive, index_sessions) == {kept.sop_instance_uid, sop}
    with index_sessions() as s:
        inst = s.scalars(select(Instance).filter_by(sop_instance_uid=sop)).one()
        assert archive.path_for(inst).read_bytes() == data


@pytest.mark.parametrize("committed", [False, True])
def test_crash_during_a_resend_leaves_one_consistent_copy(
    archive: Archive,
    index_sessions: sessionmaker[Session],
    make_instance: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
    committed: bool,
) -> None:
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid()}
    archive.ingest(make_instance(**uids, InstanceNumber=1), source="dimse")
    newer = make_instance(**uids, InstanceNumber=2)
    if committed:
        monkeypatch.setattr(
            archive_module.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt())
        )
        with pytest.raises(KeyboardInterrupt):
            archive.ingest(newer, source="dimse")
        monkeypatch.undo()
    else:
        _temp(archive, uids["sop_uid"], newer)

    report = archive.recover()
    assert report.completed == 1
    assert _assert_consistent(archive, index_sessions) == {uids["sop_uid"]}
    with index_sessions() as s:
        inst = s.scalars(select(Instance)).one()
        # The newer copy wins, and the row describes it.
        assert inst.instance_number == 2
        assert archive.path_for(inst).read_bytes() == newer


def test_stray_and_unreadable_temporary_files_are_dropped(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    done = archive.ingest(make_instance(), source="dimse")
    (archive.incoming / "junk").write_bytes(b"x")
    _temp(archive, done.sop_instance_uid, b"not dicom")
    _temp(archive, "..", b"x")
    report = archive.recover()
    assert (report.completed, report.dropped) == (0, 3)
    assert _assert_consistent(archive, index_sessions) == {done.sop_instance_uid}


CHILD = textwrap.dedent(
    """
    import io, sys
    import numpy as np, pydicom
    from pathlib import Path
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from nnunet_node.storage.archive import Archive
    from nnunet_node.storage.db import make_engine, make_sessionmaker

    root, url = Path(sys.argv[1]), sys.argv[2]
    archive = Archive(root, make_sessionmaker(make_engine(url)))
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(5)]  # some re-sent
    n = 0
    while True:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sops[n % 5] if n % 3 == 0 else generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.Modality, ds.InstanceNumber = "K", "CT", n
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.zeros(64 * 64, np.int16).tobytes()
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        archive.ingest(buf.getvalue(), source="dimse")
        print(ds.SOPInstanceUID, flush=True)  # acknowledged
        n += 1
    """
)


def test_sigkill_during_ingest_then_recover(
    archive: Archive, index_sessions: sessionmaker[Session], index_url: str
) -> None:
    """A real SIGKILL at a random point of a writing process, several times over."""
    acknowledged: set[str] = set()
    for delay in (0.3, 0.6):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(archive.root), index_url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        # Wait until it writes, then kill it mid-stream.
        first = proc.stdout.readline().strip()
        assert first, "the writer died before its first ingest"
        acknowledged.add(first)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        acknowledged.update(line.strip() for line in proc.stdout if line.strip())
        proc.stdout.close()
        archive.recover()
        present = _assert_consistent(archive, index_sessions)
        assert acknowledged <= present


def test_committed_row_with_a_lost_file_is_dropped(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """Only possible with fsync=False and a machine crash: the row must not outlive its bytes."""
    result = archive.ingest(make_instance(), source="dimse")
    result.path.unlink()
    _temp(archive, result.sop_instance_uid, b"\x00" * 10)  # torn copy
    archive.recover()
    assert _assert_consistent(archive, index_sessions) == set()
