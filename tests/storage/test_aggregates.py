"""The aggregates the index keeps for C-FIND and QIDO-RS (NumberOfStudyRelatedSeries and
...Instances, NumberOfSeriesRelatedInstances, ModalitiesInStudy): right after ingest, after a
re-sent instance, an instance moved to another series, a row dropped by recover() with the pruning
it causes, and after migration 0006 counted them for rows indexed before it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.storage.archive import Archive
from nnunet_node.storage.db import make_engine
from nnunet_node.storage.migrations import upgrade
from nnunet_node.storage.query import find_patients, find_series, find_studies, to_dataset
from tests.storage.index_checks import assert_aggregates_counted, fill_0005

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _study(sessions: sessionmaker[Session], uid: str) -> dict[str, object]:
    with sessions() as s:
        rows = find_studies(s, {"StudyInstanceUID": uid})
    assert len(rows) == 1
    return rows[0]


def _series_counts(sessions: sessionmaker[Session], study: str) -> dict[str, int]:
    with sessions() as s:
        rows = find_series(s, {"StudyInstanceUID": study})
    return {r["SeriesInstanceUID"]: r["NumberOfSeriesRelatedInstances"] for r in rows}


def test_two_series_of_different_modality_then_a_resend(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    study, ct, seg = generate_uid(), generate_uid(), generate_uid()
    cts = [make_instance(study_uid=study, series_uid=ct, InstanceNumber=n) for n in (1, 2, 3)]
    for data in cts:
        archive.ingest(data, source="dimse")
    row = _study(index_sessions, study)
    assert row["ModalitiesInStudy"] == ["CT"]
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (1, 3)

    archive.ingest(
        make_instance(study_uid=study, series_uid=seg, Modality="SEG", SOPClassUID=SEG_CLASS),
        source="job",
    )
    row = _study(index_sessions, study)
    assert row["ModalitiesInStudy"] == ["CT", "SEG"]
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 4)
    assert _series_counts(index_sessions, study) == {ct: 3, seg: 1}
    # as C-FIND answers it: a multi-valued CS and IS numbers
    ds = to_dataset(row, ["ModalitiesInStudy", "NumberOfStudyRelatedInstances"])
    assert list(ds.ModalitiesInStudy) == ["CT", "SEG"]
    assert int(ds.NumberOfStudyRelatedInstances) == 4

    again = archive.ingest(cts[1], source="dimse")  # the same instance re-sent: no new count
    assert again.duplicate
    row = _study(index_sessions, study)
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 4)
    assert _series_counts(index_sessions, study) == {ct: 3, seg: 1}
    with index_sessions() as s:
        patient = find_patients(s, {"PatientID": "P1"})[0]
        assert patient["NumberOfPatientRelatedStudies"] == 1
        assert patient["NumberOfPatientRelatedSeries"] == 2
        assert patient["NumberOfPatientRelatedInstances"] == 4
        assert_aggregates_counted(s)


def test_an_instance_moved_to_another_series_and_study(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """A re-sent instance naming another series moves there: the old series loses it; a series
    left empty is pruned and its modality leaves the study's list; a study left empty goes."""
    study, other_study = generate_uid(), generate_uid()
    ct, mr, pt = generate_uid(), generate_uid(), generate_uid()
    sop = generate_uid()
    archive.ingest(make_instance(study_uid=study, series_uid=ct), source="dimse")
    archive.ingest(
        make_instance(study_uid=study, series_uid=mr, sop_uid=sop, Modality="MR"), source="dimse"
    )
    assert _study(index_sessions, study)["ModalitiesInStudy"] == ["CT", "MR"]

    # the MR instance re-sent as a PT series of the same study: MR is gone, PT is in
    moved = archive.ingest(
        make_instance(study_uid=study, series_uid=pt, sop_uid=sop, Modality="PT"), source="dimse"
    )
    assert moved.duplicate
    row = _study(index_sessions, study)
    assert row["ModalitiesInStudy"] == ["CT", "PT"]
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 2)
    assert _series_counts(index_sessions, study) == {ct: 1, pt: 1}

    # then into a series of another study: the first study keeps its CT only
    archive.ingest(
        make_instance(study_uid=other_study, series_uid=generate_uid(), sop_uid=sop),
        source="dimse",
    )
    row = _study(index_sessions, study)
    assert row["ModalitiesInStudy"] == ["CT"]
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (1, 1)
    other = _study(index_sessions, other_study)
    assert (other["NumberOfStudyRelatedSeries"], other["NumberOfStudyRelatedInstances"]) == (1, 1)
    with index_sessions() as s:
        assert_aggregates_counted(s)


def test_a_series_whose_modality_changes(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """A later instance of a series naming another Modality refreshes the series (newer headers
    win, storage/indexer.py); the study's modalities follow."""
    study, series = generate_uid(), generate_uid()
    archive.ingest(make_instance(study_uid=study, series_uid=series), source="dimse")
    archive.ingest(make_instance(study_uid=study, series_uid=series, Modality="OT"), source="dimse")
    row = _study(index_sessions, study)
    assert row["ModalitiesInStudy"] == ["OT"]
    assert row["NumberOfStudyRelatedInstances"] == 2


def test_rows_dropped_by_recover_are_uncounted(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """recover() drops the row of an instance whose file was lost (storage/archive.py): its
    series counts one less; a series left empty is pruned from the study's counts."""
    study, ct, seg = generate_uid(), generate_uid(), generate_uid()
    kept = [
        archive.ingest(make_instance(study_uid=study, series_uid=ct), source="dimse") for _ in "ab"
    ]
    lost_seg = archive.ingest(
        make_instance(study_uid=study, series_uid=seg, Modality="SEG", SOPClassUID=SEG_CLASS),
        source="job",
    )
    for result in (kept[0], lost_seg):
        result.path.unlink()
        torn = archive.incoming / f"{result.sop_instance_uid}.{uuid.uuid4().hex}.tmp"
        torn.write_bytes(b"\x00" * 10)
    archive.recover()
    row = _study(index_sessions, study)
    assert row["ModalitiesInStudy"] == ["CT"]
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (1, 1)
    assert _series_counts(index_sessions, study) == {ct: 1}
    with index_sessions() as s:
        assert_aggregates_counted(s)


def test_migration_0006_counts_rows_indexed_before_it(tmp_path: Path) -> None:
    """An index made at 0005 (no aggregate columns): after the upgrade every study and series
    holds its counts and modalities, as the rows count them."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0005")
    engine = make_engine(url)
    fill_0005(engine)
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    try:
        with Session(engine) as s:
            assert_aggregates_counted(s)
            rows = find_studies(s, {})
            assert [(r["ModalitiesInStudy"], r["NumberOfStudyRelatedSeries"]) for r in rows] == [
                (["CT", "SEG"], 2),
                (["MR"], 1),
                ([], 1),
            ]
            assert [r["NumberOfStudyRelatedInstances"] for r in rows] == [3, 1, 1]
    finally:
        engine.dispose()


def test_one_grouped_commit_of_every_kind_of_instance(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """The counts of a grouped commit are written once at its end (storage/indexer.py): in one
    batch a new series, more of its instances, a re-send, a second series of another modality,
    an instance moved there, and one that fails after making a series of its own. Every count
    and the arrival columns end as instance-by-instance commits would leave them, the failed
    instance and its series leave nothing."""
    from nnunet_node.storage.archive import read_header
    from nnunet_node.storage.indexer import _Request
    from nnunet_node.storage.models import Series

    study, ct, mr, lost = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    moved = generate_uid()

    def header(series: str, **attributes: object) -> object:
        return read_header(make_instance(study_uid=study, series_uid=series, **attributes))

    first = header(ct, sop_uid=moved)
    bad = header(lost, Modality="PT")
    bad.sop_class_uid = None  # type: ignore[attr-defined]  # NOT NULL: fails at its instance row
    batch = [
        _Request(first, 10, "dimse", "SCANNER", "NODE"),  # type: ignore[arg-type]
        _Request(header(ct), 10, "dimse", "SCANNER", "NODE"),  # type: ignore[arg-type]
        _Request(first, 11, "dimse", "", ""),  # type: ignore[arg-type]  # re-sent
        _Request(bad, 10, "dimse", "OTHER", "NODE"),  # type: ignore[arg-type]
        _Request(header(mr, Modality="MR"), 10, "dimse", "MRI", "NODE"),  # type: ignore[arg-type]
        _Request(header(mr, sop_uid=moved, Modality="MR"), 12, "dimse", "", ""),  # type: ignore[arg-type]
        _Request(header(ct), 10, "stow", "", ""),  # type: ignore[arg-type]
    ]
    archive._indexer._commit_batch(batch)
    assert [r.result for r in batch] == [
        (False, None),
        (False, None),
        (True, first.relative_path),  # type: ignore[attr-defined]
        None,
        (False, None),
        (True, first.relative_path),  # type: ignore[attr-defined]
        (False, None),
    ]
    assert batch[3].error is not None
    row = _study(index_sessions, study)
    assert row["ModalitiesInStudy"] == ["CT", "MR"]
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 4)
    assert _series_counts(index_sessions, study) == {ct: 2, mr: 2}
    with index_sessions() as s:
        assert_aggregates_counted(s)
        arrivals = {
            uid: (calling, called)
            for uid, calling, called in s.execute(
                select(Series.series_instance_uid, Series.calling_ae, Series.called_ae)
            )
        }
    # an instance without AE titles (STOW-RS) leaves the series' last ones
    assert arrivals == {ct: ("SCANNER", "NODE"), mr: ("MRI", "NODE")}
