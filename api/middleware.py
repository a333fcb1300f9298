"""ASGI middleware of our own: a per-client rate limit and the last-resort error answer.

Both are plain ASGI (no ``BaseHTTPMiddleware``) so that streamed downloads and uploads pass through
untouched. The reference's rate limit answers 500 (``docs/reference-contract.md``); ours answers 429
with ``Retry-After`` and the JSON error body.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nnunet_node.api.errors import INTERNAL_ERROR, error_body
from nnunet_node.core import metrics

LOGGER = logging.getLogger(__name__)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """One token bucket per key: ``per_minute`` tokens of capacity, refilled continuously.

    A client may burst up to the whole minute's allowance, then gets one request every
    ``60 / per_minute`` seconds. Idle buckets are forgotten so the table stays small.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when allowed, else the seconds until one is available."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(self.capacity, now)
        else:
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        refill = self.capacity / self.rate
        stale = [k for k, b in self._buckets.items() if now - b.stamp >= refill]
        for key in stale or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[key]


async def _send_json(
    send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RateLimitMiddleware:
    """Refuse a client address past ``per_minute`` requests with 429 and ``Retry-After``."""

    def __init__(self, app: ASGIApp, *, per_minute: int, exempt: Collection[str] = ()) -> None:
        self.app = app
        self.buckets = TokenBuckets(per_minute) if per_minute > 0 else None
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.buckets is None or scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self.buckets.take(client[0] if client else "unknown")
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            await _send_json(
                send,
                429,
                error_body(f"rate limit exceeded; retry after {retry_after} s"),
                [(b"retry-after", str(retry_after).encode())],
            )
            return
        await self.app(scope, receive, send)


class CatchAllMiddleware:
    """Answer 500 with the JSON error body for anything that escaped the exception handlers.

    Starlette's own catch-all re-raises after answering, which prints a second traceback from the
    server; this one logs once and answers, unless the response had already started.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            LOGGER.exception("%s %s raised", scope.get("method"), scope.get("path"))
            if started:
                raise
            await _send_json(send, 500, error_body(INTERNAL_ERROR), [])


class DicomwebMetricsMiddleware:
    """Count and time each DICOMweb request (STOW-RS, QIDO-RS, WADO-RS) by service and status,
    from its arrival to the end of its (possibly streamed) response body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = (
            metrics.dicomweb_service(scope.get("method", ""), scope.get("path", ""))
            if scope["type"] == "http"
            else None
        )
        if service is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def measuring_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, measuring_send)
        finally:
            metrics.DICOMWEB_REQUESTS.labels(service, str(status)).inc()
            metrics.DICOMWEB_SECONDS.labels(service).observe(time.perf_counter() - started)
