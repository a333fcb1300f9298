"""Dependencies shared by the routers, as ``Annotated`` aliases (``ContextDep``, ``ApiKeyDep``).

The API key guards every route but the health probes (``docs/architecture.md``, "Security
defaults"). It is sent as ``X-API-Key`` (the issue's header), or, for viewers such as OHIF that
send bearer tokens, as ``Authorization: Bearer <key>``; each is compared in constant time. The
dashboard's login cookie holds a session token derived from the key (HMAC-SHA256), never the key
itself: a cookie that leaks does not give the key away, and changing the key ends every session.
A 401 advertises ``Bearer`` (RFC 6750), the scheme a browser client can send.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.context import NodeContext
from nnunet_node.pipeline.jobs import JobService

API_KEY_HEADER = "X-API-Key"
KEY_COOKIE = "nnunet_node_session"
"""The cookie the dashboard's login sets (HttpOnly, SameSite=Strict): :func:`session_token`, for
pages and the viewer served by the node itself."""
AUTH_CHALLENGE = 'Bearer realm="nnunet-node"'
"""What a 401 advertises (RFC 6750 3): browser clients such as OHIF can only send bearer tokens."""
_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="The node's API key (NNUNET_NODE_API_KEY); not needed when none is configured.",
)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_context(request: Request) -> NodeContext:
    context: NodeContext | None = getattr(request.app.state, "context", None)
    if context is None:  # only between create_app and the lifespan's start
        raise HTTPException(503, "the node is starting")
    return context


def get_job_service(request: Request) -> JobService:
    return get_context(request).job_service


def client_address(request: Request) -> str | None:
    """The HTTP client's address as the server saw it (kept with its jobs for status pages)."""
    return request.client.host if request.client else None


def session_token(api_key: str) -> str:
    """The dashboard session token for ``api_key``: HMAC-SHA256 of a fixed label, hex (64 chars)."""
    return hmac.new(api_key.encode("utf-8"), b"nnunet-node dashboard session", "sha256").hexdigest()


def _presented_key(request: Request, header_key: str | None) -> str | None:
    if header_key:
        return header_key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def key_matches(settings: Settings, presented: str | None) -> bool:
    """Whether ``presented`` is the configured key (constant-time); True when none is set."""
    if not settings.api_key:
        return True
    return presented is not None and _same(presented, settings.api_key)


def request_authorised(settings: Settings, request: Request, header_key: str | None) -> bool:
    """Whether ``request`` carries the key (``X-API-Key`` or bearer) or a dashboard session
    cookie made from it; True when no key is configured."""
    if not settings.api_key or key_matches(settings, _presented_key(request, header_key)):
        return True
    return has_session(settings, request)


def has_session(settings: Settings, request: Request) -> bool:
    """Whether ``request`` carries a dashboard session cookie made from the configured key (its
    pages then offer "Log out"); False when no key is configured."""
    if not settings.api_key:
        return False
    cookie = request.cookies.get(KEY_COOKIE)
    return cookie is not None and _same(cookie, session_token(settings.api_key))


def require_api_key(
    request: Request, header_key: Annotated[str | None, Security(_api_key_header)] = None
) -> None:
    """Refuse (401) a request without the configured key; allow all when no key is configured."""
    if not request_authorised(get_settings(request), request, header_key):
        raise HTTPException(
            401,
            f"missing or wrong API key (send it as {API_KEY_HEADER} or Authorization: Bearer)",
            headers={"WWW-Authenticate": AUTH_CHALLENGE},
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
ContextDep = Annotated[NodeContext, Depends(get_context)]
JobServiceDep = Annotated[JobService, Depends(get_job_service)]
ApiKeyDep = Annotated[None, Depends(require_api_key)]
"""Add ``_: ApiKeyDep`` to a route, or ``dependencies=[Depends(require_api_key)]`` to a router."""
