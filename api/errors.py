"""Every error the HTTP API answers is JSON ``{"status": "failed", "error": "..."}``.

The reference's contract (``docs/reference-contract.md``) gives that shape for /infer's 400 and 500
answers; we use it for every status so a client needs one parser. :class:`core.errors.ClientError`
subclasses carry their own status code; a body that is not JSON, or not a JSON object, is 400, and
so is every other failed validation of a request (query and path parameters, form fields: FastAPI
would answer 422), with the same shape plus ``details`` (pydantic's list of problems); anything
unexpected is logged with its traceback and answered 500 with a generic message, so internals
(paths, SQL) do not leak to the client. :func:`document_validation_as_400` makes the OpenAPI
document say so.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from nnunet_node.core.errors import ClientError, NodeError, describe_validation_error

LOGGER = logging.getLogger(__name__)

INTERNAL_ERROR = "internal server error; the node's log has the details"


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return {"status": "failed", "error": message, **extra}


def error_response(
    status_code: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        jsonable_encoder(error_body(message, **extra)), status_code=status_code, headers=headers
    )


_ERROR_SCHEMA = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["status", "error"],
                "properties": {
                    "status": {"type": "string", "enum": ["failed"]},
                    "error": {"type": "string"},
                },
            }
        }
    }
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error codes a route can answer."""
    text = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Not found",
        409: "Conflict with the job's state",
        413: "Upload too large",
        429: "Rate limit exceeded",
        500: "Inference or server failure",
    }
    return {code: {"description": text.get(code, "Error"), **_ERROR_SCHEMA} for code in codes}


async def _client_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClientError)
    extra = getattr(exc, "extra", None) or {}
    return error_response(exc.status_code, str(exc), **extra)


async def _node_error(request: Request, exc: Exception) -> JSONResponse:
    # A NodeError that is not the client's fault (inference, export, config): say what failed.
    LOGGER.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return error_response(500, str(exc) or type(exc).__name__)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = exc.errors()
    first = details[0] if details else {}
    if first.get("type") == "json_invalid":
        # Not JSON at all: a bad request (400), as the reference answers any unreadable body.
        reason = (first.get("ctx") or {}).get("error") or first.get("msg", "invalid JSON")
        return error_response(400, f"the request body is not valid JSON: {reason}")
    if first.get("type") == "dict_type" and tuple(first.get("loc", ())) == ("body",):
        sent = request.headers.get("content-type", "")
        if sent and "json" not in sent.split(";")[0].lower():
            # FastAPI reads a JSON body only under a JSON media type: `curl -d '{...}'` without
            # -H sends application/x-www-form-urlencoded, and the object arrived as bytes.
            return error_response(
                400,
                "the request body must be a JSON object sent with Content-Type: "
                f"application/json (it came as {sent.split(';')[0].strip()!r})",
            )
        return error_response(400, "the request body must be a JSON object")
    message = describe_validation_error(exc, skip=("body",)) if details else "invalid request"
    return error_response(400, message, details=details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette lists only the first route matching the path; RFC 9110 15.5.6 wants every
        # method the resource supports (GET and POST /jobs are two routes).
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(exc.status_code, str(exc.detail), headers=headers or None)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route answers for this path (asked of the router, method by method)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def document_validation_as_400(schema: dict[str, Any]) -> None:
    """Rewrite an OpenAPI document built by FastAPI so that it documents what the handlers
    answer: FastAPI adds a 422 "Validation Error" to every operation with parameters, and this
    app answers 400 with the error body instead. Each 422 becomes a 400 (kept when the route
    documents one), and the then unused ``HTTPValidationError`` and ``ValidationError`` schemas
    are dropped. Changes ``schema`` in place."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.get("responses") if isinstance(operation, dict) else None
            if not answers or "422" not in answers:
                continue
            answers.pop("422")
            answers.setdefault("400", {"description": "Invalid request", **_ERROR_SCHEMA})
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # the second is used by the first
        if f"#/components/schemas/{name}" not in repr((schema.get("paths"), components)):
            components.pop(name, None)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientError, _client_error)
    app.add_exception_handler(NodeError, _node_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Anything else is answered by api.middleware.CatchAllMiddleware.
