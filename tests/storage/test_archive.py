"""Ingest: file and index rows as one unit; refusals leave nothing behind."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import InvalidDicom, StorageFull
from nnunet_node.storage.archive import Archive, is_valid_uid
from nnunet_node.storage.models import Instance, Patient, Series, Study
from tests.support.datasets import build_dataset, encode


def _count(sessions: sessionmaker[Session], model: type) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_ingest_files_and_indexes(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = make_instance(
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        StudyDescription="Head",
        SeriesDescription="Phantom CT",
        AccessionNumber="A1",
    )
    result = archive.ingest(data, source="dimse", calling_ae="SCANNER", called_ae="NODE")

    assert result.path == archive.root / study / series / f"{sop}.dcm"
    assert result.path.read_bytes() == data
    assert not result.duplicate
    assert (result.study_instance_uid, result.series_instance_uid) == (study, series)
    assert list(archive.incoming.iterdir()) == []
    with index_sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert archive.path_for(inst) == result.path
        assert inst.size_bytes == len(data)
        assert inst.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian
        assert (inst.rows, inst.columns, inst.instance_number) == (4, 4, 1)
        assert (inst.source, inst.calling_ae, inst.called_ae) == ("dimse", "SCANNER", "NODE")
        assert inst.series.series_description == "Phantom CT"
        assert inst.series.modality == "CT"
        assert (inst.series.calling_ae, inst.series.called_ae) == ("SCANNER", "NODE")
        assert inst.series.study.study_description == "Head"
        assert inst.series.study.accession_number == "A1"
        assert inst.series.study.patient.patient_name == "Doe^Jane"


def test_ingest_from_a_path(
    archive: Archive, tmp_path: Path, make_instance: Callable[..., bytes]
) -> None:
    source = tmp_path / "in.dcm"
    source.write_bytes(make_instance())
    result = archive.ingest(source, source="import")
    assert result.path.read_bytes() == source.read_bytes()


def test_resent_instance_keeps_one_row_and_newer_copy(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid()}
    first = archive.ingest(make_instance(**uids, InstanceNumber=1), source="dimse")
    newer = make_instance(**uids, InstanceNumber=7, StudyDescription="Later")
    second = archive.ingest(newer, source="stow")

    assert second.duplicate and not first.duplicate
    assert second.path == first.path
    assert second.path.read_bytes() == newer
    assert _count(index_sessions, Instance) == 1
    with index_sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert (inst.instance_number, inst.source) == (7, "stow")
        assert inst.series.study.study_description == "Later"
    assert _files(archive.root) == [first.path]


def test_a_resent_data_set_that_changes_nothing_keeps_the_series_content_time(
    archive: Archive, index_sessions: sessionmaker[Session]
) -> None:
    """Every arrival bumps ``last_received_at`` and records its path and AE titles; only one
    that changes the series (a new instance, another data set under a SOP Instance UID) moves
    ``content_changed_at``. A copy whose File Meta differs (another sender) but whose data set
    is byte for byte the one held changes nothing."""
    ds = build_dataset()
    original = encode(ds)
    archive.ingest(original, source="dimse", calling_ae="CT1", called_ae="NODE")

    def arrival() -> tuple[Any, ...]:
        with index_sessions() as s:
            row = s.scalars(select(Series)).one()
            return (row.last_received_at, row.content_changed_at, row.last_source, row.calling_ae)

    received, changed, source, calling = arrival()
    assert changed == received and (source, calling) == ("dimse", "CT1")
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE"
    other_meta = encode(ds)
    assert other_meta != original and other_meta.endswith(original[-64:])
    archive.ingest(other_meta, source="stow")
    received2, changed2, source2, calling2 = arrival()
    # STOW-RS names no AE title: the series keeps the last one it was given
    assert received2 > received and changed2 == changed and (source2, calling2) == ("stow", "CT1")
    archive.ingest(original, source="dimse", calling_ae="CT1")  # and the first copy again
    assert arrival()[1] == changed
    ds.WindowCenter = 40  # another data set under the same SOP Instance UID
    archive.ingest(encode(ds), source="stow")
    received3, changed3, _, _ = arrival()
    assert changed3 == received3 > received2
    archive.ingest(
        encode(build_dataset(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID)),
        source="dimse",
    )
    received4, changed4, _, _ = arrival()
    assert changed4 == received4 > received3  # a new instance


def test_resent_instance_under_another_series_moves(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    sop = generate_uid()
    first = archive.ingest(make_instance(sop_uid=sop), source="dimse")
    second = archive.ingest(make_instance(sop_uid=sop), source="dimse")
    assert second.duplicate and second.path != first.path
    assert _files(archive.root) == [second.path]
    assert _count(index_sessions, Instance) == 1


def test_instances_group_into_patient_study_series(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    study, series = generate_uid(), generate_uid()
    for n in range(3):
        data = make_instance(study_uid=study, series_uid=series, InstanceNumber=n)
        archive.ingest(data, source="x")
    archive.ingest(make_instance(study_uid=study), source="x")  # a second series
    archive.ingest(make_instance(PatientID="P1", IssuerOfPatientID="OTHER"), source="x")
    archive.ingest(make_instance(PatientID="P2"), source="x")
    assert _count(index_sessions, Instance) == 6
    assert _count(index_sessions, Series) == 4
    assert _count(index_sessions, Study) == 3
    # Patients are matched by (PatientID, IssuerOfPatientID).
    assert _count(index_sessions, Patient) == 3


def test_empty_value_does_not_erase_a_known_attribute(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    study = generate_uid()
    archive.ingest(make_instance(study_uid=study, StudyDescription="Chest"), source="x")
    archive.ingest(make_instance(study_uid=study), source="x")
    with index_sessions() as s:
        assert s.scalars(select(Study)).one().study_description == "Chest"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not dicom at all" * 20,
        b"\x00" * 128 + b"DICM" + b"\xff" * 40,
    ],
    ids=["empty", "text", "broken-meta"],
)
def test_corrupt_bytes_are_refused_and_leave_nothing(
    archive: Archive, index_sessions: sessionmaker[Session], data: bytes
) -> None:
    with pytest.raises(InvalidDicom):
        archive.ingest(data, source="dimse")
    assert _files(archive.root) == []
    assert _count(index_sessions, Instance) == 0


def test_truncated_header_is_refused(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    data = make_instance()
    with pytest.raises(InvalidDicom):
        archive.ingest(data[:200], source="dimse")
    assert _files(archive.root) == []
    assert _count(index_sessions, Instance) == 0


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"]
)
def test_missing_uid_is_refused(
    archive: Archive,
    index_sessions: sessionmaker[Session],
    make_dataset: Callable[..., pydicom.Dataset],
    keyword: str,
) -> None:
    ds = make_dataset()
    delattr(ds, keyword)
    if keyword in ("SOPInstanceUID", "SOPClassUID"):
        # pydicom fills the file meta from these; keep the meta valid, the dataset without.
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    import io

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    with pytest.raises(InvalidDicom, match=keyword):
        archive.ingest(buffer.getvalue(), source="dimse")
    assert _files(archive.root) == []
    assert _count(index_sessions, Instance) == 0


@pytest.mark.parametrize(
    ("field", "uid"),
    [
        ("study_uid", "../.."),
        ("series_uid", "1.2/../3"),
        ("sop_uid", "1.2.3/../../../etc/passwd"),
        ("study_uid", "/tmp/x"),
        ("series_uid", "1..2"),
        ("sop_uid", "1.2."),
        ("sop_uid", "1." + "2" * 70),
        ("study_uid", "1.2.abc"),
    ],
)
def test_hostile_uids_are_refused(
    archive: Archive,
    index_sessions: sessionmaker[Session],
    make_instance: Callable[..., bytes],
    tmp_path: Path,
    field: str,
    uid: str,
) -> None:
    data = make_instance(**{field: uid})

    # A hostile UID could aim above the archive: watch the folder that holds this test's folder.
    def written() -> set[Path]:
        found = tmp_path.parent.rglob("*")
        return {p for p in found if p.is_file() and p.suffix in (".dcm", ".tmp")}

    before = written()
    with pytest.raises(InvalidDicom, match="UID"):
        archive.ingest(data, source="dimse")
    assert written() - before == set()
    assert [p for p in _files(tmp_path) if p.suffix in (".dcm", ".tmp")] == []
    assert _count(index_sessions, Instance) == 0


def test_uid_rule() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert is_valid_uid("0")
    assert not is_valid_uid("")
    assert not is_valid_uid(".1")
    assert not is_valid_uid("1.2 ")
    assert not is_valid_uid("1" * 65)
    assert is_valid_uid("1" * 64)


def test_below_free_space_floor_is_refused(
    tmp_path: Path, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    archive = Archive(tmp_path / "dicom", index_sessions, min_free_bytes=2**62)
    with pytest.raises(StorageFull):
        archive.ingest(make_instance(), source="dimse")
    assert _files(archive.root) == []
    assert _count(index_sessions, Instance) == 0


def test_ingest_dataset_writes_a_part10_file(
    archive: Archive, make_dataset: Callable[..., pydicom.Dataset]
) -> None:
    ds = make_dataset(Modality="SEG")
    del ds.file_meta
    result = archive.ingest_dataset(ds)
    back = pydicom.dcmread(result.path)
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.SOPInstanceUID == result.sop_instance_uid
    assert "file_meta" not in ds.__dict__ or ds.get("file_meta") is None


def test_concurrent_writers_lose_nothing(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """8 threads x 50 instances into the same few series: every row, no lock error."""
    study = generate_uid()
    series = [generate_uid() for _ in range(3)]
    payloads = [
        [make_instance(study_uid=study, series_uid=series[(t + i) % 3]) for i in range(50)]
        for t in range(8)
    ]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(items: list[bytes]) -> None:
        barrier.wait()
        try:
            for data in items:
                archive.ingest(data, source="dimse", calling_ae="A")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _count(index_sessions, Instance) == 400
    assert _count(index_sessions, Series) == 3
    assert _count(index_sessions, Study) == 1
    assert _count(index_sessions, Patient) == 1
    assert len([p for p in _files(archive.root) if p.suffix == ".dcm"]) == 400


def test_concurrent_resend_of_one_instance_keeps_one_row(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid()}
    copies = [make_instance(**uids, InstanceNumber=n) for n in range(6)]
    errors: list[BaseException] = []

    def work(data: bytes) -> None:
        try:
            archive.ingest(data, source="dimse")
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _count(index_sessions, Instance) == 1
    with index_sessions() as s:
        inst = s.scalars(select(Instance)).one()
        # The file in place is the copy the row describes.
        on_disk = pydicom.dcmread(archive.path_for(inst), stop_before_pixels=True)
        assert on_disk.InstanceNumber == inst.instance_number


def test_group_commit_fails_only_the_bad_instance(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """A batch of waiting writers commits together; one failing instance fails alone."""
    from nnunet_node.storage.archive import read_header
    from nnunet_node.storage.indexer import _Request

    good = [read_header(make_instance()) for _ in range(2)]
    bad = read_header(make_instance())
    bad.series_instance_uid = None  # type: ignore[assignment]  # NOT NULL violation
    batch = [
        _Request(good[0], 10, "dimse", "A", "B"),
        _Request(bad, 10, "dimse", "A", "B"),
        _Request(good[1], 10, "dimse", "A", "B"),
    ]
    archive._indexer._commit_batch(batch)
    assert all(r.done for r in batch)
    assert batch[0].result == (False, None) and batch[2].result == (False, None)
    assert batch[1].error is not None and batch[1].result is None
    with index_sessions() as s:
        stored = set(s.scalars(select(Instance.sop_instance_uid)))
    assert stored == {good[0].sop_instance_uid, good[1].sop_instance_uid}


def test_read_sessions_do_not_wait_for_a_writer(
    index_url: str, make_instance: Callable[..., bytes], tmp_path: Path
) -> None:
    from sqlalchemy import text

    from nnunet_node.storage.db import make_engine, make_read_sessionmaker, make_sessionmaker

    engine = make_engine(index_url)
    try:
        writer, reader = make_sessionmaker(engine), make_read_sessionmaker(engine)
        archive = Archive(tmp_path / "dicom", writer)
        archive.ingest(make_instance(), source="dimse")
        with writer() as w, w.begin():
            w.execute(text("UPDATE series SET modality = 'MR'"))  # holds the write lock
            with reader() as r:  # would wait 30 s with BEGIN IMMEDIATE
                assert r.scalar(select(func.count()).select_from(Instance)) == 1
                assert r.scalar(select(Series.modality)) == "CT"  # snapshot before the commit
    finally:
        engine.dispose()


def test_ingest_without_fsync_is_still_complete(
    tmp_path: Path, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    archive = Archive(tmp_path / "dicom", index_sessions, fsync=False, fsync_folders=True)
    assert not archive.fsync_folders
    result = archive.ingest(make_instance(), source="dimse")
    assert result.path.is_file()
    assert _count(index_sessions, Instance) == 1


def test_a_cut_copy_does_not_replace_the_stored_instance(archive: Archive) -> None:
    """Re-sending an instance cut short inside its pixel data is refused; the copy filed before
    stays as it was."""
    whole = encode(build_dataset(size=64))
    result = archive.ingest(whole, source="stow")
    with pytest.raises(InvalidDicom, match="pixel data"):
        archive.ingest(whole[: len(whole) - 500], source="stow")
    assert result.path.read_bytes() == whole
