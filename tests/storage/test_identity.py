"""Patient identity in the index (PS3.3 C.7.1.1, IHE PIX) and entities left empty by a move.

Every study is shown and matched with its own patient attributes; patients are keyed by Patient
ID within Issuer of Patient ID; a study without a Patient ID never joins another person.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.storage.archive import Archive
from nnunet_node.storage.models import Patient, Series, Study
from nnunet_node.storage.query import find_patients, find_series, find_studies
from tests.support.datasets import build_dataset, encode


def _ingest(archive: Archive, *, drop: tuple[str, ...] = (), **attributes: Any) -> Dataset:
    ds = build_dataset(**attributes)
    for keyword in drop:
        delattr(ds, keyword)
    archive.ingest(encode(ds), source="dimse")
    return ds


def _study(session: Session, uid: str, **query: str) -> dict[str, Any]:
    (row,) = find_studies(session, {"StudyInstanceUID": uid, **query})
    return row


def test_empty_and_absent_patient_id_never_share_a_patient(
    archive: Archive, index_sessions: sessionmaker[Session]
) -> None:
    empty = _ingest(archive, PatientID="", PatientName="Empty^Anna", PatientBirthDate="19500101")
    absent = _ingest(
        archive, drop=("PatientID",), PatientName="Absent^Bert", PatientBirthDate="19600202"
    )
    other_empty = _ingest(archive, PatientID="", PatientName="Empty^Carl")
    with index_sessions() as session:
        first = _study(session, empty.StudyInstanceUID)
        second = _study(session, absent.StudyInstanceUID)
        third = _study(session, other_empty.StudyInstanceUID)
        assert (first["PatientName"], first["PatientBirthDate"]) == ("Empty^Anna", "19500101")
        assert (second["PatientName"], second["PatientBirthDate"]) == ("Absent^Bert", "19600202")
        assert third["PatientName"] == "Empty^Carl"
        # each name finds its own study, and only it
        for ds in (empty, absent, other_empty):
            rows = find_studies(session, {"PatientName": str(ds.PatientName)})
            assert [r["StudyInstanceUID"] for r in rows] == [ds.StudyInstanceUID]
        patients = find_patients(session, {"PatientID": ""})
        assert sorted(p["PatientName"] for p in patients) == [
            "Absent^Bert",
            "Empty^Anna",
            "Empty^Carl",
        ]
        assert session.scalar(select(func.count()).select_from(Patient)) == 3
        assert all(p["NumberOfPatientRelatedStudies"] == 1 for p in patients)


def test_patient_id_with_two_issuers_is_two_patients(
    archive: Archive, index_sessions: sessionmaker[Session]
) -> None:
    a = _ingest(archive, PatientID="12345", IssuerOfPatientID="HOSP_A", PatientName="Alpha^Ann")
    b = _ingest(archive, PatientID="12345", IssuerOfPatientID="HOSP_B", PatientName="Beta^Bob")
    a2 = _ingest(archive, PatientID="12345", IssuerOfPatientID="HOSP_A", PatientName="Alpha^Ann")
    with index_sessions() as session:
        patients = find_patients(session, {"PatientID": "12345", "IssuerOfPatientID": ""})
        by_issuer = {p["IssuerOfPatientID"]: p for p in patients}
        assert set(by_issuer) == {"HOSP_A", "HOSP_B"}
        assert by_issuer["HOSP_A"]["NumberOfPatientRelatedStudies"] == 2
        assert by_issuer["HOSP_B"]["NumberOfPatientRelatedStudies"] == 1
        assert by_issuer["HOSP_B"]["PatientName"] == "Beta^Bob"
        assert _study(session, b.StudyInstanceUID)["PatientName"] == "Beta^Bob"
        rows = find_studies(session, {"PatientID": "12345", "IssuerOfPatientID": "HOSP_A"})
        assert {r["StudyInstanceUID"] for r in rows} == {a.StudyInstanceUID, a2.StudyInstanceUID}


def test_each_study_keeps_its_own_patient_attributes(
    archive: Archive, index_sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """Same patient, renamed between studies: each study shows the name it was sent with, and
    the patient record the latest study's. Within one study the first instance's name stays."""
    old = _ingest(archive, PatientID="P9", PatientName="Maiden^Mia", PatientSex="F")
    new = _ingest(archive, PatientID="P9", PatientName="Married^Mia", PatientSex="F")
    with caplog.at_level(logging.WARNING, logger="nnunet_node.storage.indexer"):
        _ingest(
            archive,
            study_uid=old.StudyInstanceUID,
            series_uid=old.SeriesInstanceUID,
            PatientID="P9",
            PatientName="Wrong^Name",
            PatientBirthDate="20000101",  # fills what was empty
        )
    assert any("keeps its first instance's values" in r.message for r in caplog.records)
    with index_sessions() as session:
        first = _study(session, old.StudyInstanceUID)
        assert first["PatientName"] == "Maiden^Mia"
        assert first["PatientBirthDate"] == "20000101"
        assert _study(session, new.StudyInstanceUID)["PatientName"] == "Married^Mia"
        assert find_studies(session, {"PatientName": "Wrong^Name"}) == []
        found = find_studies(session, {"PatientName": "maiden*"})
        assert [r["StudyInstanceUID"] for r in found] == [old.StudyInstanceUID]
        (patient,) = find_patients(session, {"PatientID": "P9"})
        assert patient["PatientName"] == "Married^Mia"
        series = find_series(session, {"StudyInstanceUID": old.StudyInstanceUID})
        assert series[0]["PatientName"] == "Maiden^Mia"


def test_an_instance_moved_to_another_series_leaves_no_empty_series_or_study(
    archive: Archive,
    index_sessions: sessionmaker[Session],
    make_instance: Callable[..., bytes],
) -> None:
    study, other_study = generate_uid(), generate_uid()
    old_series, new_series = generate_uid(), generate_uid()
    sop_a, sop_b = generate_uid(), generate_uid()
    for sop in (sop_a, sop_b):
        archive.ingest(
            make_instance(study_uid=study, series_uid=old_series, sop_uid=sop), source="dimse"
        )
    archive.ingest(
        make_instance(study_uid=study, series_uid=new_series, sop_uid=sop_a), source="dimse"
    )
    with index_sessions() as session:
        (row,) = find_studies(session, {"StudyInstanceUID": study})
        assert row["NumberOfStudyRelatedSeries"] == 2
        assert row["NumberOfStudyRelatedInstances"] == 2
    # the second instance moves too: the old series is empty and disappears
    archive.ingest(
        make_instance(study_uid=study, series_uid=new_series, sop_uid=sop_b), source="dimse"
    )
    with index_sessions() as session:
        (row,) = find_studies(session, {"StudyInstanceUID": study})
        assert row["NumberOfStudyRelatedSeries"] == 1
        assert row["NumberOfStudyRelatedInstances"] == 2
        series = find_series(session, {"StudyInstanceUID": study})
        assert [s["SeriesInstanceUID"] for s in series] == [new_series]
        assert session.scalar(select(Series).filter_by(series_instance_uid=old_series)) is None
    # both move to a series of another study (and patient): the first study disappears
    third_series = generate_uid()
    for sop in (sop_a, sop_b):
        archive.ingest(
            make_instance(
                study_uid=other_study, series_uid=third_series, sop_uid=sop, PatientID="P2"
            ),
            source="dimse",
        )
    with index_sessions() as session:
        assert find_studies(session, {"StudyInstanceUID": study}) == []
        assert session.scalar(select(Study).filter_by(study_instance_uid=study)) is None
        assert find_patients(session, {"PatientID": "P1"}) == []
        (moved,) = find_studies(session, {"StudyInstanceUID": other_study})
        assert moved["NumberOfStudyRelatedInstances"] == 2
        assert moved["NumberOfStudyRelatedSeries"] == 1
