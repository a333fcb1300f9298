"""The one exception tree of nnunet-node.

Every error the node raises on purpose derives from :class:`NodeError`::

    NodeError
    ├── ConfigError             settings or the spec file are invalid (start-up)
    ├── ClientError             the request is at fault (HTTP 4xx; status_code says which)
    │   ├── InvalidRequest          400 a malformed or inconsistent request
    │   │   ├── UnsupportedMediaType    415 a body of a media type the endpoint does not take
    │   │   └── SeriesRefused           an input series that makes no volume matching the patient
    │   ├── UnknownModel            400 a model name the spec does not know
    │   ├── PathNotAllowed          400 a path outside the allowed roots
    │   ├── UnsafeArchive           400 an upload with unsafe members, or too large unpacked
    │   ├── InvalidDicom            400 bytes that are not DICOM, or lack the UIDs to file them
    │   │   └── WrongStudy              an instance of another study than the STOW-RS target
    │   ├── PayloadTooLarge         413 an upload over the size limit
    │   ├── NotFound                404 a job, study, series, instance or dispatch that is absent
    │   ├── Conflict                409 the object's state forbids the operation
    │   └── NotAcceptable           406 no representation the client accepts can be served
    ├── StorageFull             free disk space is below the floor; nothing was written
    ├── ModelUnavailable        a known model whose files are absent
    ├── InferenceError          nnU-Net or the post-processing failed on valid input
    ├── ExportError             a DICOM-SEG or RTSTRUCT could not be written
    ├── SendError               a destination could not be reached or refused instances
    └── JobCancelled            the job was cancelled while it ran

The HTTP layer answers :class:`ClientError` subclasses with their ``status_code`` and everything
else with 500 (``api/errors.py``). The DIMSE layer maps exceptions to the statuses of PS3.4 in one
decorator (``node/status.py``); an ingest failure maps to its C-STORE status and its STOW-RS
Failure Reason through one table, ``storage/refusals.py``. Messages are written for the user who
sent the request: they name the field, model, path or UID at fault.

Exceptions that never leave the module that raises them (``core.dicomscan``'s signals that a
header needs pydicom) are not part of the tree.
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


class SeriesRefused(InvalidRequest):
    """An input series from which no volume matching the patient can be built (missing slices,
    two volumes, no position in the patient); the message says why and what to do (HTTP 400, or
    the failed job's error). See ``inference/series_check.py``."""


class UnsupportedMediaType(InvalidRequest):
    """A body whose media type the endpoint does not take (HTTP 415), e.g. a STOW-RS body that
    is not ``multipart/related; type="application/dicom"`` (PS3.18 10.5.1)."""

    status_code = 415


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


class NotAcceptable(ClientError):
    """No representation the client accepts can be served (HTTP 406, PS3.18 8.7.5)."""

    status_code = 406


class InvalidDicom(ClientError):
    """Bytes that do not parse as DICOM, or lack the UIDs needed to file them."""


class WrongStudy(InvalidDicom):
    """An instance sent to a STOW-RS study resource that belongs to another study
    (PS3.18 10.5.1: "Store Instances" on a study stores instances of that study only)."""


class StorageFull(NodeError):
    """Free disk space is below the configured floor; nothing was written."""


class ModelUnavailable(NodeError):
    """A model known to the spec whose files are absent or unreadable (weights missing)."""


class InferenceError(NodeError):
    """nnU-Net or the post-processing failed on valid input."""


class ExportError(NodeError):
    """A DICOM-SEG or RTSTRUCT could not be written (bad metadata, unusable geometry)."""


class SendError(NodeError):
    """A destination could not be reached, refused the association or refused instances
    (the node's C-STORE SCU, PS3.4 B.2.3)."""


class JobCancelled(NodeError):
    """The job was cancelled while it ran."""


# --- values a requester sent, quoted in messages ---------------------------------------------


def shown_value(value: str | bytes, limit: int = 64) -> str:
    """``value`` as a message or a log line may quote it whatever it holds: Python's ``ascii()``
    of it (quotes; non-ASCII characters, NUL, control characters and backslashes escaped, so the
    line stays one line of printable ASCII), cut to its first ``limit`` characters, with its
    length said when it is longer. Bytes are shown one character per byte (``b"\\xe9"`` as
    ``'\\xe9'``), so what a requester sent can be read back exactly.

    For values that may be anything (a UID of 200 characters with non-ASCII bytes): 64 is the
    longest a UID may be (PS3.5 9.1)."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if len(text) <= limit:
        return ascii(text)
    return f"{text[:limit]!a}... ({len(text)} characters)"


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
