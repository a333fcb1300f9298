"""The dashboard's and the viewer's HTTP contract, without a browser: the login and its cookie
(which the API accepts too), the pages' answers, and how a viewer build is served (its page under
``/viewer`` with the isolation headers, its files at the root, the node's own ``app-config.js``).
A stand-in build (an ``index.html`` and two scripts) takes the place of OHIF's here; the browser
tests run the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nnunet_node.api.deps import KEY_COOKIE
from nnunet_node.api.ui.pages import person_name
from nnunet_node.core.phantom import make_phantom, write_dicom_series

KEY = "dashboard-key"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, make_node: Callable[..., Any]) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("dashboard")
    dist = root / "viewer" / "dist"
    dist.mkdir(parents=True)
    (dist / "index.html").write_text("<html><script src='/app.bundle.1.js'></script></html>")
    (dist / "app.bundle.1.js").write_text("console.log('viewer')")
    (dist / "assets").mkdir()
    (dist / "assets" / "worker.js").write_text("self.onmessage = () => {}")
    with make_node(root / "data", api_key=KEY, viewer_dir=root / "viewer") as live:
        yield live


def bare(node: Any) -> httpx.Client:
    return httpx.Client(base_url=node.url, timeout=30, follow_redirects=False)


def test_pages_need_the_key_and_the_login_sets_a_cookie_the_api_accepts(node: Any) -> None:
    with bare(node) as client:
        answer = client.get("/ui/jobs?status=done")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui/login?next=/ui/jobs%3Fstatus%3Ddone"
        assert client.get("/jobs").status_code == 401
        wrong = client.post("/ui/login", data={"key": "nope", "next": "/ui/jobs"})
        assert wrong.status_code == 401 and "Wrong key" in wrong.text
        # only a path of this node may follow the login
        good = client.post("/ui/login", data={"key": KEY, "next": "https://elsewhere.example/"})
        assert good.status_code == 303 and good.headers["location"] == "/ui/jobs"
        cookie = good.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert KEY not in cookie  # a session token made from the key, never the key itself
        # a cookie holding the raw key is no session
        with bare(node) as other:
            other.cookies.set(KEY_COOKIE, KEY)
            assert other.get("/jobs").status_code == 401
        for page in ("/ui/jobs", "/ui/jobs/rows", "/ui/waiting", "/ui/studies", "/ui/models"):
            answer = client.get(page)
            assert answer.status_code == 200, page
            assert answer.headers["content-type"].startswith("text/html")
        assert client.get("/ui/destinations").status_code == 200
        workers = client.get("/ui/workers")  # no broker: the node itself is the one worker
        assert workers.status_code == 200
        assert "in-process-" in workers.text and "<td>*</td>" in workers.text
        assert client.get("/jobs").status_code == 200  # the API takes the cookie
        assert client.get("/dicom-web/studies").status_code == 200
        unknown = client.get("/ui/jobs/0123456789abcdef0123456789abcdef")
        assert unknown.status_code == 404
        assert unknown.headers["content-type"].startswith("text/html")  # a page, not JSON
        assert "0123456789abcdef0123456789abcdef" in unknown.text
        assert 'href="/ui/jobs"' in unknown.text
        client.post("/ui/logout")
        client.cookies.clear()
        assert client.get("/jobs").status_code == 401


def test_log_out_is_offered_only_to_a_logged_in_session(node: Any) -> None:
    with bare(node) as client:
        before = client.get("/ui/login")
        assert before.status_code == 200 and 'name="key"' in before.text
        assert "Log out" not in before.text and 'action="/ui/logout"' not in before.text
        client.post("/ui/login", data={"key": KEY, "next": "/ui/jobs"})
        page = client.get("/ui/jobs")
        assert page.status_code == 200 and 'action="/ui/logout"' in page.text
        assert "Log out" in page.text
        client.post("/ui/logout")
        client.cookies.clear()
        after = client.get("/ui/login")
        assert "Log out" not in after.text
    # the key in a header opens the pages but is no session to log out of
    with bare(node) as client:
        page = client.get("/ui/models", headers={"X-API-Key": KEY})
        assert page.status_code == 200 and "Log out" not in page.text


def test_studies_page_shows_patient_names_as_people_write_them(node: Any, tmp_path: Path) -> None:
    """A study stored by STOW-RS with PatientName ``Smith^John^Q^Dr^Jr`` (PS3.5 6.2.1 PN) is
    listed as "Smith, Dr John Q, Jr", never as the raw value."""
    files = write_dicom_series(
        make_phantom(5, shape=(32, 32, 32)),
        tmp_path / "ct",
        patient_id="PN-1",
        patient_name="Smith^John^Q^Dr^Jr",
    )
    body = b"".join(
        b"--pn-parts\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n"
        for f in files
    )
    with bare(node) as client:
        stored = client.post(
            "/dicom-web/studies",
            content=body + b"--pn-parts--\r\n",
            headers={
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=pn-parts',
                "X-API-Key": KEY,
            },
        )
        assert stored.status_code == 200, stored.text
        page = client.get("/ui/studies?patient_id=PN-1", headers={"X-API-Key": KEY})
        assert page.status_code == 200
        assert "Smith, Dr John Q, Jr" in page.text
        assert "Smith^John" not in page.text


def test_filters_quoted_in_errors_are_text_not_markup(node: Any) -> None:
    """A link to the dashboard whose filter holds markup shows it as text: the jobs list's error
    quotes the refused ``status`` escaped (it was not, so the markup ran in the page), and so does
    the studies page for a refused date."""
    markup = "<img src=x onerror=alert(1)>"
    with bare(node) as client:
        client.headers["X-API-Key"] = KEY
        rows = client.get("/ui/jobs/rows", params={"status": markup})
        assert rows.status_code == 200 and 'class="error"' in rows.text
        assert "&lt;img src=x onerror=alert(1)&gt;" in rows.text
        assert "<img" not in rows.text
        for limit in ("-4", "0", "501", "ten", markup):  # a row saying so, not a JSON 400
            rows = client.get("/ui/jobs/rows", params={"limit": limit})
            assert rows.status_code == 200 and 'class="error"' in rows.text, rows.text
            assert "limit must be a whole number from 1 to 500" in rows.text
            assert "<img" not in rows.text
        studies = client.get("/ui/studies", params={"date": markup})
        assert studies.status_code == 200
        assert "&lt;img src=x onerror=alert(1)&gt;" in studies.text
        assert "<img" not in studies.text


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("Phantom^Demo", "Phantom, Demo"),
        ("Smith^John^Q^Dr^Jr", "Smith, Dr John Q, Jr"),
        ("Doe", "Doe"),
        ("^Anna", "Anna"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada, Tarou"),
        ("=山田^太郎", "山田, 太郎"),
        ("", ""),
        (None, ""),
    ],
)
def test_person_names_are_shown_family_name_first(value: str | None, shown: str) -> None:
    assert person_name(value) == shown


def test_static_assets_are_served_by_the_node(node: Any) -> None:
    with bare(node) as client:
        htmx = client.get("/ui/static/htmx.min.js")
        assert htmx.status_code == 200 and "htmx" in htmx.text[:2000]
        assert client.get("/ui/static/htmx.LICENSE").status_code == 200
        page = client.get("/ui/login").text
        assert 'src="/ui/static/htmx.min.js"' in page
        assert "http://" not in page and "https://" not in page  # nothing from elsewhere


def test_the_viewer_build_is_served_with_its_own_config(node: Any) -> None:
    with bare(node) as client:
        assert client.get("/viewer").status_code == 303  # the login first
        # ... unless OHIF's token parameter carries the key (OHIF sends it as a bearer token)
        assert client.get("/viewer/viewer?StudyInstanceUIDs=1.2&token=x").status_code == 200
        client.post("/ui/login", data={"key": KEY, "next": "/viewer"})
        for path in ("/viewer", "/viewer/viewer?StudyInstanceUIDs=1.2.3"):
            page = client.get(path)
            assert page.status_code == 200 and "app.bundle.1.js" in page.text
            assert page.headers["cross-origin-opener-policy"] == "same-origin"
            assert page.headers["cross-origin-embedder-policy"] == "credentialless"
        script = client.get("/app.bundle.1.js")
        assert script.status_code == 200 and "viewer" in script.text
        worker = client.get("/assets/worker.js")
        assert worker.headers["cross-origin-embedder-policy"] == "credentialless"
        config = client.get("/app-config.js")
        assert config.status_code == 200
        assert 'routerBasename": "/viewer"' in config.text
        assert 'window.location.origin + "/dicom-web"' in config.text
        # paths that are not the build's still reach the node
        assert client.get("/nothing-here").status_code == 404
        assert client.get("/healthz").json() == {"status": "ok"}


def test_metrics_are_public_only_when_configured(
    tmp_path: Path, make_node: Callable[..., Any]
) -> None:
    with make_node(tmp_path / "data", api_key=KEY, metrics_public=True) as live, bare(live) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/jobs").status_code == 401


def test_without_a_viewer_build_the_viewer_says_how_to_get_one(
    tmp_path: Path, make_node: Callable[..., Any]
) -> None:
    with make_node(tmp_path / "data", viewer_dir=tmp_path / "absent") as live, bare(live) as c:
        for path in ("/viewer", "/viewer/viewer?StudyInstanceUIDs=1.2.3"):
            answer = c.get(path)
            assert answer.status_code == 404
            assert "make viewer" in answer.json()["error"], answer.text
        assert c.get("/healthz").json() == {"status": "ok"}
