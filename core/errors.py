"""The one exception tree of nnunet-node.

Every error the node raises on purpose derives from :class:`NodeError`. The HTTP layer maps
:class:`ClientError` subclasses to 4xx answers and everything else to 500; the DIMSE layer maps them
to the statuses of PS3.4 (see ``node``). Messages are written for the user who sent the request:
they name the field, model, path or UID at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class NodeError(Exception):
    """Base of every error raised on purpose by nnunet-node."""


class ConfigError(NodeError):
    """Settings or the model-serve spec are invalid; raised at start-up."""


class ClientError(NodeError):
    """The request is at fault (HTTP 4xx). ``status_code`` says which."""

    status_code: int = 400


class InvalidRequest(ClientError):
    """A malformed or inconsistent request (HTTP 400)."""


class UnknownModel(ClientError):
    """A model id, name or alias that the spec does not know (HTTP 400)."""


class PathNotAllowed(ClientError):
    """A path that resolves outside the allowed roots (HTTP 400)."""


class UnsafeArchive(ClientError):
    """An archive with absolute, ``..``, link or device members, or too large (HTTP 400)."""


class PayloadTooLarge(ClientError):
    """An upload over the configured size limit (HTTP 413)."""

    status_code = 413


class NotFound(ClientError):
    """A job, study, series or instance that does not exist (HTTP 404)."""

    status_code = 404


class Conflict(ClientError):
    """The object is in a state that forbids the operation (HTTP 409)."""

    status_code = 409


class InvalidDicom(ClientError):
    """Bytes that do not parse as DICOM, or lack the UIDs needed to file them."""


class StorageFull(NodeError):
    """Free disk space is below the configured floor; nothing was written."""


class ModelUnavailable(NodeError):
    """A model known to the spec whose files are absent or unreadable (weights missing)."""


class InferenceError(NodeError):
    """nnU-Net or the post-processing failed on valid input."""


class ExportError(NodeError):
    """A DICOM-SEG or RTSTRUCT could not be written (bad metadata, unusable geometry)."""


class JobCancelled(NodeError):
    """The job was cancelled while it ran."""


# --- pydantic's errors, said once ------------------------------------------------------------

_TYPE_MESSAGES = {
    "missing": "required",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "float_type": "must be a number",
}


def validation_message(err: Mapping[str, Any]) -> str:
    """The text of one pydantic error (an item of ``ValidationError.errors()``), without the
    location: a custom validator's own message as it was raised, a type error in plain words."""
    kind = err.get("type")
    if kind == "value_error":
        ctx = err.get("ctx") or {}
        if "error" in ctx:
            return str(ctx["error"])
    if kind in _TYPE_MESSAGES:
        return (
            f"{_TYPE_MESSAGES[kind]}, got {err.get('input')!r}" if kind != "missing" else "required"
        )
    return str(err.get("msg", "invalid"))


def describe_validation_error(
    exc: Any, *, skip: tuple[str, ...] = (), per_field: bool = False
) -> str:
    """All problems of a pydantic ``ValidationError`` as ``"a.b: message; c: message"``.

    Location parts in ``skip`` (e.g. FastAPI's ``"body"``) are left out of the path. With
    ``per_field`` (for models whose fields are unions, where pydantic reports a field once per
    member, naming the member in the location) each field is reported once, as its name and list
    indices (``series_folders[0]``), and an unknown key as ``unknown field 'x'``."""
    problems: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in skip]
        if not per_field:
            where = ".".join(loc)
            text = validation_message(err)
            problems.append(f"{where}: {text}" if where else text)
            continue
        field = loc[0] if loc else ""
        if err.get("type") == "extra_forbidden":
            problems.append(f"unknown field {field!r}")
            continue
        if field in seen:
            continue
        seen.add(field)
        where = field + "".join(f"[{p}]" for p in loc[1:] if p.isdigit())
        text = "field required" if err.get("type") == "missing" else validation_message(err)
        problems.append(f"{where}: {text}" if where else text)
    return "; ".join(problems) or str(exc)
