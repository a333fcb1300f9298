"""The dashboard and the built-in OHIF viewer in a real browser: Debian's headless Chromium driven
by Playwright (the system browser through ``executable_path``; Playwright downloads nothing).

One whole node for the module (HTTP API with a key, DICOM node, a routing rule on the demo
model, a destination PACS that is dark at first). storescu sends a 40-slice phantom CT; the tests
follow its routed job on the dashboard while it runs, then its outputs, retry its failed dispatch
once the PACS is up, cancel jobs from their pages, and open the study in OHIF: the CT renders,
the job's SEG loads (segments listed and drawn at the sphere) and its RTSTRUCT's contours are
drawn, without any request failing. A screenshot of each page goes to ``tests/artifacts/``
(or ``$NNUNET_NODE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from tests.node.peers import free_port, storescp
from tests.support.dcmtk import dcmtk

pytestmark = pytest.mark.slow

playwright_sync = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
VIEWER = REPO / "viewer"
KEY = "browser-test-key"
ARTIFACTS = Path(os.environ.get("NNUNET_NODE_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-unsafe-swiftshader",
]


@dataclass
class Site:
    node: Any
    page: Any
    pacs_port: int
    tmp: Path
    study_uid: str = ""
    job_id: str = ""
    observed: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    responses: list[tuple[int, str]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.node.url}{path}"

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, make_full_node: Callable[..., Any]
) -> Iterator[Site]:
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed")
    tmp = tmp_path_factory.mktemp("browser")
    pacs_port = free_port()
    node = make_full_node(tmp, pacs_port, api_key=KEY, viewer_dir=VIEWER).start()
    playwright = playwright_sync.sync_playwright().start()
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    # OHIF's onboarding tour would cover the viewer and take the clicks.
    context.add_init_script("localStorage.setItem('shownTours', '[\"basicViewerTour\"]')")
    page = context.new_page()
    page.set_default_timeout(60_000)
    site = Site(node, page, pacs_port, tmp)
    page.on("response", lambda r: site.responses.append((r.status, r.url)))
    page.on(
        "requestfailed",
        lambda r: (
            None
            if (r.failure or "").endswith("ERR_ABORTED")  # left behind by a navigation
            else site.failures.append((r.url, r.failure or ""))
        ),
    )
    try:
        yield site
    finally:
        context.close()
        browser.close()
        playwright.stop()
        node.stop()


def login(site: Site) -> None:
    page = site.page
    page.goto(site.url("/ui/jobs"))
    assert "/ui/login" in page.url  # the key is needed
    page.fill("input[name=key]", "wrong")
    page.click("button[type=submit]")
    assert page.locator("p.error").inner_text() == "Wrong key."
    page.fill("input[name=key]", KEY)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/jobs")


def row_state(site: Site) -> tuple[str, tuple[str, ...]] | None:
    """Status and stage fractions of the first job row, after asking htmx to refresh it (read in
    one go: htmx may swap the row between two reads)."""
    page = site.page
    page.evaluate("htmx.trigger('#job-rows', 'refresh')")
    page.wait_for_timeout(150)
    state = page.evaluate(
        """() => { const row = document.querySelector('tr.job');
          if (!row) return null;
          return [row.dataset.job, row.dataset.status,
                  [...row.querySelectorAll('.stage')].map(e => e.dataset.fraction)]; }"""
    )
    if state is None:
        return None
    site.job_id = site.job_id or str(state[0])
    return str(state[1]), tuple(state[2])


def test_dashboard_follows_a_routed_job(site: Site) -> None:
    login(site)
    files = write_dicom_series(make_phantom(21, shape=(40, 48, 48)), site.tmp / "ct")
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    site.study_uid = header.StudyInstanceUID
    sent = dcmtk(
        "storescu", "-aet", "SCANNER", "-aec", "NNUNET_NODE", "127.0.0.1",
        str(site.node.dicom_port), *map(str, files),
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout

    deadline = time.monotonic() + 240
    shot_running = False
    while time.monotonic() < deadline:
        state = row_state(site)
        if state is not None:
            site.observed.append(state)
            if state[0] == "running" and not shot_running:
                site.shot("01-jobs-running")
                shot_running = True
            if state[0] in ("done", "failed"):
                break
    statuses = [s for s, _ in site.observed]
    assert statuses[-1] == "done", site.observed
    running = [fractions for status, fractions in site.observed if status == "running"]
    assert running, f"the job was never seen running: {site.observed}"
    # progress changed while it ran, and ended full
    assert len({f for f in running}) >= 2, running
    assert site.observed[-1][1] == ("1.000",)
    row = site.page.locator("tr.job").first
    assert "SCANNER" in row.inner_text() and "phantom" in row.inner_text()
    site.shot("02-jobs-done")

    assert row.get_attribute("data-job") == site.job_id
    row.locator("a").first.click()
    page = site.page
    page.wait_for_url(f"**/ui/jobs/{site.job_id}")
    page.wait_for_selector("table.outputs")
    outputs = page.locator("table.outputs").inner_text()
    for name in ("prediction.nii.gz", "prediction.dcm", "struct.dcm"):
        assert name in outputs
    filed = page.locator("table.filed tbody tr")
    assert filed.count() == 2
    assert {filed.nth(i).locator("td").first.inner_text() for i in range(2)} == {"SEG", "RTSTRUCT"}
    assert "predict" in page.locator("table.timings").inner_text()
    # the dark PACS: one attempt, failed
    page.wait_for_selector("tr.dispatch[data-status=failed]", timeout=60_000)
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename.endswith(".zip")
    site.shot("03-job-page")


def test_failed_dispatch_is_retried_from_the_page(site: Site) -> None:
    assert site.job_id, "needs the routed job"
    page = site.page
    page.goto(site.url(f"/ui/jobs/{site.job_id}"))
    page.wait_for_selector("tr.dispatch[data-status=failed]")
    with storescp(site.tmp / "pacs", port=site.pacs_port):
        page.click("tr.dispatch button.retry")
        page.wait_for_selector("tr.dispatch[data-status=sent]", timeout=60_000)
    received = sorted((site.tmp / "pacs").iterdir())
    modalities = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in received)
    assert modalities == ["RTSTRUCT", "SEG"]
    site.shot("04-job-dispatch-retried")
    page.goto(site.url("/ui/destinations"))
    assert "sent" in page.locator("table.destinations").inner_text()
    site.shot("05-destinations")


def test_jobs_are_cancelled_from_their_pages(site: Site) -> None:
    client = site.node.client
    body = {
        "nnunet_id": "phantom",
        "study_path": str(site.node.settings.data_dir / "dicom"),
        "series_folders": [f"{site.study_uid}/{series_of(site)}"],
        "is_dicom": True,
        "tta": True,  # mirroring: the slow way, so the first job is still running
    }
    first = client.post("/jobs", json=body)
    second = client.post("/jobs", json=body)
    assert first.status_code == second.status_code == 202, first.text
    queued_id, running_id = second.json()["job_id"], first.json()["job_id"]
    page = site.page
    for job_id in (queued_id, running_id):
        page.goto(site.url(f"/ui/jobs/{job_id}"))
        page.wait_for_selector("#cancel")
        if job_id == queued_id:
            site.shot("06-job-queued")
        page.click("#cancel")
        page.wait_for_selector("#job-status:text('cancelled')", timeout=120_000)
    assert client.get(f"/jobs/{queued_id}").json()["status"] == "cancelled"
    assert client.get(f"/jobs/{running_id}").json()["status"] == "cancelled"
    page.goto(site.url("/ui/jobs?status=cancelled"))
    page.wait_for_selector("tr.job[data-status=cancelled]")
    assert page.locator("tr.job").count() == 2
    site.shot("07-jobs-cancelled-filter")


def series_of(site: Site) -> str:
    """The CT series the routed job read (a folder of the archive)."""
    return site.node.context.job_service.get(site.job_id).series_uids[0]


def test_other_pages(site: Site) -> None:
    page = site.page
    page.goto(site.url("/ui/studies?patient=phantom"))
    study = page.locator(f"tr.study[data-study='{site.study_uid}']")
    assert "CT" in study.inner_text() and "SEG" in study.inner_text()
    # PatientName Phantom^Demo (PS3.5 PN) shown as a name, family name first
    assert "Phantom, Demo" in study.inner_text() and "^" not in study.inner_text()
    if site.node.app.state.viewer is not None:
        assert study.locator("a.open").get_attribute("href") == (
            f"/viewer/viewer?StudyInstanceUIDs={site.study_uid}"
        )
    else:  # no viewer fetched (make viewer): the page offers no link to it
        assert study.locator("a.open").count() == 0
    site.shot("08-studies")
    page.goto(site.url("/ui/studies?modality=MR"))
    assert "No study matches" in page.inner_text("table.studies")
    page.goto(site.url("/ui/models"))
    models = page.inner_text("table.models")
    assert "phantom" in models and "yes, on cpu" in models
    site.shot("09-models")
    page.goto(site.url("/ui/waiting"))
    assert page.locator("table.waiting").count() == 1
    site.shot("10-waiting")
    # A filter the jobs list refuses is quoted in its error as text: markup in a link to the
    # dashboard does not run (it did: the rows' error was not escaped).
    page.goto(site.url("/ui/jobs?status=<img src=x onerror=document.body.dataset.injected=1>"))
    error = page.locator("#job-rows td.error")
    assert "<img src=x onerror=" in error.inner_text()
    assert page.locator("#job-rows img").count() == 0
    assert page.evaluate("document.body.dataset.injected") is None


def viewport_stats(page: Any) -> tuple[int, tuple[float, float] | None, tuple[int, ...] | None]:
    """From a screenshot of the viewport (its edges, where OHIF draws markers, cut off): how
    many pixels are coloured (overlays: SEG fill, RTSTRUCT contour lines; the CT is grey), their
    centroid, and the bounding box of the bright (sphere and cube) pixels."""
    png = page.locator("[data-cy='viewport-pane']").first.screenshot()
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)[60:-60, 60:-60]
    coloured = rgb.max(axis=2) - rgb.min(axis=2) > 60
    ys, xs = np.nonzero(coloured)
    by, bx = np.nonzero(rgb.min(axis=2) > 200)
    centroid = (float(xs.mean()), float(ys.mean())) if len(xs) else None
    box = (int(bx.min()), int(bx.max()), int(by.min()), int(by.max())) if len(bx) else None
    return int(coloured.sum()), centroid, box


def lit_fraction(page: Any) -> float:
    """The largest fraction of non-black pixels on a cornerstone canvas."""
    return float(
        page.evaluate(
            """() => Math.max(0, ...[...document.querySelectorAll('.cornerstone-canvas')]
            .filter(c => c.width).map(c => {
              const t = document.createElement('canvas'); t.width = c.width; t.height = c.height;
              const g = t.getContext('2d'); g.drawImage(c, 0, 0);
              const d = g.getImageData(0, 0, c.width, c.height).data;
              let lit = 0;
              for (let i = 0; i < d.length; i += 4) if (d[i] + d[i+1] + d[i+2] > 30) lit++;
              return lit / (d.length / 4);
            }))"""
        )
    )


def wait_for(what: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.5)
    return value


SEGMENT_LABELS = """() => { try { return window.services.segmentationService.getSegmentations()
    .flatMap(s => Object.values(s.segments || {}).filter(Boolean).map(g => g.label));
  } catch (e) { return []; } }"""


def open_overlay(site: Site, modality: str) -> tuple[list[str], int, Any]:
    """Open the study, load its ``modality`` object (SEG or RTSTRUCT) from the thumbnail, and
    scroll through the stack: the segment labels, the coloured pixels before loading, and the
    slice with the most coloured pixels (count, centroid, bright box)."""
    page = site.page
    page.goto(site.url(f"/viewer/viewer?StudyInstanceUIDs={site.study_uid}"))
    page.wait_for_selector(".cornerstone-canvas", timeout=90_000)
    assert wait_for(lambda: lit_fraction(page) > 0.05), "the CT did not render"
    before = viewport_stats(page)[0]
    thumb = page.locator("[data-cy='study-browser-thumbnail-no-image']", has_text=modality)
    thumb.first.dblclick()
    page.locator("button", has_text="Yes").first.click(timeout=30_000)
    labels = wait_for(lambda: page.evaluate(SEGMENT_LABELS))
    page.wait_for_timeout(2000)
    best = viewport_stats(page)
    for key in ["ArrowDown"] * 20 + ["ArrowUp"] * 40:
        page.keyboard.press(key)
        page.wait_for_timeout(120)
        stats = viewport_stats(page)
        if stats[0] > best[0]:
            best = stats
    for _ in range(60):  # back down to that slice, for the screenshot
        if viewport_stats(page)[0] >= 0.8 * best[0]:
            break
        page.keyboard.press("ArrowDown")
        page.wait_for_timeout(120)
    return sorted(labels or []), before, best


def test_ohif_opens_the_study_with_its_seg_and_rtstruct(site: Site) -> None:
    if not (VIEWER / "dist" / "index.html").is_file():
        pytest.skip("the OHIF viewer is not fetched (make viewer)")
    assert site.job_id, "needs the routed job"
    page = site.page
    site.responses.clear()
    site.failures.clear()
    page.goto(site.url("/viewer"))
    row = page.locator("tr", has_text="Phantom study").first
    row.wait_for(timeout=90_000)
    listed = row.inner_text()
    assert "CT" in listed and "SEG" in listed and "RTSTRUCT" in listed, listed
    site.shot("11-ohif-study-list")

    page.goto(site.url(f"/viewer/viewer?StudyInstanceUIDs={site.study_uid}"))
    page.wait_for_selector(".cornerstone-canvas", timeout=90_000)
    assert wait_for(lambda: lit_fraction(page) > 0.05), "the CT did not render"
    site.shot("12-ohif-ct")

    for modality, name in (("SEG", "13-ohif-seg"), ("RTSTRUCT", "14-ohif-rtstruct")):
        labels, before, (count, centroid, box) = open_overlay(site, modality)
        assert labels == ["Cube", "Sphere"], (modality, labels)
        # drawn: many more coloured pixels than the bare CT had, among the bright objects
        assert count > max(200, 10 * before), (modality, before, count)
        assert centroid is not None and box is not None
        assert box[0] <= centroid[0] <= box[1] and box[2] <= centroid[1] <= box[3], (
            modality,
            centroid,
            box,
        )
        site.shot(name)

    errors = [(status, url) for status, url in site.responses if status >= 400]
    assert not errors, errors
    assert not site.failures, site.failures
    toasts = page.locator("[data-sonner-toast][data-type=error]")
    assert toasts.count() == 0, toasts.all_inner_texts()
