"""Safe defaults over real HTTP: API key, rate limit, CORS, JSON errors, bad requests and uploads.

None of these requests runs inference; each checks that nothing was left behind (no job row, no
file in the uploads folder, nothing extracted).
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from nnunet_node.api.middleware import CatchAllMiddleware, TokenBuckets

KEY = "s3cret-key"
ORIGIN = "https://viewer.example.org"


def files_under(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, make_node: Any, make_study: Any
) -> Iterator[Any]:
    """A node with an API key, CORS for one origin and small upload limits."""
    data = tmp_path_factory.mktemp("guarded")
    make_study(data / "studies" / "s1")
    node = make_node(data, api_key=KEY, cors_origins=[ORIGIN], max_upload_mb=1, max_extract_mb=2)
    with node as live:
        live.client.headers["X-API-Key"] = KEY
        yield live


def _job_count(live: Any) -> int:
    answer = live.client.get("/jobs")
    assert answer.status_code == 200
    return int(answer.json()["total"])


def _assert_failed(answer: httpx.Response, status: int, contains: str = "") -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["status"] == "failed"
    assert isinstance(body["error"], str) and body["error"]
    assert contains.lower() in body["error"].lower(), body["error"]
    return body


# --- API key -----------------------------------------------------------------------------------
def test_health_probes_need_no_key(guarded: Any) -> None:
    with httpx.Client(base_url=guarded.url) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ok"


@pytest.mark.parametrize(
    "path", ["/model_info", "/request-params", "/expire", "/jobs", "/download/abc"]
)
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer no"}])
def test_everything_else_needs_the_key(guarded: Any, path: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=guarded.url, headers=headers) as client:
        answer = client.get(path)
    _assert_failed(answer, 401, "api key")
    assert answer.headers["www-authenticate"] == 'Bearer realm="nnunet-node"'


def test_posts_without_key_create_nothing(guarded: Any) -> None:
    before = _job_count(guarded)
    body = {"nnunet_id": "phantom", "study_path": "x", "series_folders": ["ct_nifti"]}
    with httpx.Client(base_url=guarded.url) as anonymous:
        _assert_failed(anonymous.post("/infer", json=body), 401)
        _assert_failed(anonymous.post("/jobs", json=body), 401)
        upload = anonymous.post(
            "/infer_file",
            data={"request": json.dumps(body)},
            files={"file": ("s.zip", b"PK", "application/zip")},
        )
        _assert_failed(upload, 401)
    assert _job_count(guarded) == before
    assert files_under(guarded.settings.uploads_dir) == []


def test_key_as_header_or_bearer_token(guarded: Any) -> None:
    with httpx.Client(base_url=guarded.url) as client:
        assert client.get("/model_info", headers={"X-API-Key": KEY}).status_code == 200
        bearer = client.get("/model_info", headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200
        assert set(bearer.json()) >= {"phantom", "phantom_cube"}


# --- CORS ---------------------------------------------------------------------------------------
def test_cors_preflight_allows_the_key_header_for_the_configured_origin(guarded: Any) -> None:
    with httpx.Client(base_url=guarded.url) as client:
        answer = client.options(
            "/jobs",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-api-key, authorization",
            },
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        allowed = answer.headers["access-control-allow-headers"].lower()
        assert "x-api-key" in allowed and "authorization" in allowed

        other = client.options(
            "/jobs",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in other.headers
        # A refused request from the allowed origin still carries CORS headers (readable by JS).
        refused = client.get("/jobs", headers={"Origin": ORIGIN})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == ORIGIN


# --- rate limit ---------------------------------------------------------------------------------
def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, make_node: Any) -> None:
    with make_node(tmp_path / "data", rate_limit_per_minute=5) as live:
        codes = [live.client.get("/model_info").status_code for _ in range(5)]
        assert codes == [200] * 5
        limited = live.client.get("/model_info")
        body = _assert_failed(limited, 429, "rate limit")
        assert int(limited.headers["retry-after"]) >= 1
        assert body["error"]
        # Health probes are not counted or limited.
        assert live.client.get("/healthz").status_code == 200
        assert live.client.get("/readyz").status_code == 200
        jobs_dir = live.settings.jobs_dir
        assert _post_status(live, "/jobs") == 429
        assert not any(jobs_dir.iterdir())


def _post_status(live: Any, path: str) -> int:
    return live.client.post(path, json={"nnunet_id": "phantom"}).status_code


def test_token_bucket_refills_with_time() -> None:
    now = [0.0]
    buckets = TokenBuckets(60, clock=lambda: now[0])  # one token per second
    assert all(buckets.take("a") == 0.0 for _ in range(60))
    assert buckets.take("a") == pytest.approx(1.0)
    assert buckets.take("b") == 0.0  # other clients have their own bucket
    now[0] += 2.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0.0


# --- errors -------------------------------------------------------------------------------------
def test_unknown_route_and_job_are_json_404(guarded: Any) -> None:
    _assert_failed(guarded.client.get("/nope"), 404)
    _assert_failed(guarded.client.get("/jobs/0123abcd"), 404, "does not exist")
    _assert_failed(guarded.client.post("/jobs/0123abcd/cancel"), 404)
    _assert_failed(guarded.client.get("/download/0123abcd"), 404)


def test_parameter_validation_and_a_body_that_is_no_json_object_are_400(guarded: Any) -> None:
    # Query and path parameters FastAPI validates answer 400 in the API's error body (not 422).
    for params, field in [
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -5}, "offset"),
        ({"status": "bogus"}, "status"),
        ({"status": ["done", "sleeping"]}, "status"),
        ({"source": "DIMSE"}, "source"),  # sources are http, dimse, stow: a typo is no filter
        ({"model": ["phantom", "liver"]}, "model"),  # one value: not the last one kept
        ({"created_after": "yesterday"}, "created_after"),
    ]:
        body = _assert_failed(guarded.client.get("/jobs", params=params), 400, field)
        if field not in ("created_after", "model"):
            assert body["details"][0]["loc"][:2] == ["query", field], body
    _assert_failed(guarded.client.post("/jobs/0123abcd/dispatches/0/retry"), 400, "dispatch_id")
    # (the dashboard's rows fragment answers a refused limit with an error row that htmx shows,
    # not a 400 it would not: tests/api/test_dashboard_http.py)
    # QIDO-RS keeps its own 400s (PS3.18 8.3.4.1: an invalid query parameter).
    for params in ({"limit": -1}, {"limit": "bogus"}, {"StudyDate": "yesterday"}):
        answer = guarded.client.get("/dicom-web/studies", params=params)
        assert answer.status_code == 400, (params, answer.text)
    # The OpenAPI document says so: 400 where FastAPI would have documented 422.
    document = guarded.client.get("/openapi.json").json()
    assert "400" in document["paths"]["/jobs"]["get"]["responses"]
    assert "422" not in json.dumps(document["paths"])
    # A body that is not JSON, or not a JSON object: 400 in the reference's shape, no job.
    count = _job_count(guarded)
    json_type = {"content-type": "application/json"}
    for path in ("/infer", "/jobs"):
        body = _assert_failed(
            guarded.client.post(path, content=b"[1, 2]", headers=json_type), 400, "JSON object"
        )
        assert set(body) == {"status", "error"}
        body = _assert_failed(
            guarded.client.post(path, content=b"{not json", headers=json_type), 400, "not valid"
        )
        assert set(body) == {"status", "error"}
        # A JSON object under another media type (`curl -d` without -H sends a form type): the
        # error names the header to send, not "must be a JSON object" about a JSON object.
        form = {"content-type": "application/x-www-form-urlencoded"}
        body = _assert_failed(
            guarded.client.post(path, content=b'{"nnunet_id": "phantom"}', headers=form), 400, ""
        )
        assert body["error"] == (
            "the request body must be a JSON object sent with Content-Type: application/json "
            "(it came as 'application/x-www-form-urlencoded')"
        )
    assert _job_count(guarded) == count


def _bad_requests(study: Path) -> list[tuple[dict[str, Any], str]]:
    good = {"nnunet_id": "phantom", "study_path": str(study), "series_folders": ["ct_nifti"]}
    return [
        ({**good, "nnunet_id": "no_such_model"}, "unknown model"),
        ({**good, "nnunet_id": ["phantom", "phantom_cube"]}, "series_folders"),
        ({**good, "series_folders": [["ct_nifti"], "ct_nifti"]}, "series_folders"),
        ({**good, "series_folders": 5}, "series_folders"),
        ({k: v for k, v in good.items() if k != "series_folders"}, "series_folders"),
        ({k: v for k, v in good.items() if k != "nnunet_id"}, "nnunet_id"),
        ({k: v for k, v in good.items() if k != "study_path"}, "study_path"),
        ({**good, "study_path": "/etc"}, "study_path"),
        ({**good, "series_folders": ["../../../../etc"]}, "series_folders"),
        ({**good, "output_dir": "/tmp/elsewhere"}, "output_dir"),
        ({**good, "crop_from": "/etc/passwd"}, "crop_from"),
        ({**good, "intersect_with": "../../../../etc/passwd"}, "intersect_with"),
        ({**good, "series_folders": ["missing_series"]}, "missing_series"),
        ({**good, "unknown_field": 1}, "unknown_field"),
        ({**good, "save_proba_map": True}, "proba_threshold"),
    ]


@pytest.mark.parametrize("path", ["/infer", "/jobs"])
def test_bad_requests_are_400_and_create_no_job(guarded: Any, path: str) -> None:
    study = guarded.settings.data_dir / "studies" / "s1"
    before = _job_count(guarded)
    for body, field in _bad_requests(study):
        _assert_failed(guarded.client.post(path, json=body), 400, field)
    assert _job_count(guarded) == before
    assert files_under(guarded.settings.jobs_dir) == []


def test_outside_roots_through_a_link_is_refused(guarded: Any, tmp_path: Path) -> None:
    study = guarded.settings.data_dir / "studies" / "s1"
    outside = tmp_path / "outside"
    outside.mkdir()
    link = study / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    try:
        body = {"nnunet_id": "phantom", "study_path": str(study), "series_folders": ["sneaky"]}
        _assert_failed(guarded.client.post("/infer", json=body), 400, "outside")
    finally:
        link.unlink()


# --- /infer_file refusals -------------------------------------------------------------------------
def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tf.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


UPLOAD_REQUEST = {"nnunet_id": "phantom", "series_folders": ["ct_nifti"]}


def _upload_cases() -> list[tuple[str, dict[str, Any], bytes | None, int, str]]:
    good_zip = _zip_bytes({"ct_nifti/image.nii.gz": b"x"})
    zeros = b"\0" * (3 * 1024 * 1024)
    return [
        ("zip-slip", UPLOAD_REQUEST, _zip_bytes({"../../evil.txt": b"x"}), 400, "outside"),
        ("abs-zip", UPLOAD_REQUEST, _zip_bytes({"/tmp/evil.txt": b"x"}), 400, "absolute"),
        ("tar-slip", UPLOAD_REQUEST, _tar_bytes([("ct/../../evil", b"x")]), 400, "outside"),
        ("symlink", UPLOAD_REQUEST, _tar_bytes([_symlink("ct_nifti", "/etc")]), 400, "link"),
        ("bomb", UPLOAD_REQUEST, _zip_bytes({"ct_nifti/a.bin": zeros}), 400, "limit"),
        ("too-big", UPLOAD_REQUEST, b"PK" + bytes(3 * 1024 * 1024), 413, "larger"),
        ("not-archive", UPLOAD_REQUEST, b"plain text", 400, "zip or tar"),
        ("no-file", UPLOAD_REQUEST, None, 400, "file"),
        ("study_path", {**UPLOAD_REQUEST, "study_path": "/etc"}, good_zip, 400, "study_path"),
        ("bad-model", {**UPLOAD_REQUEST, "nnunet_id": "nope"}, good_zip, 400, "unknown model"),
        ("no-series", {"nnunet_id": "phantom"}, good_zip, 400, "series_folders"),
        ("missing", {**UPLOAD_REQUEST, "series_folders": ["x"]}, good_zip, 400, "x"),
    ]


@pytest.mark.parametrize("case", _upload_cases(), ids=[c[0] for c in _upload_cases()])
def test_bad_uploads_are_refused_and_leave_nothing(
    guarded: Any, case: tuple[str, dict[str, Any], bytes | None, int, str]
) -> None:
    _, request, content, status, message = case
    before = _job_count(guarded)
    files = {"file": ("../../../evil.zip", content, "application/zip")} if content else None
    answer = guarded.client.post(
        "/infer_file", data={"request": json.dumps(request)}, files=files or {"x": ("", b"")}
    )
    _assert_failed(answer, status, message)
    assert _job_count(guarded) == before
    assert files_under(guarded.settings.uploads_dir) == []
    assert not (guarded.settings.data_dir.parent / "evil.zip").exists()
    assert not (guarded.settings.data_dir / "evil.zip").exists()


def test_upload_request_field_must_be_json(guarded: Any) -> None:
    content = _zip_bytes({"ct_nifti/image.nii.gz": b"x"})
    files = {"file": ("s.zip", content, "application/zip")}
    _assert_failed(guarded.client.post("/infer_file", files=files), 400, "request")
    bad = guarded.client.post("/infer_file", data={"request": "{nope"}, files=files)
    _assert_failed(bad, 400, "json")
    _assert_failed(
        guarded.client.post("/infer_file", content=b"{}", headers={"content-type": "text/plain"}),
        400,
        "multipart",
    )


def test_streamed_upload_over_the_limit_without_length_is_413(guarded: Any) -> None:
    boundary = "b0undary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n\r\n'
            f"{json.dumps(UPLOAD_REQUEST)}\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        for _ in range(40):  # 2.5 MB in 64 KB chunks, no Content-Length (chunked)
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        answer = guarded.client.post(
            "/infer_file",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    except httpx.TransportError:
        pass  # the server may close the connection before the client has sent everything
    else:
        _assert_failed(answer, 413, "larger")
    assert files_under(guarded.settings.uploads_dir) == []


# --- the catch-all ------------------------------------------------------------------------------
def test_unexpected_errors_are_a_generic_json_500(caplog: pytest.LogCaptureFixture) -> None:
    async def boom(request: Any) -> None:
        raise RuntimeError("secret internals /var/lib/x")

    app = Starlette(routes=[Route("/boom", boom)])
    app.add_middleware(CatchAllMiddleware)
    transport = httpx.ASGITransport(app=app)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/boom")

    answer = anyio.run(call)
    body = _assert_failed(answer, 500, "internal server error")
    assert "secret" not in body["error"]
    assert "secret internals" in caplog.text


def test_request_params_is_the_request_schema(guarded: Any) -> None:
    schema = guarded.client.get("/request-params").json()
    assert schema["title"] == "InferenceRequest"
    assert {"nnunet_id", "study_path", "series_folders", "output_dir"} <= set(schema["properties"])
    assert "nnunet_id" in schema["required"]


def test_wrong_method_is_json_405_listing_every_allowed_method(guarded: Any) -> None:
    answer = guarded.client.put("/jobs")
    _assert_failed(answer, 405)
    assert answer.headers["allow"] == "GET, POST"
