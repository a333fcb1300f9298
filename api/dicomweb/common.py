"""What the DICOMweb routes share: the service's base URL, the archive, UID checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request

from nnunet_node.core.errors import InvalidRequest, shown_value

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from nnunet_node.core.settings import Settings
    from nnunet_node.storage.archive import Archive

PREFIX = "/dicom-web"

_UID_CHARS = frozenset("0123456789.")


def service_url(request: Request) -> str:
    """The absolute URL of the DICOMweb service root, as the client reached it.

    PS3.18 8.3.1: Retrieve URLs and Bulk Data URIs in answers are absolute; ``root_path`` keeps
    them right behind a reverse proxy that mounts the node under a path.
    """
    base = str(request.base_url).rstrip("/")
    # dicomweb-client (0.61) sends ``Host`` without the port; on a direct connection (no proxy
    # headers) to a non-default port, put the port the client connected to back in.
    url = request.base_url
    server = request.scope.get("server")
    proxy_headers = ("x-forwarded-host", "x-forwarded-for", "forwarded")
    proxied = any(h in request.headers for h in proxy_headers)
    if url.port is None and server and server[1] and not proxied:
        default = {"http": 80, "https": 443}.get(url.scheme)
        if server[1] != default and url.hostname:
            base = str(url.replace(port=server[1])).rstrip("/")
    return f"{base}{PREFIX}"


def study_url(base: str, study: str) -> str:
    return f"{base}/studies/{study}"


def series_url(base: str, study: str, series: str) -> str:
    return f"{base}/studies/{study}/series/{series}"


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def check_uid(value: str, what: str) -> str:
    """A UID from the path (PS3.5 9.1): digits and dots, at most 64 characters, else 400."""
    if not value or len(value) > 64 or not set(value) <= _UID_CHARS:
        raise InvalidRequest(f"{what} {shown_value(value)} is not a valid UID")
    return value


def context_parts(context: Any) -> tuple[Settings, sessionmaker[Session], Archive]:
    """The settings, sessionmaker and archive of the node's pipeline context."""
    return context.settings, context.archive.read_sessions, context.archive
