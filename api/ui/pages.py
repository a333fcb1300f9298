"""The dashboard at ``/ui``: server-rendered pages (Jinja2) that update themselves with htmx.

Pages: jobs (a live list with the filters of ``GET /jobs``), one job (stages, timings, warnings,
outputs, the DICOM objects it filed, dispatches with retry, cancel), series waiting for
completion, studies in the archive (each opening in the built-in viewer), destinations, models.
Live parts are fragments that htmx polls every two seconds (``hx-trigger="every 2s"``); actions
(cancel, retry) post to the API's own endpoints. Every asset is served by the node (htmx is
vendored under ``static/``), so the dashboard works with no internet access.

With an API key configured the pages need it too: ``/ui/login`` takes the key once and sets it as
an HttpOnly, SameSite=Strict cookie, which the API (and so the viewer's DICOMweb requests, on the
same origin) accepts as well.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydicom.valuerep import PersonName

from nnunet_node.api.deps import (
    KEY_COOKIE,
    get_context,
    has_session,
    key_matches,
    request_authorised,
    session_token,
)
from nnunet_node.api.ui import views
from nnunet_node.api.viewer import viewer_link
from nnunet_node.core.errors import ClientError, NotFound
from nnunet_node.storage.models import JobStatus

LOGGER = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
POLL = "every 2s"


def person_name(value: object) -> str:
    """A DICOM PN value (PS3.5 6.2.1: ``family^given^middle^prefix^suffix``, up to three
    ``=``-separated groups: alphabetic, ideographic, phonetic) as a list of people shows it:
    ``Phantom^Demo`` is "Phantom, Demo", ``Smith^John^Q^Dr^Jr`` is "Smith, Dr John Q, Jr". The
    first non-empty group is shown; an empty or missing value is ""."""
    if not value:
        return ""
    group = next((g for g in PersonName(str(value)).components if g.strip("^ ")), "")
    family, given, middle, prefix, suffix = ([*group.split("^"), "", "", "", ""])[:5]
    forenames = " ".join(part.strip() for part in (prefix, given, middle) if part.strip())
    name = ", ".join(part for part in (family.strip(), forenames) if part)
    return f"{name}, {suffix.strip()}" if suffix.strip() else name


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals.update(since=views.since, poll=POLL, statuses=[s.value for s in JobStatus])
templates.env.filters["viewer"] = viewer_link
templates.env.filters["person_name"] = person_name

router = APIRouter(prefix="/ui", include_in_schema=False)
"""The login, the logout and ``/ui`` itself: open to everyone."""


class LoginRequired(Exception):
    """A page was asked for without the key: the answer is the login form."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


async def guard(request: Request) -> None:
    """Raise :class:`LoginRequired` unless the request carries the key (cookie or header)."""
    settings = request.app.state.settings
    if not request_authorised(settings, request, request.headers.get("x-api-key")):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)


pages = APIRouter(prefix="/ui", include_in_schema=False, dependencies=[Depends(guard)])
"""Every page and fragment of the dashboard: each first passes :func:`guard`."""


def _page(request: Request, name: str, **values: Any) -> HTMLResponse:
    values.setdefault("viewer", request.app.state.viewer is not None)
    values.setdefault("logged_in", has_session(request.app.state.settings, request))
    return templates.TemplateResponse(request, name, values)


def _safe_next(target: str | None) -> str:
    """Only a path on this node (no scheme, no other host) may follow a login."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/ui/jobs"
    return target


# --- login --------------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _page(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login", response_model=None)
async def login(
    request: Request,
    key: Annotated[str, Form()],
    next: Annotated[str | None, Form()] = None,
) -> Response:
    settings = request.app.state.settings
    if not key_matches(settings, key):
        response = _page(request, "login.html", next=_safe_next(next), error="Wrong key.")
        response.status_code = 401
        return response
    answer = RedirectResponse(_safe_next(next), status_code=303)
    if settings.api_key:
        answer.set_cookie(
            KEY_COOKIE,
            session_token(settings.api_key),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return answer


@router.post("/logout")
async def logout() -> RedirectResponse:
    answer = RedirectResponse("/ui/login", status_code=303)
    answer.delete_cookie(KEY_COOKIE)
    return answer


# --- jobs ---------------------------------------------------------------------------------------
_FILTERS = ("status", "model", "source", "patient_id", "study_uid", "route")


def _job_filters(request: Request) -> dict[str, str]:
    return {k: v for k in _FILTERS if (v := request.query_params.get(k, "").strip())}


@router.get("", include_in_schema=False)
async def home(request: Request) -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=307)


@pages.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request) -> HTMLResponse:
    filters = _job_filters(request)
    return _page(request, "jobs.html", filters=filters, query=urlencode(filters))


@pages.get("/jobs/rows", response_class=HTMLResponse)
async def job_rows(request: Request, limit: str = "50") -> Response:
    """The jobs table's rows (an htmx fragment). A refused filter or ``limit`` is a row that
    says why: htmx swaps no 4xx answer in, so the table would say "loading" for ever."""
    context = get_context(request)
    filters = _job_filters(request)
    rows_wanted = int(limit) if limit.strip().isdigit() else 0
    if not 1 <= rows_wanted <= 500:
        return _error_row(f"limit must be a whole number from 1 to 500, not {limit[:40]!r}")

    def load() -> tuple[list[views.JobRow], int]:
        items, total = context.job_service.list(
            status=filters.get("status"),
            model=filters.get("model"),
            source=filters.get("source"),
            patient_id=filters.get("patient_id"),
            study_instance_uid=filters.get("study_uid"),
            route_name=filters.get("route"),
            limit=rows_wanted,
        )
        return views.job_rows(context, items), total

    try:
        rows, total = await run_in_threadpool(load)
    except ClientError as exc:
        return _error_row(str(exc))
    return _page(request, "_job_rows.html", rows=rows, total=total)


def _error_row(message: str) -> HTMLResponse:
    """A row of the jobs table that says what was refused. The message quotes what was given
    (``?status=...``): escaped, or a link to the dashboard could carry markup that runs in the
    page (reflected XSS)."""
    return HTMLResponse(f'<tr><td colspan="9" class="error">{html.escape(message)}</td></tr>')


@pages.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str) -> HTMLResponse:
    """The job's page; an unknown id gets a page that says so (404), not the API's JSON."""
    context = get_context(request)
    try:
        job = await run_in_threadpool(context.job_service.get, job_id)
    except NotFound as exc:
        page = _page(request, "not_found.html", message=str(exc))
        page.status_code = 404
        return page
    return _page(request, "job.html", job=job)


@pages.get("/jobs/{job_id}/detail", response_class=HTMLResponse)
async def job_detail(request: Request, job_id: str) -> HTMLResponse:
    context = get_context(request)

    def load() -> dict[str, Any]:
        job = context.job_service.get(job_id)
        [row] = views.job_rows(context, [job])
        return {"job": job, "row": row}

    return _page(request, "_job_detail.html", **(await run_in_threadpool(load)))


# --- the other pages ----------------------------------------------------------------------------
@pages.get("/waiting", response_class=HTMLResponse)
async def waiting_page(request: Request, fragment: bool = False) -> HTMLResponse:
    context = get_context(request)
    series = await run_in_threadpool(views.waiting_series, context)
    return _page(request, "_waiting.html" if fragment else "waiting.html", series=series)


_STUDY_KEYS = {
    "patient": "PatientName",
    "patient_id": "PatientID",
    "date": "StudyDate",
    "modality": "ModalitiesInStudy",
    "description": "StudyDescription",
}


@pages.get("/studies", response_class=HTMLResponse)
async def studies_page(request: Request) -> HTMLResponse:
    context = get_context(request)
    form = {k: v for k in _STUDY_KEYS if (v := request.query_params.get(k, "").strip())}
    query = {_STUDY_KEYS[k]: v for k, v in form.items()}
    if "patient" in form and "*" not in form["patient"]:
        query["PatientName"] = f"*{form['patient']}*"
    error = None
    try:
        found = await run_in_threadpool(views.studies, context, query)
    except ClientError as exc:
        found, error = [], str(exc)
    return _page(request, "studies.html", studies=found, form=form, error=error)


@pages.get("/destinations", response_class=HTMLResponse)
async def destinations_page(request: Request) -> HTMLResponse:
    context = get_context(request)
    found = await run_in_threadpool(views.destinations, context)
    return _page(request, "destinations.html", destinations=found)


@pages.get("/models", response_class=HTMLResponse)
async def models_page(request: Request) -> HTMLResponse:
    context = get_context(request)
    found = await run_in_threadpool(views.models, context)
    return _page(request, "models.html", models=found)


@pages.get("/workers", response_class=HTMLResponse)
async def workers_page(request: Request) -> HTMLResponse:
    context = get_context(request)
    found = await run_in_threadpool(context.job_service.workers)
    return _page(request, "workers.html", workers=found)


def install(app: FastAPI) -> None:
    """Add the dashboard to ``app``: its pages, its static files and the login redirect."""

    async def to_login(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return RedirectResponse(f"/ui/login?next={quote(exc.target)}", status_code=303)

    app.add_exception_handler(LoginRequired, to_login)
    app.include_router(router)
    app.include_router(pages)
    app.mount("/ui/static", StaticFiles(directory=str(STATIC)), name="ui-static")
