"""Dependencies shared by the routers, as ``Annotated`` aliases (``ContextDep``, ``ApiKeyDep``).

The API key guards every route but the health probes (``docs/architecture.md``, "Security
defaults"). It is sent as ``X-API-Key`` (the issue's header), or, for viewers such as OHIF that
send bearer tokens, as ``Authorization: Bearer <key>``, or in the dashboard's login cookie; each is
compared in constant time. A 401 advertises ``Bearer`` (RFC 6750), the scheme a browser client
can send.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.context import NodeContext
from nnunet_node.pipeline.jobs import JobService

API_KEY_HEADER = "X-API-Key"
KEY_COOKIE = "nnunet_node_key"
"""The cookie the dashboard's login sets (HttpOnly, SameSite=Strict): the key, for pages and the
viewer served by the node itself."""
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


def _presented_key(request: Request, header_key: str | None) -> str | None:
    if header_key:
        return header_key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    cookie = request.cookies.get(KEY_COOKIE)
    return cookie or None


def key_matches(settings: Settings, presented: str | None) -> bool:
    """Whether ``presented`` is the configured key (constant-time); True when none is set."""
    if not settings.api_key:
        return True
    return presented is not None and secrets.compare_digest(
        presented.encode("utf-8"), settings.api_key.encode("utf-8")
    )


def require_api_key(
    request: Request, header_key: Annotated[str | None, Security(_api_key_header)] = None
) -> None:
    """Refuse (401) a request without the configured key; allow all when no key is configured."""
    if not key_matches(get_settings(request), _presented_key(request, header_key)):
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
