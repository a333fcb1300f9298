"""Settings from environment variables, validated once at start-up.

The reference server's names are kept (``MODEL_SERVE_SPEC``, ``TOTALSEG_WEIGHTS_PATH``,
``NNUNET_SERVE_PORT``); everything of ours starts with ``NNUNET_NODE_``. Build a :class:`Settings`
in the composition root (app factory, command line) and pass it down: no module reads the
environment on its own, so tests can build as many differently configured nodes as they like.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from nnunet_node.core.errors import ConfigError, describe_validation_error

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash, 16 chars


MAX_AUTO_DICOM_PROCESSES = 4
"""At most this many receiving processes unless ``NNUNET_NODE_DICOM_PROCESSES`` says more."""

_VARIABLES = {
    "tls_cert": "NNUNET_NODE_TLS_CERT",
    "tls_key": "NNUNET_NODE_TLS_KEY",
    "tls_ca": "NNUNET_NODE_TLS_CA",
}


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _split(value: object, sep: str) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_queue_name(value: str) -> str:
    """A job queue's name: letters, digits, ``_ . -``, at most 64 characters (a broker routing
    key everywhere). Raises :class:`ValueError` otherwise."""
    if not isinstance(value, str) or not _QUEUE_NAME.match(value):
        raise ValueError(
            f"queue name {value!r}: 1 to 64 letters, digits, '_', '.' or '-' (first a letter "
            "or digit)"
        )
    return value


def variable_names(field: FieldInfo) -> list[str]:
    """The environment variables a settings field reads: the upper-case names of its
    ``validation_alias`` (``NNUNET_NODE_...`` or one of the reference server's three)."""
    choices = getattr(field.validation_alias, "choices", [])
    return [c for c in choices if isinstance(c, str) and c.isupper()]


class _OwnVariables(EnvSettingsSource):
    """The environment, read only under the node's own names.

    pydantic-settings also reads a field under its bare name (``WORKERS``, ``DEVICE``,
    ``API_KEY``, ``HTTPS``, ``LOG_LEVEL``... in any case) when fields may be filled by name, as
    :class:`Settings` allows for the composition roots and tests: a variable some other program
    set on the host would then configure the node, or stop it. Here a field reads only the
    variables :func:`variable_names` gives."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[object, str, bool]:
        for name in variable_names(field):
            value = self.env_vars.get(name if self.case_sensitive else name.lower())
            if value is not None:
                return value, name, False
        return None, field_name, False


class Settings(BaseSettings):
    """Every setting of the node. Field docs name the environment variable; only those names
    are read from the environment (``_OwnVariables``), while keyword arguments use the field
    names (``Settings(data_dir=...)``)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments first, then the environment under the node's own names only."""
        return init_settings, _OwnVariables(settings_cls)

    # --- the reference server's names -------------------------------------------------
    model_serve_spec: Path = Field(
        Path("model-serve-spec.yaml"), validation_alias=_env("MODEL_SERVE_SPEC", "model_serve_spec")
    )
    """``MODEL_SERVE_SPEC``: the model-serve spec (models, routes, destinations)."""
    totalseg_weights_path: Path | None = Field(
        None, validation_alias=_env("TOTALSEG_WEIGHTS_PATH", "totalseg_weights_path")
    )
    """``TOTALSEG_WEIGHTS_PATH``: TotalSegmentator weights; default ``<model_folder>/totalseg``."""
    http_port: int = Field(
        12345, ge=1, le=65535, validation_alias=_env("NNUNET_SERVE_PORT", "http_port")
    )
    """``NNUNET_SERVE_PORT``: the HTTP port."""

    # --- ours ---------------------------------------------------------------------------
    http_host: str = Field("127.0.0.1", validation_alias=_env("NNUNET_NODE_HOST", "http_host"))
    data_dir: Path = Field(Path("data"), validation_alias=_env("NNUNET_NODE_DATA", "data_dir"))
    """``NNUNET_NODE_DATA``: archive, job outputs, uploads and the default SQLite file."""
    db_url: str | None = Field(None, validation_alias=_env("NNUNET_NODE_DB_URL", "db_url"))
    """``NNUNET_NODE_DB_URL``: any SQLAlchemy URL; default SQLite in the data folder."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", validation_alias=_env("NNUNET_NODE_LOG_LEVEL", "log_level")
    )
    """``NNUNET_NODE_LOG_LEVEL``: DEBUG also lets libraries (pynetdicom, uvicorn's access log)
    narrate their work."""
    log_format: Literal["text", "json"] = Field(
        "text", validation_alias=_env("NNUNET_NODE_LOG_FORMAT", "log_format")
    )
    """``NNUNET_NODE_LOG_FORMAT``: ``json`` writes one JSON object per line for log collectors."""

    # DIMSE
    dicom_enabled: bool = Field(
        True, validation_alias=_env("NNUNET_NODE_DICOM_ENABLED", "dicom_enabled")
    )
    ae_title: str = Field("NNUNET_NODE", validation_alias=_env("NNUNET_NODE_AE_TITLE", "ae_title"))
    dicom_host: str = Field(
        "127.0.0.1", validation_alias=_env("NNUNET_NODE_DICOM_HOST", "dicom_host")
    )
    """``NNUNET_NODE_DICOM_HOST``: the address the DICOM node listens on; loopback by default,
    so that nothing outside the machine reaches it until peers are declared."""
    dicom_port: int = Field(
        11112, ge=0, le=65535, validation_alias=_env("NNUNET_NODE_DICOM_PORT", "dicom_port")
    )
    dicom_tls_port: int | None = Field(
        None, ge=0, le=65535, validation_alias=_env("NNUNET_NODE_DICOM_TLS_PORT", "dicom_tls_port")
    )
    """``NNUNET_NODE_DICOM_TLS_PORT``: a second DICOM port that speaks TLS (PS3.15 B.1, B.9);
    needs ``NNUNET_NODE_TLS_CERT`` and ``NNUNET_NODE_TLS_KEY``. Unset: no TLS port."""
    dicom_processes: int | None = Field(
        None, ge=1, le=64, validation_alias=_env("NNUNET_NODE_DICOM_PROCESSES", "dicom_processes")
    )
    """``NNUNET_NODE_DICOM_PROCESSES``: how many processes receive on the DICOM port(s) (the
    node's own and ``n - 1`` receiver processes sharing its ports, node/receivers.py), so that
    several associations at once use several cores. Unset: one per core, at most 4
    (:attr:`dicom_process_count`)."""
    dicom_stop_grace_s: float = Field(
        8.0,
        ge=0,
        le=3600,
        validation_alias=_env("NNUNET_NODE_DICOM_STOP_GRACE_S", "dicom_stop_grace_s"),
    )
    """``NNUNET_NODE_DICOM_STOP_GRACE_S``: on SIGTERM or SIGINT the DICOM ports close at once
    (new connections are refused) and the associations open are given this many seconds to end
    (their C-STOREs answered, their release answered) before those still open are aborted; a
    second signal aborts them at once. 0: abort them at once. The default stays under Docker's
    10 s between ``docker stop``'s SIGTERM and its SIGKILL (node/service.py)."""
    dicom_access: Literal["auto", "peers", "open-store", "open"] = Field(
        "auto", validation_alias=_env("NNUNET_NODE_DICOM_ACCESS", "dicom_access")
    )
    """``NNUNET_NODE_DICOM_ACCESS``: who may use the DICOM node (node/access.py). ``peers``: the
    spec's declared peers, each for what it ``allow``s; ``open-store``: peers, and any other AE
    may C-ECHO and C-STORE; ``open``: anyone may do anything; ``auto`` (default): ``open`` while
    the node listens on loopback only, ``peers`` otherwise."""
    dicom_check_host: bool = Field(
        False, validation_alias=_env("NNUNET_NODE_DICOM_CHECK_HOST", "dicom_check_host")
    )
    """``NNUNET_NODE_DICOM_CHECK_HOST``: a peer is recognised only from its declared ``host``
    (each peer may also set ``check_host``)."""
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("NNUNET_NODE_ALLOWED_AES", "allowed_calling_aes"),
    )
    """``NNUNET_NODE_ALLOWED_AES``: comma-separated calling AE titles; empty allows any."""
    min_free_disk_mb: int = Field(
        500, ge=0, validation_alias=_env("NNUNET_NODE_MIN_FREE_DISK_MB", "min_free_disk_mb")
    )
    """Below this much free space in the data folder, C-STORE and STOW answer out of resources."""
    series_quiet_s: float = Field(
        10.0, ge=0, validation_alias=_env("NNUNET_NODE_SERIES_QUIET_S", "series_quiet_s")
    )

    # HTTP safety
    api_key: str | None = Field(None, validation_alias=_env("NNUNET_NODE_API_KEY", "api_key"))
    metrics_public: bool = Field(
        False, validation_alias=_env("NNUNET_NODE_METRICS_PUBLIC", "metrics_public")
    )
    """Serve ``/metrics`` without the API key (a Prometheus server inside the same network)."""
    viewer_dir: Path = Field(
        Path("viewer"), validation_alias=_env("NNUNET_NODE_VIEWER_DIR", "viewer_dir")
    )
    """Where ``make viewer`` put the OHIF build (served at ``/viewer`` when present)."""
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, validation_alias=_env("NNUNET_NODE_ALLOWED_ROOTS", "allowed_roots")
    )
    """``NNUNET_NODE_ALLOWED_ROOTS``: ``:``-separated; paths in requests must lie inside one."""
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("NNUNET_NODE_CORS_ORIGINS", "cors_origins")
    )
    max_upload_mb: int = Field(
        2048, ge=1, validation_alias=_env("NNUNET_NODE_MAX_UPLOAD_MB", "max_upload_mb")
    )
    max_extract_mb: int = Field(
        8192, ge=1, validation_alias=_env("NNUNET_NODE_MAX_EXTRACT_MB", "max_extract_mb")
    )
    rate_limit_per_minute: int = Field(
        600, ge=0, validation_alias=_env("NNUNET_NODE_RATE_LIMIT", "rate_limit_per_minute")
    )
    """Requests per minute per client address; 0 turns the limit off."""

    # TLS (DICOM and HTTP)
    tls_cert: Path | None = Field(None, validation_alias=_env("NNUNET_NODE_TLS_CERT", "tls_cert"))
    """``NNUNET_NODE_TLS_CERT``: the node's certificate (PEM, chain allowed) for the DICOM TLS
    port, HTTPS, and as client certificate when it sends to a TLS peer."""
    tls_key: Path | None = Field(None, validation_alias=_env("NNUNET_NODE_TLS_KEY", "tls_key"))
    """``NNUNET_NODE_TLS_KEY``: the private key (PEM, unencrypted) of ``NNUNET_NODE_TLS_CERT``."""
    tls_ca: Path | None = Field(None, validation_alias=_env("NNUNET_NODE_TLS_CA", "tls_ca"))
    """``NNUNET_NODE_TLS_CA``: CA certificates (PEM). When set, a client of the DICOM TLS port
    must present a certificate they signed, and a TLS peer the node sends to is verified
    against them (otherwise against the system's CAs)."""
    https: bool = Field(False, validation_alias=_env("NNUNET_NODE_HTTPS", "https"))
    """``NNUNET_NODE_HTTPS``: serve the HTTP API over TLS with the node's certificate."""

    # Inference
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", validation_alias=_env("NNUNET_NODE_DEVICE", "device")
    )
    gpu_wait_s: float = Field(
        600.0, ge=0, validation_alias=_env("NNUNET_NODE_GPU_WAIT_S", "gpu_wait_s")
    )
    cache_ttl_s: float = Field(
        300.0, gt=0, validation_alias=_env("NNUNET_NODE_CACHE_TTL_S", "cache_ttl_s")
    )
    cache_sweep_s: float = Field(
        60.0, gt=0, validation_alias=_env("NNUNET_NODE_CACHE_SWEEP_S", "cache_sweep_s")
    )
    cache_max_entries: int = Field(
        4, ge=1, validation_alias=_env("NNUNET_NODE_CACHE_MAX_ENTRIES", "cache_max_entries")
    )
    workers: int = Field(1, ge=1, validation_alias=_env("NNUNET_NODE_WORKERS", "workers"))

    # Jobs past one machine (Celery workers; docs in README, "Workers on other hosts")
    broker_url: str | None = Field(
        None, validation_alias=_env("NNUNET_NODE_BROKER_URL", "broker_url")
    )
    """``NNUNET_NODE_BROKER_URL``: a Celery broker (``redis://host:6379/0``, ``amqp://...``). Set,
    ``serve`` runs no jobs itself: it hands job ids to ``nnunet-node worker`` processes."""
    default_queue: str = Field(
        "default", validation_alias=_env("NNUNET_NODE_DEFAULT_QUEUE", "default_queue")
    )
    """``NNUNET_NODE_DEFAULT_QUEUE``: the queue of jobs whose route and model name none."""
    job_lease_s: float = Field(
        60.0, ge=1, validation_alias=_env("NNUNET_NODE_JOB_LEASE_S", "job_lease_s")
    )
    """``NNUNET_NODE_JOB_LEASE_S``: a worker renews its running job's lease every quarter of this;
    a job whose lease ran out (its worker died) is run again by another worker."""
    job_max_attempts: int = Field(
        2, ge=1, validation_alias=_env("NNUNET_NODE_JOB_MAX_ATTEMPTS", "job_max_attempts")
    )
    """``NNUNET_NODE_JOB_MAX_ATTEMPTS``: runs of a job whose worker (or process) died, at most."""
    broker_resend_s: float = Field(
        60.0, gt=0, validation_alias=_env("NNUNET_NODE_BROKER_RESEND_S", "broker_resend_s")
    )
    """``NNUNET_NODE_BROKER_RESEND_S``: when the broker holds fewer messages for a queue than it
    has queued jobs (restarted without its data), the ids sent longer ago than this are sent
    again; a copy delivered twice still runs once."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("allowed_calling_aes", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value, ",")

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _colon_list(cls, value: object) -> object:
        return _split(value, ":")

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if "://" not in value:
            raise ValueError("must be a broker URL such as redis://host:6379/0 or amqp://host//")
        return value.strip()

    @field_validator("default_queue")
    @classmethod
    def _check_queue(cls, value: str) -> str:
        return check_queue_name(value)

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        if not _AE_TITLE.match(value) or not value.strip():
            raise ValueError("must be 1 to 16 printable characters without a backslash")
        return value.strip()

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        data = self.data_dir.expanduser().resolve()
        object.__setattr__(self, "data_dir", data)
        if not self.allowed_roots:
            object.__setattr__(self, "allowed_roots", [data])
        else:
            object.__setattr__(
                self, "allowed_roots", [p.expanduser().resolve() for p in self.allowed_roots]
            )
        object.__setattr__(self, "model_serve_spec", self.model_serve_spec.expanduser().resolve())
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path is not None:
                path = path.expanduser().resolve()
                if not path.is_file():
                    raise ValueError(f"{_VARIABLES[name]}: {path} is not a file")
                object.__setattr__(self, name, path)
        needs_cert = {
            "NNUNET_NODE_DICOM_TLS_PORT": self.dicom_tls_port is not None,
            "NNUNET_NODE_HTTPS": self.https,
        }
        for variable, needed in needs_cert.items():
            if needed and (self.tls_cert is None or self.tls_key is None):
                raise ValueError(f"{variable} needs NNUNET_NODE_TLS_CERT and NNUNET_NODE_TLS_KEY")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("NNUNET_NODE_TLS_CERT and NNUNET_NODE_TLS_KEY go together")
        return self

    # --- derived --------------------------------------------------------------------------
    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'nnunet-node.db'}"

    @property
    def dicom_process_count(self) -> int:
        """``NNUNET_NODE_DICOM_PROCESSES``, or by default the cores this process may run on
        (``sched_getaffinity``), at most :data:`MAX_AUTO_DICOM_PROCESSES`."""
        if self.dicom_processes is not None:
            return self.dicom_processes
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, min(cores, MAX_AUTO_DICOM_PROCESSES))

    @property
    def archive_dir(self) -> Path:
        """Where received instances are filed: ``<archive>/<Study>/<Series>/<SOP>.dcm``."""
        return self.data_dir / "dicom"

    @property
    def jobs_dir(self) -> Path:
        """Each job's working folder and default output folder: ``<jobs>/<job_id>/``."""
        return self.data_dir / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"


def load_settings(**overrides: object) -> Settings:
    """Read the environment (and ``overrides``); raise :class:`ConfigError` naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {describe_validation_error(exc)}") from exc
