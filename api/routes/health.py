"""Health probes: liveness (``/healthz``) and readiness (``/readyz``), without the API key."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from nnunet_node.pipeline.broker import safe_broker_url
from nnunet_node.storage.db import ping

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    """Liveness: the event loop answers (inference runs in workers, never here)."""
    return {"status": "ok"}


def _readiness(request: Request) -> tuple[bool, dict[str, Any]]:
    context = getattr(request.app.state, "context", None)
    if context is None:
        return False, {"error": "the node is starting"}
    problems: list[str] = []
    try:
        ping(context.session_factory)
        database: dict[str, Any] = {"reachable": True}
    except Exception as exc:  # report, do not raise: this is the probe's answer
        LOGGER.warning("readiness: database unreachable: %s", exc)
        database = {"reachable": False, "error": str(exc)}
        problems.append("database unreachable")
    engine = context.inference_engine
    models = context.spec.registry.models
    available = [m.id for m in models if context.spec.registry.files(m).available]
    if not models:
        problems.append("no models in the spec")
    body: dict[str, Any] = {
        "spec": {
            "path": str(context.settings.model_serve_spec),
            "models": [m.id for m in models],
            "available": available,
        },
        "database": database,
        "device": engine.device_policy.status(),
        "cache": engine.cache.snapshot(),
        "workers": context.settings.workers,
    }
    if context.settings.broker_url:
        # The node runs no job itself: what runs them is the worker processes alive now (their
        # heartbeat at most one lease old), which may be none; jobs still queue meanwhile.
        body["broker"] = safe_broker_url(context.settings.broker_url)
        body["workers"] = len(context.job_service.workers()) if database["reachable"] else None
    if problems:
        body["error"] = "; ".join(problems)
    return not problems, body


@router.get("/readyz", responses={503: {"description": "Not ready (database, spec)"}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: spec loaded, database reachable, device state and cached models."""
    ready, body = await run_in_threadpool(_readiness, request)
    return JSONResponse({"status": "ok" if ready else "failed", **body}, 200 if ready else 503)
