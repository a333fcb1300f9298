"""STOW-RS bodies as RFC 2046 allows them (preamble, epilogue, parameters quoted or not, in any
order) and a chunked body that passes the upload limit midway (PS3.18 10.5.3: the answer lists
exactly what was stored and what was not; 413 only when nothing was)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid

from nnunet_node.api.dicomweb.multipart import encode_parts, iter_parts, parse_media_type
from tests.support.datasets import build_dataset, encode
from tests.support.dicomweb import Node, dicomweb_settings

BOUNDARY = "rfc2046-b0undary"


def _body(parts: list[bytes], *, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    encoded = b"".join(encode_parts(BOUNDARY, [("application/dicom", [p]) for p in parts]))
    # encode_parts starts with CRLF + delimiter: with a preamble that CRLF ends it
    return preamble + encoded + epilogue


def _post(node: Node, body: bytes | Iterator[bytes], content_type: str) -> requests.Response:
    return node.session().post(
        f"{node.dicomweb}/studies",
        data=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
    )


def _stored_uids(response: requests.Response) -> list[str]:
    items = response.json().get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def _study_instances(node: Node, study: str) -> set[str]:
    response = node.session().get(f"{node.dicomweb}/studies/{study}/instances")
    assert response.status_code == 200, response.text
    return {r["00080018"]["Value"][0] for r in response.json()}


def test_preamble_and_epilogue_are_ignored(node: Node) -> None:
    study = generate_uid()
    datasets = [build_dataset(study_uid=study) for _ in range(2)]
    body = _body(
        [encode(ds) for ds in datasets],
        preamble=b"This is the preamble.\r\nIt has two lines.",
        epilogue=b"\r\nThis is the epilogue.\r\n--" + BOUNDARY.encode() + b"\r\nnot a part\r\n",
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    response = _post(node, body, content_type)
    assert response.status_code == 200, response.text
    assert _study_instances(node, study) == {ds.SOPInstanceUID for ds in datasets}


@pytest.mark.parametrize(
    "content_type",
    [
        f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
        f'multipart/related; boundary="{BOUNDARY}"; type="application/dicom"',
        f'Multipart/Related; Boundary={BOUNDARY}; start="<part1@x>"; TYPE="application/dicom"',
        f"multipart/related;boundary={BOUNDARY};type=application/dicom",
    ],
    ids=["unquoted", "quoted-reordered", "case-and-start", "no-spaces"],
)
def test_parameters_quoted_or_not_in_any_order(node: Node, content_type: str) -> None:
    ds = build_dataset()
    response = _post(node, _body([encode(ds)]), content_type)
    assert response.status_code == 200, response.text
    assert _stored_uids(response) == [ds.SOPInstanceUID]


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        ("application/dicom+xml", 406),
        ("text/html", 406),
        ("application/dicom+xml, application/dicom+json;q=0.5", 200),
        ("application/json", 200),
        ("*/*", 200),
    ],
)
def test_the_response_type_is_negotiated_before_anything_is_stored(
    node: Node, accept: str, status: int
) -> None:
    """The Store Instances Response is DICOM JSON (PS3.18 10.5.3): a client that accepts only
    XML gets 406 and nothing is stored (it got a 200 in JSON and its instances were filed)."""
    study = generate_uid()
    datasets = [build_dataset(study_uid=study) for _ in range(2)]
    response = node.session().post(
        f"{node.dicomweb}/studies",
        data=_body([encode(ds) for ds in datasets]),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": accept,
        },
    )
    assert response.status_code == status, response.text
    if status == 406:
        assert response.json()["error"] == "only application/dicom+json is served (no XML)"
        assert _study_instances(node, study) == set()
    else:
        assert response.headers["content-type"].startswith("application/dicom+json")
        assert _study_instances(node, study) == {ds.SOPInstanceUID for ds in datasets}


def test_parse_media_type_keeps_the_boundary_case() -> None:
    media = parse_media_type('multipart/related; BOUNDARY="AbC;d"; type=application/dicom')
    assert media.type == "multipart/related"
    assert media.param("boundary") == "AbC;d"
    assert media.param("type") == "application/dicom"


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_iter_parts_finds_parts_behind_a_preamble_in_any_chunking(chunk_size: int) -> None:
    parts = [b"first part", b"second\r\n--not-the-boundary\r\npart"]
    body = _body(parts, preamble=b"preamble --" + BOUNDARY.encode()[:-1], epilogue=b"\r\nbye")

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), chunk_size):
            yield body[start : start + chunk_size]

    async def read() -> list[bytes]:
        return [p.read() async for p in iter_parts(chunks(), BOUNDARY.encode(), max_bytes=1 << 20)]

    assert asyncio.run(read()) == parts


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node whose upload limit is 1 MB."""
    data = tmp_path_factory.mktemp("small-limit")
    live = Node(dicomweb_settings(Path(data), max_upload_mb=1)).start()
    try:
        yield live
    finally:
        live.stop()


def _chunked(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_oversized_chunked_body_lists_exactly_what_was_stored(small_node: Node) -> None:
    """12 parts of ~200 KB without Content-Length, over a 1 MB limit: the parts that ended
    within the limit are stored and listed, one failure names the cut, nothing else is stored."""
    study = generate_uid()
    datasets = [build_dataset(study_uid=study, size=320) for _ in range(12)]
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    response = _post(small_node, _chunked(_body([encode(ds) for ds in datasets])), content_type)
    assert response.status_code == 202, response.text
    stored = _stored_uids(response)
    assert 1 <= len(stored) < 12
    # exactly the first parts, in order, and exactly those are in the index
    assert stored == [ds.SOPInstanceUID for ds in datasets[: len(stored)]]
    assert _study_instances(small_node, study) == set(stored)
    (failure,) = response.json()["00081198"]["Value"]
    assert failure["00081197"]["Value"] == [0xA700]
    assert "limit" in response.headers["Warning"]


def test_oversized_chunked_body_with_nothing_stored_is_413(small_node: Node) -> None:
    study = generate_uid()
    big = build_dataset(study_uid=study, size=800)  # ~1.3 MB: over the limit on its own
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    response = _post(small_node, _chunked(_body([encode(big)])), content_type)
    assert response.status_code == 413, response.text
    assert _study_instances(small_node, study) == set()
