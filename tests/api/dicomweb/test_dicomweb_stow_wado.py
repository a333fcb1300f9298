"""STOW-RS and WADO-RS against the running node, through dicomweb-client and plain requests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom.uid import generate_uid

from nnunet_node.api.dicomweb.multipart import encode_parts
from tests.support.dicomweb import Node, PhantomStudy

DICOM_PARTS = 'multipart/related; type="application/dicom"; boundary=xyzzy'


def _multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    return b"".join(encode_parts("xyzzy", [(part_type, [p]) for p in parts]))


def _stow(node: Node, body: bytes, *, study: str | None = None) -> requests.Response:
    url = f"{node.dicomweb}/studies" + (f"/{study}" if study else "")
    headers = {"Content-Type": DICOM_PARTS, "Accept": "application/dicom+json"}
    return node.session().post(url, data=body, headers=headers)


def test_stored_instances_come_back_byte_for_byte(node: Node, stored: PhantomStudy) -> None:
    client = node.dicomweb_client()
    first = pydicom.dcmread(stored.files[0], stop_before_pixels=True)
    # WADO-RS instance: the file as the archive holds it, which is the file as sent
    instance = client.retrieve_instance(stored.study_uid, stored.series_uid, first.SOPInstanceUID)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, instance, enforce_file_format=True)
    with_meta = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert with_meta.PixelData == pydicom.dcmread(stored.files[0]).PixelData
    # and over plain HTTP: the parts' bytes equal the stored files' bytes
    response = node.session().get(
        f"{node.dicomweb}/studies/{stored.study_uid}/series/{stored.series_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 200
    parts = list(_split(response))
    assert sorted(parts) == sorted(f.read_bytes() for f in stored.files)
    series = client.retrieve_series(stored.study_uid, stored.series_uid)
    assert {ds.SOPInstanceUID for ds in series} == {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in stored.files
    }
    study = client.retrieve_study(stored.study_uid)
    assert len(study) == len(stored.files)


def test_a_series_with_an_instance_larger_than_a_piece_comes_back_whole(
    node: Node, stored: PhantomStudy
) -> None:
    """WADO-RS series: an instance larger than the response's 4 MiB pieces (read in several)
    between two small ones; every part byte for byte, in order (api/dicomweb/wado.py)."""
    study_uid, series_uid = generate_uid(), generate_uid()  # the shared study stays as it is
    files = []
    for rows in (16, 1500, 16):
        ds = pydicom.dcmread(stored.files[0])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = len(files) + 1
        ds.Rows = ds.Columns = rows
        ds.PixelData = np.arange(rows * rows, dtype=np.uint16).tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    assert len(files[1]) > (4 << 20)
    assert _stow(node, _multipart(files), study=study_uid).status_code == 200
    response = node.session().get(
        f"{node.dicomweb}/studies/{study_uid}/series/{series_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 200
    assert _split(response) == files


def _split(response: requests.Response) -> list[bytes]:
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    out = []
    for chunk in response.content.split(b"\r\n--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        out.append(chunk.split(b"\r\n\r\n", 1)[1])
    return out


def test_metadata_at_every_level_with_bulk_data(node: Node, stored: PhantomStudy) -> None:
    client = node.dicomweb_client()
    study_meta = client.retrieve_study_metadata(stored.study_uid)
    series_meta = client.retrieve_series_metadata(stored.study_uid, stored.series_uid)
    assert len(study_meta) == len(series_meta) == len(stored.files)
    sop = series_meta[0]["00080018"]["Value"][0]
    instance_meta = client.retrieve_instance_metadata(stored.study_uid, stored.series_uid, sop)
    assert instance_meta["0020000D"]["Value"] == [stored.study_uid]
    uri = instance_meta["7FE00010"]["BulkDataURI"]
    assert uri.startswith(node.dicomweb)
    source = next(f for f in stored.files if pydicom.dcmread(f).SOPInstanceUID == sop)
    (bulk,) = client.retrieve_bulkdata(uri)
    assert bulk == pydicom.dcmread(source).PixelData


def test_frames_are_the_raw_pixels(node: Node, stored: PhantomStudy) -> None:
    client = node.dicomweb_client()
    ds = pydicom.dcmread(stored.files[3])
    frames = list(
        client.retrieve_instance_frames(
            stored.study_uid,
            stored.series_uid,
            ds.SOPInstanceUID,
            frame_numbers=[1],
            media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),),
        )
    )
    assert frames == [ds.PixelData]
    # OHIF's Accept header
    response = node.session().get(
        f"{node.dicomweb}/studies/{stored.study_uid}/series/{stored.series_uid}"
        f"/instances/{ds.SOPInstanceUID}/frames/1",
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
    )
    assert response.status_code == 200
    assert _split(response) == [ds.PixelData]
    pixels = np.frombuffer(ds.PixelData, dtype=np.int16)
    assert pixels.size == ds.Rows * ds.Columns


def test_unknown_uids_are_404(node: Node, stored: PhantomStudy) -> None:
    session = node.session()
    unknown = generate_uid()
    for path in (
        f"/studies/{unknown}",
        f"/studies/{unknown}/metadata",
        f"/studies/{stored.study_uid}/series/{unknown}",
        f"/studies/{stored.study_uid}/series/{stored.series_uid}/instances/{unknown}",
        f"/studies/{stored.study_uid}/series/{stored.series_uid}/instances/{unknown}/frames/1",
    ):
        response = session.get(node.dicomweb + path)
        assert response.status_code == 404, path
    first = pydicom.dcmread(stored.files[0], stop_before_pixels=True)
    response = session.get(
        f"{node.dicomweb}/studies/{stored.study_uid}/series/{stored.series_uid}"
        f"/instances/{first.SOPInstanceUID}/frames/2"
    )
    assert response.status_code == 404  # a single-frame instance
    assert session.get(f"{node.dicomweb}/studies/1.2.3..x").status_code == 400


def test_a_bad_part_loses_no_other_part(node: Node, tmp_path: Path) -> None:
    from tests.support.dicomweb import write_phantom_study

    study = write_phantom_study(tmp_path, seed=12, patient_id="DW-12")
    good = [f.read_bytes() for f in study.files[:3]]
    other = write_phantom_study(tmp_path / "other", seed=13, patient_id="DW-13")
    foreign = other.files[0].read_bytes()
    body = _multipart([good[0], b"this is not DICOM", good[1], foreign, good[2]])
    response = _stow(node, body, study=study.study_uid)
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/dicom+json"
    result = pydicom.Dataset.from_json(response.json())
    assert len(result.ReferencedSOPSequence) == 3
    reasons = sorted(item.FailureReason for item in result.FailedSOPSequence)
    assert reasons == [0xC000, 0xC409]
    mismatch = next(i for i in result.FailedSOPSequence if i.FailureReason == 0xC409)
    assert mismatch.ReferencedSOPInstanceUID == pydicom.dcmread(other.files[0]).SOPInstanceUID
    # the foreign study was not stored, the good parts were
    session = node.session()
    assert session.get(f"{node.dicomweb}/studies/{other.study_uid}/metadata").status_code == 404
    metadata = session.get(f"{node.dicomweb}/studies/{study.study_uid}/metadata").json()
    assert len(metadata) == 3
    # nothing stored at all: 409
    response = _stow(node, _multipart([b"junk", b"more junk"]))
    assert response.status_code == 409
    assert len(response.json()["00081198"]["Value"]) == 2
    # a body cut short: the whole parts before the cut are stored, the cut one fails
    extra = [f.read_bytes() for f in study.files[3:5]]
    response = _stow(node, _multipart(extra)[:-200])
    assert response.status_code == 202
    result = pydicom.Dataset.from_json(response.json())
    assert len(result.ReferencedSOPSequence) == 1
    assert [i.FailureReason for i in result.FailedSOPSequence] == [0xC000]
    assert len(session.get(f"{node.dicomweb}/studies/{study.study_uid}/metadata").json()) == 4
    # a re-sent instance is stored again, not duplicated
    assert _stow(node, _multipart([good[0]])).status_code == 200
    assert len(session.get(f"{node.dicomweb}/studies/{study.study_uid}/metadata").json()) == 4


def test_wrong_content_types_are_415(node: Node, stored: PhantomStudy) -> None:
    body = _multipart([stored.files[0].read_bytes()])
    session = node.session()
    url = f"{node.dicomweb}/studies"
    for content_type in (
        "application/dicom",
        "application/json",
        'multipart/related; type="application/dicom+json"; boundary=xyzzy',
        "multipart/form-data; boundary=xyzzy",
    ):
        response = session.post(url, data=body, headers={"Content-Type": content_type})
        assert response.status_code == 415, content_type
    assert session.post(url, data=body).status_code == 415  # no content type at all
    response = session.post(url, data=b"no parts here", headers={"Content-Type": DICOM_PARTS})
    assert response.status_code == 400


def test_api_key_and_cors(node: Node, stored: PhantomStudy) -> None:
    url = f"{node.dicomweb}/studies/{stored.study_uid}/metadata"
    assert requests.get(url).status_code == 401
    assert node.session("wrong").get(url).status_code == 401
    assert requests.get(url, headers={"X-API-Key": "dicomweb-test-key"}).status_code == 200
    preflight = requests.options(
        url,
        headers={
            "Origin": "http://viewer.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,accept",
        },
    )
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    response = node.session().get(url, headers={"Origin": "http://viewer.example"})
    assert response.headers["access-control-allow-origin"] == "http://viewer.example"
    assert json.loads(response.content)[0]["0020000D"]["Value"] == [stored.study_uid]


def test_transfer_syntax_negotiation_and_406(node: Node, tmp_path: Path) -> None:
    """An instance stored in Implicit VR Little Endian (as many scanners send) comes back as
    stored, or re-encoded losslessly when the client asks for Explicit VR Little Endian."""
    from tests.support.dicomweb import write_phantom_study

    study = write_phantom_study(tmp_path, seed=14, patient_id="DW-14")
    ds = pydicom.dcmread(study.files[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=True)
    implicit = buffer.getvalue()
    assert _stow(node, _multipart([implicit])).status_code == 200
    url = (
        f"{node.dicomweb}/studies/{study.study_uid}/series/{study.series_uid}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    session = node.session()
    as_stored = session.get(
        url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    )
    assert _split(as_stored) == [implicit]
    assert "transfer-syntax=1.2.840.10008.1.2\r\n" in as_stored.content.decode("latin-1")
    explicit = session.get(
        url,
        headers={
            "Accept": 'multipart/related; type="application/dicom"; '
            "transfer-syntax=1.2.840.10008.1.2.1"
        },
    )
    (part,) = _split(explicit)
    back = pydicom.dcmread(io.BytesIO(part))
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.PixelData == ds.PixelData and back.PatientID == "DW-14"
    # what the node cannot produce is 406
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert session.get(url, headers={"Accept": jpeg}).status_code == 406
    assert (
        session.get(f"{url}/metadata", headers={"Accept": "application/dicom+xml"}).status_code
        == 406
    )
    frames = session.get(
        f"{url}/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'}
    )
    assert frames.status_code == 406


def test_a_body_over_the_limit_is_413_before_it_is_read(node: Node) -> None:
    """The declared length is checked first: nothing of a too-large body is read or stored."""
    import socket

    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /dicom-web/studies HTTP/1.1\r\n"
            + f"Host: {host}:{port}\r\n".encode()
            + b"Authorization: Bearer dicomweb-test-key\r\n"
            + f"Content-Type: {DICOM_PARTS}\r\n".encode()
            + b"Content-Length: 99999999999\r\n\r\n"
        )
        answer = sock.recv(65536).decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
