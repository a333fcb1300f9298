"""The one exception tree of nnunet-node.

Every error the node raises on purpose derives from :class:`NodeError`. The HTTP layer maps
:class:`ClientError` subclasses to 4xx answers and everything else to 500; the DIMSE layer maps them
to the statuses of PS3.4 (see ``node``). Messages are written for the user who sent the request:
they name the field, model, path or UID at fault.
"""

from __future__ import annotations


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
