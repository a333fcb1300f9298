"""The OHIF v3 viewer, served by the node on the same origin as its ``/dicom-web``.

``make viewer`` unpacks the prebuilt viewer (npm package ``@ohif/app``, a ``dist/`` folder) into
``NNUNET_NODE_VIEWER_DIR`` (default ``./viewer``); nothing of it is in the repository. The build
loads its scripts and assets from the origin's root (``/app.bundle.<hash>.js``, ``/assets/...``,
``/app-config.js``: its public path is fixed at build time), so :class:`ViewerMiddleware` serves
those files at the root when a GET names one of the build's top-level entries, and every path
under ``/viewer`` gets the build's ``index.html`` (OHIF routes in the browser; its router base is
``/viewer``, so the study list is ``/viewer`` and a study opens at
``/viewer/viewer?StudyInstanceUIDs=<uid>``). ``/app-config.js`` is the node's own: one DICOMweb
data source at ``<origin>/dicom-web`` with WADO-RS rendering.

The HTML pages and the build's files carry ``Cross-Origin-Opener-Policy: same-origin`` and
``Cross-Origin-Embedder-Policy: credentialless`` (OHIF needs ``SharedArrayBuffer``, which only a
cross-origin isolated page has). With an API key configured, opening the viewer without the
dashboard's login cookie leads to the login form (unless the address carries OHIF's own ``token``
parameter, which OHIF then sends as a bearer token); the cookie rides along with the viewer's
same-origin DICOMweb requests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOGGER = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
BASE = "/viewer"
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "credentialless",
}
_NODE_PREFIXES = frozenset(
    {"ui", "viewer", "dicom-web", "jobs", "metrics", "docs", "openapi.json", "healthz", "readyz"}
)


def viewer_dist(folder: Path | None) -> Path | None:
    """The folder holding the build's ``index.html`` (``folder`` or ``folder/dist``), or None."""
    if folder is None:
        return None
    for candidate in (folder, folder / "dist", folder / "package" / "dist"):
        if (candidate / "index.html").is_file():
            return candidate.resolve()
    return None


def viewer_link(study_instance_uid: str | None) -> str:
    """Where the built-in viewer opens a study."""
    return f"{BASE}/viewer?StudyInstanceUIDs={study_instance_uid or ''}"


def app_config() -> str:
    """OHIF's ``window.config`` for the node's own DICOMweb service on the page's origin."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "nnunet-node",
            "name": "nnunet-node",
            "qidoRoot": "__ORIGIN__/dicom-web",
            "wadoRoot": "__ORIGIN__/dicom-web",
            "wadoUriRoot": "__ORIGIN__/dicom-web",
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": False,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": BASE,
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    text = json.dumps(config, indent=2).replace('"__ORIGIN__', 'window.location.origin + "')
    return (
        f"// nnunet-node: OHIF {OHIF_VERSION} on this node's /dicom-web\nwindow.config = {text};\n"
    )


class ViewerMiddleware:
    """Serve the OHIF build: ``/viewer[/...]`` (its page), ``/app-config.js`` (ours) and the
    build's own files at the root; everything else passes on to the node.

    ``authorised(scope)`` says whether a request carries the API key; without it the page
    answers with a redirect to the dashboard's login (the build's static files are public).
    """

    def __init__(self, app: ASGIApp, dist: Path, authorised: Callable[[Scope], bool]) -> None:
        self.app = app
        self.dist = dist
        self.index = dist / "index.html"
        self.names = frozenset(p.name for p in dist.iterdir()) - _NODE_PREFIXES
        self.files = StaticFiles(directory=str(dist))
        self.config = app_config().encode()
        self.authorised = authorised
        self._isolation = [(k.lower().encode(), v.encode()) for k, v in ISOLATION_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        first = path.lstrip("/").split("/", 1)[0]
        response: Response | None = None
        if path == "/app-config.js":
            response = Response(self.config, media_type="text/javascript")
        elif path == BASE or path.startswith(BASE + "/"):
            query = scope.get("query_string", b"").decode("latin-1")
            # OHIF's own ``token`` parameter: it sends it as a bearer token itself.
            if not self.authorised(scope) and not _has_token(query):
                target = path + (f"?{query}" if query else "")
                response = RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)
            else:
                response = FileResponse(self.index, headers=ISOLATION_HEADERS)
        elif first in self.names and first != "index.html":
            # Workers of a cross-origin isolated page need the same policy on their scripts.
            await self.files(scope, receive, _with_headers(send, self._isolation))
            return
        if response is None:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def _has_token(query: str) -> bool:
    return any(part.lower().startswith("token=") for part in query.split("&"))


def _with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return sending
