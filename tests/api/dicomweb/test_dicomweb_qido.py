"""QIDO-RS against the running node with dicomweb-client, and a job's SEG found and retrieved."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.dicomweb import Node, PhantomStudy, write_phantom_study


def _value(result: dict, keyword: str) -> object:
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    values = result.get(tag, {}).get("Value", [])
    return values[0] if len(values) == 1 else values


def test_study_search_with_filters(node: Node, stored: PhantomStudy) -> None:
    client = node.dicomweb_client()
    (study,) = client.search_for_studies(search_filters={"PatientID": stored.patient_id})
    assert _value(study, "StudyInstanceUID") == stored.study_uid
    assert _value(study, "ModalitiesInStudy") == "CT"
    assert _value(study, "NumberOfStudyRelatedSeries") == 1
    assert _value(study, "NumberOfStudyRelatedInstances") == len(stored.files)
    assert _value(study, "RetrieveURL") == f"{node.dicomweb}/studies/{stored.study_uid}"
    date = pydicom.dcmread(stored.files[0], stop_before_pixels=True).StudyDate
    matching = [
        {"00100020": "DW-1?"},  # by tag, wildcard
        {"PatientID": "DW-*"},
        {"StudyDate": f"{date}-"},
        {"StudyDate": f"-{date}", "PatientID": stored.patient_id},
        {"StudyInstanceUID": f"{generate_uid()},{stored.study_uid}"},
        {"ModalitiesInStudy": "CT", "PatientID": stored.patient_id},
    ]
    for filters in matching:
        found = client.search_for_studies(search_filters=filters)
        assert stored.study_uid in [_value(s, "StudyInstanceUID") for s in found], filters
    for filters in (
        {"PatientID": "DW-12"},
        {"StudyDate": "19000101-19001231"},
        {"ModalitiesInStudy": "MR", "PatientID": stored.patient_id},
        {"StudyInstanceUID": generate_uid()},
    ):
        assert client.search_for_studies(search_filters=filters) == [], filters
    fuzzy = client.search_for_studies(
        search_filters={"PatientID": stored.patient_id}, fuzzymatching=True
    )
    assert len(fuzzy) == 1


def test_includefield_by_keyword_tag_and_all(node: Node, stored: PhantomStudy) -> None:
    client = node.dicomweb_client()
    (study,) = client.search_for_studies(
        search_filters={"PatientID": stored.patient_id}, fields=["00100030", "SOPClassesInStudy"]
    )
    assert "00100030" in study  # Patient's Birth Date
    assert _value(study, "SOPClassesInStudy") == "1.2.840.10008.5.1.4.1.1.2"
    (everything,) = client.search_for_studies(
        search_filters={"PatientID": stored.patient_id}, fields=["all"]
    )
    assert "00080090" in everything and "00100040" in everything
    response = node.session().get(
        f"{node.dicomweb}/studies",
        params={"PatientID": stored.patient_id, "includefield": "Manufacturer"},
    )
    assert response.status_code == 200 and "00080070" in response.json()[0]


def test_series_and_instance_searches(node: Node, stored: PhantomStudy) -> None:
    client = node.dicomweb_client()
    (series,) = client.search_for_series(stored.study_uid)
    assert _value(series, "SeriesInstanceUID") == stored.series_uid
    assert _value(series, "Modality") == "CT"
    assert _value(series, "NumberOfSeriesRelatedInstances") == len(stored.files)
    assert client.search_for_series(stored.study_uid, search_filters={"Modality": "MR"}) == []
    everywhere = client.search_for_series(
        search_filters={"SeriesDescription": "Test*", "PatientID": stored.patient_id}
    )
    assert [_value(s, "StudyInstanceUID") for s in everywhere] == [stored.study_uid]

    page = client.search_for_instances(stored.study_uid, stored.series_uid, limit=10, offset=35)
    assert [_value(i, "InstanceNumber") for i in page] == [36, 37, 38, 39, 40]
    first = client.search_for_instances(stored.study_uid, stored.series_uid, limit=3)
    assert [_value(i, "InstanceNumber") for i in first] == [1, 2, 3]
    assert _value(first[0], "Rows") == 40
    sop = _value(first[0], "SOPInstanceUID")
    assert _value(first[0], "RetrieveURL").endswith(f"/instances/{sop}")
    in_study = client.search_for_instances(stored.study_uid, search_filters={"InstanceNumber": "7"})
    assert len(in_study) == 1
    anywhere = client.search_for_instances(search_filters={"SOPInstanceUID": sop})
    assert [_value(i, "SeriesInstanceUID") for i in anywhere] == [stored.series_uid]


def test_malformed_queries_are_400(node: Node, stored: PhantomStudy) -> None:
    session = node.session()
    for path, params in (
        ("/studies", {"NoSuchKeyword": "x"}),
        ("/studies", {"StudyDate": "2020-01-01"}),
        ("/studies", {"StudyDate": "20201231-20200101"}),
        ("/studies", {"limit": "ten"}),
        ("/studies", {"offset": "-3"}),
        ("/series", {"includefield": "NotAnAttribute"}),
        (f"/studies/{stored.study_uid}/series", {"SeriesInstanceUID": "1.2.x"}),
        ("/studies/not-a-uid/series", {}),
        # bulk data: its VR ("OB or OW") is no DICOM JSON VR; it was echoed in every result
        ("/studies", {"PixelData": "1"}),
        ("/instances", {"7FE00010": ""}),
        ("/instances", {"includefield": "PixelData"}),
    ):
        response = session.get(node.dicomweb + path, params=params)
        assert response.status_code == 400, (path, params)
        assert response.json()["status"] == "failed"
    response = session.get(f"{node.dicomweb}/studies", params={"PixelData": "1"})
    assert response.json()["error"].startswith("PixelData is bulk data (VR OB or OW)")
    # a real attribute the index does not hold: ignored, with a warning
    response = session.get(f"{node.dicomweb}/studies", params={"Manufacturer": "ACME"})
    assert response.status_code == 200
    assert "Manufacturer" in response.headers["warning"]
    assert response.headers["content-type"] == "application/dicom+json"


def _check_seg_served(
    node: Node, stored: PhantomStudy, series_uid: str, written: pydicom.Dataset
) -> None:
    """QIDO-RS finds the SEG in the study; WADO-RS serves it, its metadata, bulk data, frames."""
    client = node.dicomweb_client()
    (seg_series,) = client.search_for_series(stored.study_uid, search_filters={"Modality": "SEG"})
    assert _value(seg_series, "SeriesInstanceUID") == series_uid
    (study,) = client.search_for_studies(search_filters={"StudyInstanceUID": stored.study_uid})
    assert "SEG" in _value(study, "ModalitiesInStudy")
    (seg_instance,) = client.search_for_instances(stored.study_uid, series_uid)
    sop = _value(seg_instance, "SOPInstanceUID")
    assert sop == written.SOPInstanceUID

    seg = client.retrieve_instance(stored.study_uid, series_uid, sop)
    assert seg.PixelData == written.PixelData
    assert seg.SegmentSequence[0].SegmentLabel == written.SegmentSequence[0].SegmentLabel

    meta = client.retrieve_instance_metadata(stored.study_uid, series_uid, sop)
    assert meta["00620002"]["Value"][0]["00620005"]["Value"] == [
        written.SegmentSequence[0].SegmentLabel
    ]
    (bulk,) = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert bulk == written.PixelData
    frames = int(written.NumberOfFrames)
    got = list(
        client.retrieve_instance_frames(
            stored.study_uid,
            series_uid,
            sop,
            frame_numbers=[1, frames],
            media_types=(("application/octet-stream", "*"),),
        )
    )
    pixels = written.pixel_array.reshape(frames, -1)
    for frame, index in zip(got, [0, frames - 1], strict=True):
        bits = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")
        assert np.array_equal(bits[: pixels.shape[1]], pixels[index])


@pytest.mark.slow
def test_stow_routes_the_series_and_the_jobs_seg_is_served(
    node: Node, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A series stored by STOW-RS goes through the same completion and routing as C-STORE: the
    demo spec's ``phantom-ct`` route runs the phantom model on it, the job files its DICOM-SEG in
    the archive, and QIDO-RS finds it in the study and WADO-RS serves it."""
    study = write_phantom_study(
        tmp_path_factory.mktemp("routed"), seed=21, patient_id="DW-21", description="Phantom CT"
    )
    client = node.dicomweb_client()
    client.store_instances([pydicom.dcmread(f) for f in study.files])
    deadline = time.monotonic() + 240
    while not client.search_for_series(study.study_uid, search_filters={"Modality": "SEG"}):
        assert time.monotonic() < deadline, "no SEG appeared in the study"
        time.sleep(0.5)
    jobs, _ = node.context.job_service.list(study_instance_uid=study.study_uid)
    (job,) = jobs
    while job.status in ("queued", "running"):  # the RTSTRUCT is written after the SEG
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.5)
        job = node.context.job_service.get(job.id)
    assert (job.route_name, job.source, job.status) == ("phantom-ct", "stow", "done")
    (artifact,) = [a for a in job.artifacts if a.kind == "dicom_segmentation"]
    written = pydicom.dcmread(artifact.path)
    assert written.SOPInstanceUID == artifact.sop_instance_uid
    _check_seg_served(node, study, artifact.series_instance_uid, written)
