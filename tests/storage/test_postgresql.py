"""The same schema, ingest, queries and job claims on PostgreSQL (any SQLAlchemy URL works).

Runs when ``NNUNET_NODE_TEST_POSTGRES_URL`` names a server database from which the test may create
and drop a scratch database (``.ci/run`` starts a throw-away PostgreSQL and sets it); else skipped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.storage import query
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.jobs import JobFilters, JobStore
from nnunet_node.storage.migrations import downgrade, upgrade
from nnunet_node.storage.models import Instance, JobStatus, Series, Study
from tests.storage.index_checks import assert_aggregates_counted, fill_0005
from tests.support.migrations import check_old_style_jobs_upgrade
from tests.support.postgres import NOT_SET, SERVER_URL, scratch_database

pytestmark = pytest.mark.skipif(not SERVER_URL, reason=NOT_SET)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="module")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    downgrade(pg_url, "base")  # a no-op on the fresh database: the path must work there too
    upgrade(pg_url)
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(pg_engine)


def test_migrations_down_and_up(pg_url: str, pg_engine: Engine) -> None:
    downgrade(pg_url, "base")
    with pg_engine.connect() as conn:
        tables = conn.execute(text("SELECT count(*) FROM pg_tables WHERE tablename = 'instances'"))
        assert tables.scalar_one() == 0
    upgrade(pg_url)
    with pg_engine.connect() as conn:
        tables = conn.execute(text("SELECT count(*) FROM pg_tables WHERE tablename = 'instances'"))
        assert tables.scalar_one() == 1


def test_upgrade_carries_old_style_jobs_over() -> None:
    with scratch_database() as url:
        check_old_style_jobs_upgrade(url)


def test_concurrent_ingest_duplicates_and_queries(
    tmp_path: Path, sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    archive = Archive(tmp_path / "dicom", sessions)
    study, series = generate_uid(), generate_uid()
    blobs = [
        make_instance(study_uid=study, series_uid=series, InstanceNumber=i, PatientID="PG1")
        for i in range(1, 31)
    ]
    errors: list[BaseException] = []

    def store(chunk: list[bytes]) -> None:
        try:
            for data in chunk:
                archive.ingest(data, source="dimse", calling_ae="SCANNER")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(blobs[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    again = archive.ingest(blobs[0], source="dimse")
    assert again.duplicate

    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 30
        assert session.scalar(select(func.count()).select_from(Series)) == 1
    with archive.read_sessions() as session:
        studies = query.find_studies(session, {"PatientID": "PG*"})
        assert [s["StudyInstanceUID"] for s in studies] == [study]
        assert studies[0]["NumberOfStudyRelatedInstances"] == 30
        assert studies[0]["ModalitiesInStudy"] == ["CT"]
        found = query.find_instances(session, {"SeriesInstanceUID": series})
        assert [row["InstanceNumber"] for row in found] == list(range(1, 31))
        # C-FIND's streamed form: a server-side cursor read 7 rows at a time
        streamed = query.iter_find(session, "IMAGE", {"SeriesInstanceUID": series}, batch=7)
        assert list(streamed) == found
    # C-FIND's own form: the kept statement on a pooled DBAPI connection, values bound
    engine = archive.read_sessions.kw["bind"]
    for include in ([], ["SOPClassesInStudy"]):
        by_id = query.iter_find(engine, "STUDY", {"PatientID": "PG*"}, include=include, batch=7)
        assert [s["StudyInstanceUID"] for s in by_id] == [study]
        streamed = query.iter_find(engine, "IMAGE", {"SeriesInstanceUID": series}, batch=7)
        assert [r["InstanceNumber"] for r in streamed] == list(range(1, 31))
    assert len(list((tmp_path / "dicom" / study / series).glob("*.dcm"))) == 30
    with sessions() as session:
        assert_aggregates_counted(session)


def test_concurrent_series_of_one_study_are_all_counted(
    tmp_path: Path, sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """Four writers each add a series of another modality to one study at once: the study's
    number of series and its modalities (counted again under the study row's lock) hold all
    four, its number of instances every instance (atomic increments)."""
    archive = Archive(tmp_path / "dicom", sessions)
    study = generate_uid()
    modalities = ("CT", "MR", "PT", "SEG")
    series = {modality: generate_uid() for modality in modalities}
    errors: list[BaseException] = []
    start = threading.Barrier(len(modalities))

    def store(modality: str) -> None:
        try:
            blobs = [
                make_instance(
                    study_uid=study,
                    series_uid=series[modality],
                    InstanceNumber=n,
                    Modality=modality,
                    PatientID="PG2",
                )
                for n in range(1, 6)
            ]
            start.wait()
            for data in blobs:
                archive.ingest(data, source="dimse")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(m,)) for m in modalities]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with archive.read_sessions() as session:
        (row,) = query.find_studies(session, {"StudyInstanceUID": study})
        assert row["ModalitiesInStudy"] == sorted(modalities)
        assert row["NumberOfStudyRelatedSeries"] == 4
        assert row["NumberOfStudyRelatedInstances"] == 20
    with sessions() as session:
        assert_aggregates_counted(session)


def test_concurrent_new_resent_and_moved_instances_keep_the_counts(
    tmp_path: Path, sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> None:
    """Four writers at once into three series of two studies: new instances, re-sends, and
    instances moved to another series and study (their old series counted down, pruned when
    left empty). The counts are written at the end of each transaction, series rows before
    study rows (storage/indexer.py): every count equals what the rows say, and no writer
    failed (a deadlock would fail one)."""
    archive = Archive(tmp_path / "dicom", sessions)
    studies = [generate_uid(), generate_uid()]
    series = [(studies[0], generate_uid(), "CT"), (studies[0], generate_uid(), "MR")]
    series.append((studies[1], generate_uid(), "PT"))
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def store(writer: int) -> None:
        try:
            plan = []
            for n in range(12):
                study, uid, modality = series[(writer + n) % 3]
                sop = generate_uid()
                attributes = {"PatientID": "PG3", "Modality": modality, "InstanceNumber": n}
                plan.append(
                    make_instance(study_uid=study, series_uid=uid, sop_uid=sop, **attributes)
                )
                if n % 4 == 1:  # re-sent as it was
                    plan.append(plan[-1])
                if n % 4 == 3:  # moved to the next series
                    study, uid, modality = series[(writer + n + 1) % 3]
                    attributes["Modality"] = modality
                    plan.append(
                        make_instance(study_uid=study, series_uid=uid, sop_uid=sop, **attributes)
                    )
            start.wait()
            for data in plan:
                archive.ingest(data, source="dimse", calling_ae=f"W{writer}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with sessions() as session:
        mine = (
            select(func.count())
            .select_from(Instance)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .where(Study.study_instance_uid.in_(studies))
        )
        assert session.scalar(mine) == 48
        assert_aggregates_counted(session)
    with archive.read_sessions() as session:
        found = {
            row["StudyInstanceUID"]: row["NumberOfStudyRelatedInstances"]
            for row in query.find_studies(session, {"PatientID": "PG3"})
        }
    assert sum(found.values()) == 48 and set(found) == set(studies)


def test_migration_0006_counts_existing_rows() -> None:
    with scratch_database() as url:
        upgrade(url, "0005")
        engine = make_engine(url)
        try:
            fill_0005(engine)
            upgrade(url)
            with Session(engine) as session:
                assert_aggregates_counted(session)
                rows = query.find_studies(session, {})
                assert [r["ModalitiesInStudy"] for r in rows] == [["CT", "SEG"], ["MR"], []]
                assert [r["NumberOfStudyRelatedInstances"] for r in rows] == [3, 1, 1]
        finally:
            engine.dispose()


def test_each_job_is_claimed_once(sessions: sessionmaker[Session]) -> None:
    store = JobStore(sessions)
    created = {
        store.create(source="http", request={"nnunet_id": "phantom"}, models=["phantom"]).id
        for _ in range(12)
    }
    claimed: list[str] = []
    lock = threading.Lock()

    def claim() -> None:
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(created)
    rows, total = store.list(JobFilters(status=JobStatus.RUNNING), limit=5, offset=0)
    assert total == 12
    assert len(rows) == 5
