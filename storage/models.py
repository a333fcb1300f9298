"""ORM models: the DICOM index (patient, study, series, instance), jobs and their outputs.

The index holds the attributes that C-FIND (PS3.4 C.6) and QIDO-RS (PS3.18 10.6) match on, plus
where each instance lies and how it arrived. Alembic migrations (``alembic/``) are the only way the
schema is made; change this module and add a migration together.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from nnunet_node.core.clock import utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


UID = String(64)  # PS3.5 9.1: a UID is at most 64 characters
TS = DateTime(timezone=True)


class Patient(Base):
    """One patient: Patient ID within its issuer (PS3.3 C.7.1.1, IHE PIX: an ID means one
    person only together with its Issuer of Patient ID).

    A study without a Patient ID gets a patient record of its own (``study_scope`` holds its
    Study Instance UID), so it never joins another study's patient. The name, birth date and sex
    here are the latest study's; each study keeps its own copy (:class:`Study`)."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    study_scope: Mapped[str] = mapped_column(UID, default="")
    """Empty for an identified patient; the study's UID for a study without a Patient ID."""
    patient_name: Mapped[str] = mapped_column(String(324), default="", index=True)
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")

    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id", "study_scope"),)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    # The patient as this study's instances name it (the first instance's values are kept).
    patient_name: Mapped[str] = mapped_column(String(324), default="", index=True)
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TS, default=utcnow, onupdate=utcnow)
    # Aggregates (PS3.4 C.3.4) kept by ingest in the transaction of each instance row
    # (storage/indexer.py), so that C-FIND and QIDO-RS read them instead of counting.
    number_of_series: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """NumberOfStudyRelatedSeries."""
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """NumberOfStudyRelatedInstances."""
    modalities_in_study: Mapped[str] = mapped_column(Text, default="", server_default="")
    """ModalitiesInStudy: its series' distinct modalities, sorted, backslash-separated."""

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    series_date: Mapped[str] = mapped_column(String(8), default="")
    series_time: Mapped[str] = mapped_column(String(16), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(UID, default="")
    # Arrival bookkeeping for series completion (``docs/architecture.md``, "Data flow" 2).
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(TS, default=utcnow, index=True)
    completion_handled_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    """When routing last looked at this series; unhandled while older than ``last_received_at``."""
    last_source: Mapped[str] = mapped_column(String(16), default="", server_default="")
    """How the last instance arrived (``Instance.source``: ``dimse``, ``stow``...); with
    ``calling_ae``/``called_ae``, the arrival that completes the series."""
    content_changed_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    """When an instance last arrived that changed the series (a new instance, or other bytes
    than the copy held); a re-sent byte-identical copy bumps ``last_received_at`` only. None:
    not known (rows indexed before migration 0007): ``last_received_at`` stands for it."""
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """NumberOfSeriesRelatedInstances, kept by ingest (storage/indexer.py)."""

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    sop_class_uid: Mapped[str] = mapped_column(UID, default="", index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID, default="")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(String(512))
    """Relative to the archive folder: ``<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    source: Mapped[str] = mapped_column(String(16), default="")
    """How it arrived: ``dimse``, ``stow``, ``job`` (a result of ours) or ``import``."""
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")

    series: Mapped[Series] = relationship(back_populates="instances")

    __table_args__ = (
        # A series' instances in Instance Number order (C-FIND, QIDO-RS, C-MOVE and C-GET lists)
        # read from the index, no sort; also every look-up by series.
        Index("ix_instances_series_pk_instance_number", "series_pk", "instance_number"),
    )


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"


class InputKind(enum.StrEnum):
    """Where a job reads its series from (the runner branches on it, nothing else)."""

    PATHS = "paths"
    """Series folders under the request's ``study_path`` (checked against the allowed roots)."""
    UPLOAD = "upload"
    """Series folders under a folder the node chose (an extracted ``/infer_file`` upload), in
    ``Job.study_path``; the folder is removed when the job is over."""
    ARCHIVE = "archive"
    """Series of the node's archive by SeriesInstanceUID (``job_series.series_instance_uid``),
    exported to ``<jobs>/<id>/inputs/`` when the job runs."""


def _enum(cls: type[enum.StrEnum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """A UUID4 in hex; also the name of the job's folder."""
    source: Mapped[str] = mapped_column(String(16), index=True)
    """``http`` (/infer, /infer_file, /jobs), ``dimse`` or ``stow`` (a routing rule fired)."""
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus), default=JobStatus.QUEUED, index=True
    )
    input_kind: Mapped[InputKind] = mapped_column(_enum(InputKind))
    study_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    """The study folder of ``paths`` and ``upload`` jobs (absolute); None for ``archive`` jobs."""
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The request as the client sent it (HTTP) or as the route built it (DIMSE): only its keys."""
    route_name: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    client: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """The address of the HTTP client that sent the job (status pages); None for routed jobs."""
    study_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    output_dir: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """``{"stage": i, "stages": n, "step": "...", "fraction": 0..1}``."""
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """The response body the reference's /infer would answer, once done."""
    run_record: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """How the result was made (versions, checkpoint hashes, effective request, inputs, timings,
    outputs with checksums): the same document as ``run.json`` in the job's output folder."""
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    superseded_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)

    models: Mapped[list[JobModel]] = relationship(
        cascade="all, delete-orphan", order_by="JobModel.position"
    )
    """Canonical model ids, one per stage, in stage order."""
    series: Mapped[list[JobSeries]] = relationship(
        cascade="all, delete-orphan", order_by="JobSeries.position"
    )
    """What the job reads, in order: folders (``paths``/``upload``) or UIDs (``archive``)."""
    artifacts: Mapped[list[JobArtifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobArtifact.id"
    )
    dispatches: Mapped[list[Dispatch]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Dispatch.id"
    )

    # Where and by whom it runs (docs: README, "Workers on other hosts").
    queue: Mapped[str] = mapped_column(String(64), default="default", server_default="default")
    """The queue whose workers may run it: the route's or the first model's, else the default."""
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """The worker that runs it (or ran it last); ``None`` for in-process workers."""
    lease_expires_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    """Until when its running worker holds it; the worker renews it while alive. Once past, the
    job is run again by another worker (or failed after the last attempt)."""
    enqueued_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    """When its id was last handed to the broker (``None`` in-process)."""

    __table_args__ = (
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_queue_status_created", "queue", "status", "created_at"),
    )


class JobModel(Base):
    """One stage's model of a job: the association that the history's ``model`` filter joins."""

    __tablename__ = "job_models"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(128), index=True)


class JobSeries(Base):
    """One series a job reads: a SeriesInstanceUID of the archive, or a folder of the study."""

    __tablename__ = "job_series"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True, index=True)
    folder: Mapped[str | None] = mapped_column(String(1024), nullable=True)


class JobArtifact(Base):
    __tablename__ = "job_artifacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(48))
    """The response field it is listed under: ``nifti_prediction``, ``dicom_segmentation``, ..."""
    stage: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(String(1024))
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class DispatchStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class Dispatch(Base):
    """One destination a job's DICOM results go to (a routing rule's ``destinations``)."""

    __tablename__ = "dispatches"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[DispatchStatus] = mapped_column(
        _enum(DispatchStatus),
        default=DispatchStatus.PENDING,
        index=True,
    )
    attempts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """Every attempt: ``{"at": iso time, "ok": bool, "error": str | None, "sent": n}``."""
    next_attempt_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(TS, default=utcnow, onupdate=utcnow)

    job: Mapped[Job] = relationship(back_populates="dispatches")


class Worker(Base):
    """A ``nnunet-node worker`` process, as its heartbeats describe it (``GET /workers``)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    """Unique per process: ``<name>@<host>`` (the Celery node name)."""
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    device: Mapped[str] = mapped_column(String(32), default="")
    queues: Mapped[list[Any]] = mapped_column(JSON, default=list)
    models: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """The predictors it holds loaded (model folder, folds, checkpoint, device)."""
    current_job: Mapped[str | None] = mapped_column(String(32), nullable=True)
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
    """Jobs it ran to an end (done, failed or stopped)."""
    model_loads: Mapped[int] = mapped_column(Integer, default=0)
    """Predictors it loaded from disk (a warm cache hit loads none)."""
    started_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(TS, default=utcnow, index=True)
