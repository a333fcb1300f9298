"""The app factory: the composition root of the node (DESIGN.md, "one place wires everything").

``create_app(settings)`` builds a FastAPI app whose lifespan migrates the database, builds the
pipeline context (archive, spec, inference engine, job service), recovers half-done archive writes,
starts the job workers and the model cache sweeper, then every service registered under the
entry-point group ``nnunet_node.services`` (the DIMSE node is one), and stops them all in reverse
order. Nothing is built at import time, so tests make as many differently configured apps as they
like. ``uvicorn api.app:create_app --factory`` and ``nnunet-node serve`` both start it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from api.deps import API_KEY_HEADER, require_api_key
from api.dicomweb import router as dicomweb_router
from api.errors import install_error_handlers, responses
from api.middleware import CatchAllMiddleware, RateLimitMiddleware
from api.routes import health, infer, jobs, models
from core.settings import Settings, load_settings
from inference.request import InferenceRequest
from pipeline.context import NodeContext, build_context

LOGGER = logging.getLogger(__name__)

SERVICES_GROUP = "nnunet_node.services"
UNPROTECTED = ("/healthz", "/readyz")
"""Health probes answer without the API key and outside the rate limit (orchestrators poll them)."""


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def discover_services() -> list[tuple[str, Callable[[NodeContext], Service]]]:
    """The service factories registered under :data:`SERVICES_GROUP`, by name.

    Every one is started: each honours its own settings (the ``dimse`` service leaves its AE out
    when ``NNUNET_NODE_DICOM_ENABLED`` is false but still routes STOW-RS series and dispatches).
    """
    return [(ep.name, ep.load()) for ep in sorted(entry_points(group=SERVICES_GROUP), key=_name)]


def _name(ep: EntryPoint) -> str:
    return ep.name


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        # Migrations, archive recovery, spec, engine, job service (blocking: in a thread).
        context = await anyio.to_thread.run_sync(build_context, settings)
        stack.push_async_callback(_in_thread, context.close)
        app.state.context = context
        stack.callback(setattr, app.state, "context", None)

        cache = context.inference_engine.cache
        await anyio.to_thread.run_sync(cache.start)
        stack.push_async_callback(_in_thread, cache.stop)
        await anyio.to_thread.run_sync(context.job_service.start)
        stack.push_async_callback(_in_thread, context.job_service.stop)

        app.state.services = {}
        stack.callback(setattr, app.state, "services", {})
        for name, factory in discover_services():
            service = factory(context)
            await service.start()
            stack.push_async_callback(_stop_service, name, service)
            app.state.services[name] = service
            LOGGER.info("service %s started", name)
        LOGGER.info("node ready: HTTP API, %d job worker(s)", settings.workers)
        yield
        LOGGER.info("node stopping")


async def _in_thread(func: Callable[[], object]) -> None:
    await anyio.to_thread.run_sync(func)


async def _stop_service(name: str, service: Service) -> None:
    try:
        await service.stop()
    except Exception:  # one failing stop must not keep the others running
        LOGGER.exception("service %s did not stop cleanly", name)
    else:
        LOGGER.info("service %s stopped", name)


def _custom_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The /infer and /jobs bodies are read as plain JSON objects (so shape errors are the seed
    document's 400s, not 422s); publish :class:`InferenceRequest` as their schema all the same."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        request_schema = InferenceRequest.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request_schema.pop("$defs", {}))
        components["InferenceRequest"] = request_schema
        # /infer and /jobs need a study and its series (the seed document's required fields).
        components["InferenceRequestWithStudy"] = {
            **request_schema,
            "title": "InferenceRequestWithStudy",
            "required": sorted(
                {*request_schema.get("required", []), "study_path", "series_folders"}
            ),
        }
        app.openapi_schema = schema
        return schema

    return openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the node's app; ``settings`` default to the environment (:func:`load_settings`)."""
    settings = settings or load_settings()
    app = FastAPI(
        title="nnunet-node",
        version="0.1.0",
        description="nnU-Net inference as an HTTP API and DICOM node. Send the API key as "
        f"{API_KEY_HEADER} when one is configured.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.context = None
    app.state.services = {}
    install_error_handlers(app)

    protected: dict[str, Any] = {
        "dependencies": [Depends(require_api_key)],
        "responses": responses(401, 429),
    }
    app.include_router(health.router)
    app.include_router(models.router, **protected)
    app.include_router(infer.router, **protected)
    app.include_router(jobs.router, **protected)
    app.include_router(dicomweb_router, **protected)  # carries /dicom-web

    # Added innermost first: CORS wraps the rate limit, which wraps the catch-all, so that 429 and
    # 500 answers carry CORS headers too and a browser client (OHIF) can read them.
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(
        RateLimitMiddleware, per_minute=settings.rate_limit_per_minute, exempt=UNPROTECTED
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", API_KEY_HEADER, "Content-Type", "Accept"],
            expose_headers=["Retry-After", "Location", "Content-Disposition"],
        )
    app.openapi = _custom_openapi(app)  # type: ignore[method-assign]
    return app
