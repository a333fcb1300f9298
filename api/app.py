"""The HTTP app factory, which the composition root ``nnunet_node.app`` calls.

``create_app(settings, services=...)`` builds a FastAPI app whose lifespan migrates the database,
builds the pipeline context (archive, spec, inference engine, job service), recovers half-done
archive writes, starts the job workers and the model cache sweeper, then every service it was given
(the composition root :mod:`nnunet_node.app` passes the DIMSE node, since ``api`` never imports
``node``), and stops them all in reverse order. Nothing is built at import time, so tests make as
many differently configured apps as they like.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from nnunet_node.api.deps import API_KEY_HEADER, request_authorised, require_api_key
from nnunet_node.api.dicomweb import router as dicomweb_router
from nnunet_node.api.errors import document_validation_as_400, install_error_handlers, responses
from nnunet_node.api.middleware import (
    CatchAllMiddleware,
    DicomwebMetricsMiddleware,
    RateLimitMiddleware,
)
from nnunet_node.api.routes import health, infer, jobs, metrics, models, workers
from nnunet_node.api.ui import pages as ui_pages
from nnunet_node.api.viewer import ViewerMiddleware, viewer_dist
from nnunet_node.core.errors import ConfigError, NotFound
from nnunet_node.core.settings import Settings, load_settings
from nnunet_node.inference.request import InferenceRequest
from nnunet_node.pipeline.context import NodeContext, build_context

LOGGER = logging.getLogger(__name__)

DOCS_ASSETS = "/docs-assets"
"""Where Swagger UI's and ReDoc's scripts and styles are served from (no CDN)."""

UNPROTECTED = ("/healthz", "/readyz")
"""Health probes answer without the API key and outside the rate limit (orchestrators poll them)."""


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


ServiceFactory = Callable[[NodeContext], Service]
"""Builds a service from the pipeline context; the app starts it after the job workers."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        try:
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
            for name, factory in app.state.service_factories:
                service = factory(context)
                await service.start()
                stack.push_async_callback(_stop_service, name, service)
                app.state.services[name] = service
                LOGGER.info("service %s started", name)
            if settings.broker_url:
                LOGGER.info("node ready: HTTP API; jobs go to the broker")
            else:
                LOGGER.info("node ready: HTTP API, %d job worker(s)", settings.workers)
        except ConfigError as exc:  # the command line says it in one line (cli.py)
            app.state.start_error = exc
            raise
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
    document's 400s, not 422s); publish :class:`InferenceRequest` as their schema all the same,
    and 400 where FastAPI documents 422 (:func:`.errors.document_validation_as_400`)."""

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
        # /infer and /jobs need a study and its series (the contract's required fields,
        # docs/reference-contract.md).
        components["InferenceRequestWithStudy"] = {
            **request_schema,
            "title": "InferenceRequestWithStudy",
            "required": sorted(
                {*request_schema.get("required", []), "study_path", "series_folders"}
            ),
        }
        document_validation_as_400(schema)
        app.openapi_schema = schema
        return schema

    return openapi


def create_app(
    settings: Settings | None = None, services: Sequence[tuple[str, ServiceFactory]] = ()
) -> FastAPI:
    """Build the node's HTTP app.

    ``settings`` default to the environment (:func:`load_settings`). ``services`` are ``(name,
    factory)`` pairs started in order by the lifespan once the job workers run, and stopped in
    reverse order; without them the app serves HTTP and runs jobs but has no DICOM node.
    """
    settings = settings or load_settings()
    # fastapi-offline ships Swagger UI's and ReDoc's scripts, so /docs and /redoc work with no
    # internet: their assets are served by the node itself under DOCS_ASSETS.
    app = FastAPIOffline(
        title="nnunet-node",
        version="0.1.0",
        description="nnU-Net inference as an HTTP API and DICOM node. Send the API key as "
        f"{API_KEY_HEADER} when one is configured.",
        lifespan=_lifespan,
        static_url=DOCS_ASSETS,
    )
    app.state.settings = settings
    app.state.context = None
    app.state.services = {}
    app.state.service_factories = tuple(services)
    app.state.start_error = None  # the ConfigError that stopped start-up (a bad spec...)
    install_error_handlers(app)

    protected: dict[str, Any] = {
        "dependencies": [Depends(require_api_key)],
        "responses": responses(401, 429),
    }
    app.include_router(health.router)
    app.include_router(metrics.router)  # its own check: the key unless metrics are public
    app.include_router(models.router, **protected)
    app.include_router(infer.router, **protected)
    app.include_router(jobs.router, **protected)
    app.include_router(workers.router, **protected)
    app.include_router(dicomweb_router, **protected)  # carries /dicom-web
    ui_pages.install(app)  # /ui: the dashboard (its own login redirect)

    # Added innermost first: CORS wraps the rate limit, which wraps the catch-all, so that 429 and
    # 500 answers carry CORS headers too and a browser client (OHIF) can read them.
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(DicomwebMetricsMiddleware)
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
    # The OHIF build, outermost: its static files need neither the key nor the rate limit.
    app.state.viewer = viewer_dist(settings.viewer_dir)
    if app.state.viewer is not None:

        def authorised(scope: Any) -> bool:
            request = Request(scope)
            return request_authorised(settings, request, request.headers.get(API_KEY_HEADER))

        app.add_middleware(ViewerMiddleware, dist=app.state.viewer, authorised=authorised)
    else:

        async def viewer_missing(rest: str = "") -> None:
            where = f" in {settings.viewer_dir}" if settings.viewer_dir else ""
            raise NotFound(
                f"the viewer is not installed: no OHIF build{where} "
                "(run `make viewer`, or set NNUNET_NODE_VIEWER_DIR)"
            )

        for path in ("/viewer", "/viewer/{rest:path}"):
            app.add_api_route(path, viewer_missing, methods=["GET"], include_in_schema=False)
    app.openapi = _custom_openapi(app)  # type: ignore[method-assign]
    return app
