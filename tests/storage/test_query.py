"""C-FIND and QIDO-RS queries over a small archive: each level, computed attributes, paging,
response identifiers and the file lists for retrieves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import InvalidRequest
from nnunet_node.storage.archive import Archive
from nnunet_node.storage.query import _plan as _plan  # the kept statements
from nnunet_node.storage.query import (
    find,
    find_instances,
    find_patients,
    find_series,
    find_studies,
    instance_files,
    instance_paths,
    instance_refs,
    iter_find,
    keyword_of,
    to_dataset,
)

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class World:
    archive: Archive
    sessions: sessionmaker[Session]
    study_a: str  # P1: CT series of 3 + SEG of 1
    study_b: str  # P1: MR series of 2
    study_c: str  # P2: CT series of 1
    ct_a: str
    seg_a: str
    mr_b: str
    ct_c: str


@pytest.fixture
def world(
    archive: Archive, index_sessions: sessionmaker[Session], make_instance: Callable[..., bytes]
) -> World:
    w = World(archive, index_sessions, *(generate_uid() for _ in range(7)))
    common_a = {"study_uid": w.study_a, "StudyDate": "20240102", "StudyDescription": "Head CT"}
    for n in (3, 1, 2):
        archive.ingest(
            make_instance(
                **common_a, series_uid=w.ct_a, InstanceNumber=n, SeriesNumber=1, Modality="CT"
            ),
            source="dimse",
        )
    archive.ingest(
        make_instance(
            **common_a,
            series_uid=w.seg_a,
            SeriesNumber=100,
            Modality="SEG",
            SOPClassUID=SEG_CLASS,
            SeriesDescription="nnU-Net phantom",
        ),
        source="job",
    )
    for n in (1, 2):
        archive.ingest(
            make_instance(
                study_uid=w.study_b,
                series_uid=w.mr_b,
                InstanceNumber=n,
                Modality="MR",
                StudyDate="20240301",
                AccessionNumber="ACC_1%",
            ),
            source="stow",
        )
    archive.ingest(
        make_instance(
            study_uid=w.study_c,
            series_uid=w.ct_c,
            PatientID="P2",
            PatientName="Müller^Jürgen",
            StudyDate="20231224",
        ),
        source="dimse",
    )
    return w


def test_patient_level_with_counts(world: World) -> None:
    with world.sessions() as s:
        rows = find_patients(s, {"PatientID": "P1"})
        assert len(rows) == 1
        row = rows[0]
        assert row["PatientName"] == "Doe^Jane"
        assert row["NumberOfPatientRelatedStudies"] == 2
        assert row["NumberOfPatientRelatedSeries"] == 3
        assert row["NumberOfPatientRelatedInstances"] == 6
        assert [r["PatientID"] for r in find_patients(s, {"PatientName": "mü*"})] == ["P2"]
        assert len(find_patients(s, {})) == 2


def test_study_level_matching_and_computed(world: World) -> None:
    with world.sessions() as s:
        rows = find_studies(s, {"PatientID": "P1"})
        assert [r["StudyInstanceUID"] for r in rows] == [world.study_a, world.study_b]
        a = rows[0]
        assert a["ModalitiesInStudy"] == ["CT", "SEG"]
        assert "SOPClassesInStudy" not in a  # only when asked for
        asked = find_studies(s, {"StudyInstanceUID": world.study_a}, include=["SOPClassesInStudy"])
        assert asked[0]["SOPClassesInStudy"] == sorted(["1.2.840.10008.5.1.4.1.1.2", SEG_CLASS])
        assert "NumberOfStudyRelatedSeries" not in asked[0]
        assert a["NumberOfStudyRelatedSeries"] == 2
        assert a["NumberOfStudyRelatedInstances"] == 4
        assert a["StudyDescription"] == "Head CT"
        assert a["InstanceAvailability"] == "ONLINE"

        def uids(query: dict[str, str]) -> set[str]:
            return {r["StudyInstanceUID"] for r in find_studies(s, query)}

        assert uids({"StudyDate": "20240101-"}) == {world.study_a, world.study_b}
        assert uids({"StudyDate": "-20231231"}) == {world.study_c}
        assert uids({"ModalitiesInStudy": "SEG"}) == {world.study_a}
        assert uids({"ModalitiesInStudy": "MR\\SEG"}) == {world.study_a, world.study_b}
        assert uids({"StudyInstanceUID": f"{world.study_a}\\{world.study_c}"}) == {
            world.study_a,
            world.study_c,
        }
        assert uids({"AccessionNumber": "ACC_1%"}) == {world.study_b}
        assert uids({"AccessionNumber": "ACC?1*"}) == {world.study_b}
        assert uids({"AccessionNumber": "ACCX1*"}) == set()
        assert uids({"StudyDescription": "head*"}) == set()  # case-sensitive (not PN)
        assert uids({"PatientName": "doe*"}) == {world.study_a, world.study_b}
        assert uids({"0020000D": world.study_b}) == {world.study_b}  # QIDO tags
        # keys the index does not hold do not restrict (returned empty)
        assert uids({"StudyID": "", "PatientAge": "040Y"}) == {
            world.study_a,
            world.study_b,
            world.study_c,
        }


def test_study_paging_is_stable(world: World) -> None:
    with world.sessions() as s:
        everything = [r["StudyInstanceUID"] for r in find_studies(s, {})]
        pages = [
            r["StudyInstanceUID"]
            for offset in range(0, 3)
            for r in find_studies(s, {}, limit=1, offset=offset)
        ]
        assert pages == everything and len(everything) == 3
        assert find_studies(s, {}, limit=0) == []
        with pytest.raises(InvalidRequest):
            find_studies(s, {}, offset=-1)


def test_series_level(world: World) -> None:
    with world.sessions() as s:
        rows = find_series(s, {"StudyInstanceUID": world.study_a})
        assert [r["SeriesInstanceUID"] for r in rows] == [world.ct_a, world.seg_a]
        assert [r["NumberOfSeriesRelatedInstances"] for r in rows] == [3, 1]
        assert rows[1]["SeriesDescription"] == "nnU-Net phantom"
        assert rows[1]["StudyDescription"] == "Head CT"  # QIDO /series carries study attributes
        assert rows[0]["NumberOfStudyRelatedSeries"] == 2
        seg = find_series(s, {"Modality": "SEG"})
        assert [r["SeriesInstanceUID"] for r in seg] == [world.seg_a]
        assert find_series(s, {"SeriesNumber": "100"})[0]["SeriesInstanceUID"] == world.seg_a
        assert len(find_series(s, {"PatientID": "P1"})) == 3
        only = find_series(
            s, {"StudyInstanceUID": world.study_a}, include=["NumberOfSeriesRelatedInstances"]
        )
        assert "ModalitiesInStudy" not in only[0]


def test_instance_level(world: World) -> None:
    with world.sessions() as s:
        rows = find_instances(s, {"SeriesInstanceUID": world.ct_a})
        assert [r["InstanceNumber"] for r in rows] == [1, 2, 3]  # by Instance Number
        assert all(r["NumberOfSeriesRelatedInstances"] == 3 for r in rows)
        assert rows[0]["AvailableTransferSyntaxUID"] == "1.2.840.10008.1.2.1"
        assert (world.archive.root / rows[0]["_path"]).is_file()
        assert len(find_instances(s, {"StudyInstanceUID": world.study_a})) == 4
        assert len(find_instances(s, {"SOPClassUID": SEG_CLASS})) == 1
        assert len(find_instances(s, {"SeriesInstanceUID": world.ct_a}, limit=2, offset=2)) == 1
        assert [r["InstanceNumber"] for r in find_instances(s, {"InstanceNumber": "2"})] == [2, 2]


def test_cfind_dispatch_by_level(world: World) -> None:
    with world.sessions() as s:
        assert len(find(s, "PATIENT", {})) == 2
        assert len(find(s, "study", {"PatientID": "P2"})) == 1
        assert len(find(s, "SERIES", {"StudyInstanceUID": world.study_b})) == 1
        assert len(find(s, "IMAGE", {"SeriesInstanceUID": world.mr_b})) == 2
        with pytest.raises(InvalidRequest):
            find(s, "FRAME", {})


@pytest.mark.parametrize(
    ("level", "query", "include"),
    [
        ("PATIENT", {}, None),
        ("STUDY", {}, None),
        ("STUDY", {"PatientID": "P1"}, ["SOPClassesInStudy", "ModalitiesInStudy"]),
        ("SERIES", {"Modality": "CT\\MR"}, ["NumberOfSeriesRelatedInstances"]),
        ("IMAGE", {}, ["SOPClassesInStudy"]),
        ("IMAGE", {"PatientID": "P1"}, []),
    ],
)
def test_streamed_rows_are_the_found_rows(
    world: World, level: str, query: dict[str, str], include: list[str] | None
) -> None:
    """C-FIND's streamed form gives the rows, order and computed attributes of find(), read in
    batches (here of 2, so that each query spans batches)."""
    with world.sessions() as s:
        expected = find(s, level, query, include=include)
        assert expected
        assert list(iter_find(s, level, query, include=include, batch=2)) == expected


CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("level", "first", "second"),
    [
        ("STUDY", {"PatientID": "P1"}, {"PatientID": "P2"}),
        ("STUDY", {"StudyDate": "20240101-"}, {"StudyDate": "20240201-"}),
        ("STUDY", {"StudyDate": "20231224"}, {"StudyDate": "20240301"}),
        ("STUDY", {"ModalitiesInStudy": "MR\\SEG"}, {"ModalitiesInStudy": "CT\\MR"}),
        ("STUDY", {"AccessionNumber": "ACC_1%"}, {"AccessionNumber": "ACCX1%"}),
        ("STUDY", {"AccessionNumber": "ACC?1*"}, {"AccessionNumber": "ACC?2*"}),
        ("STUDY", {"PatientName": "doe*"}, {"PatientName": "mü*"}),
        ("STUDY", {"PatientName": "Doe^Jane"}, {"PatientName": "MÜLLER^jürgen"}),
        ("PATIENT", {"PatientName": "doe^*"}, {"PatientName": "Müller^*"}),
        ("SERIES", {"SeriesNumber": "100"}, {"SeriesNumber": "1"}),
        ("SERIES", {"Modality": "CT\\MR"}, {"Modality": "SEG\\MR"}),
        ("IMAGE", {"InstanceNumber": "2"}, {"InstanceNumber": "3"}),
        ("IMAGE", {"SOPClassesInStudy": SEG_CLASS}, {"SOPClassesInStudy": CT_CLASS}),
        ("IMAGE", {"SOPClassUID": f"{SEG_CLASS}\\x"}, {"SOPClassUID": f"{CT_CLASS}\\y"}),
    ],
)
def test_a_kept_statement_binds_each_querys_values(
    world: World, level: str, first: dict[str, str], second: dict[str, str]
) -> None:
    """C-FIND keeps one compiled statement per query shape: a second query of the shape builds
    nothing, and finds its own rows (those find() gives), not the first query's."""
    engine = world.archive.read_sessions.kw["bind"]
    # with SOPClassesInStudy (or the patient counts) a second statement completes the rows;
    # without, the SELECT runs alone on the pool's DBAPI connection
    for include in (["SOPClassesInStudy", "NumberOfSeriesRelatedInstances"], []):
        with world.sessions() as s:
            expected = [find(s, level, q, include=include) for q in (first, second)]
        assert expected[0] != expected[1]
        assert list(iter_find(engine, level, first, include=include)) == expected[0]
        built = _plan.cache_info().misses
        assert list(iter_find(engine, level, second, include=include)) == expected[1]
        assert _plan.cache_info().misses == built


def test_to_dataset_returns_the_requested_keys(world: World) -> None:
    with world.sessions() as s:
        row = find_studies(s, {"StudyInstanceUID": world.study_a})[0]
        keys = [
            "QueryRetrieveLevel",
            "StudyInstanceUID",
            "PatientName",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances",
            "StudyID",
            "PatientAge",
            "ReferencedStudySequence",
        ]
        ds = to_dataset(row, keys)
        assert ds.StudyInstanceUID == world.study_a
        assert str(ds.PatientName) == "Doe^Jane"
        assert list(ds.ModalitiesInStudy) == ["CT", "SEG"]
        assert ds.NumberOfStudyRelatedInstances == 4
        assert ds.StudyID == "" and ds.PatientAge == ""  # known keys without a value: empty
        assert ds.ReferencedStudySequence == []
        assert "QueryRetrieveLevel" not in ds  # the node sets it
        assert "SpecificCharacterSet" not in ds
        json = ds.to_json_dict()
        assert json["00080061"] == {"vr": "CS", "Value": ["CT", "SEG"]}

        other = find_studies(s, {"PatientID": "P2"})[0]
        ds = to_dataset(other, ["PatientName"])
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "Müller^Jürgen"


def test_keywords_and_tags() -> None:
    assert keyword_of("PatientID") == "PatientID"
    assert keyword_of("00100020") == "PatientID"
    assert keyword_of("(0010,0020)") == "PatientID"
    with pytest.raises(InvalidRequest):
        keyword_of("NoSuchKeyword")
    with pytest.raises(InvalidRequest):
        keyword_of("99999999")


def test_retrieve_lists(world: World) -> None:
    with world.sessions() as s:
        study = instance_refs(s, "STUDY", world.study_a)
        assert len(study) == 4
        # CT first (series number 1, instances in order), then the SEG (series number 100).
        assert [r.series_instance_uid for r in study] == [world.ct_a] * 3 + [world.seg_a]
        assert study[-1].sop_class_uid == SEG_CLASS
        assert len(instance_refs(s, "PATIENT", "P1")) == 6
        assert len(instance_refs(s, "SERIES", [world.mr_b, world.ct_c])) == 3
        one = study[0].sop_instance_uid
        assert [r.sop_instance_uid for r in instance_refs(s, "IMAGE", one)] == [one]
        assert instance_refs(s, "SERIES", world.ct_a, study_uid=world.study_b) == []
        paths = instance_paths(s, "SERIES", world.ct_a)
        assert all(not p.is_absolute() for p in paths)
        files = instance_files(s, world.archive.root, "STUDY", world.study_b)
        assert len(files) == 2 and all(isinstance(f, Path) and f.is_file() for f in files)
        assert instance_refs(s, "STUDY", []) == []
        with pytest.raises(InvalidRequest):
            instance_refs(s, "FRAME", "1.2")
