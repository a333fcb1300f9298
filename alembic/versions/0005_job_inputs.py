"""Jobs: what a job reads in real columns (input kind, study path, series) and models by row.

Before, a job kept its study folder under a private ``_study_path`` key of the stored request,
an HTTP client's address under ``_client``, its kind was inferred from missing keys, ``series`` (JSON) held folders for one kind and UIDs
for another, and ``models`` (JSON) was matched with ``LIKE`` on its text. Existing rows are
carried over from that JSON: ``_study_path`` makes an ``upload`` job, a ``study_path`` a
``paths`` job, neither an ``archive`` job.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 01:20:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OWN_STUDY_KEY = "_study_path"
_CLIENT_KEY = "_client"

_jobs_before = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("request", sa.JSON),
    sa.column("models", sa.JSON),
    sa.column("series", sa.JSON),
    sa.column("input_kind", sa.String),
    sa.column("study_path", sa.String),
    sa.column("client", sa.String),
)
_job_models = sa.table(
    "job_models",
    sa.column("job_id", sa.String),
    sa.column("position", sa.Integer),
    sa.column("model_id", sa.String),
)
_job_series = sa.table(
    "job_series",
    sa.column("job_id", sa.String),
    sa.column("position", sa.Integer),
    sa.column("series_instance_uid", sa.String),
    sa.column("folder", sa.String),
)


def upgrade() -> None:
    op.create_table(
        "job_models",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_models_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "position", name=op.f("pk_job_models")),
    )
    op.create_index(op.f("ix_job_models_model_id"), "job_models", ["model_id"])
    op.create_table(
        "job_series",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("folder", sa.String(length=1024), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_series_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "position", name=op.f("pk_job_series")),
    )
    op.create_index(
        op.f("ix_job_series_series_instance_uid"), "job_series", ["series_instance_uid"]
    )
    # NOT NULL needs a default for the rows already there; every new row names its kind.
    op.add_column(
        "jobs",
        sa.Column(
            "input_kind",
            sa.Enum("paths", "upload", "archive", name="inputkind", native_enum=False, length=16),
            nullable=False,
            server_default="paths",
        ),
    )
    op.add_column("jobs", sa.Column("study_path", sa.String(length=1024), nullable=True))
    op.add_column("jobs", sa.Column("client", sa.String(length=128), nullable=True))

    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_jobs_before.c.id, _jobs_before.c.request, _jobs_before.c.models)
        .add_columns(_jobs_before.c.series)
        .order_by(_jobs_before.c.id)
    ).all()
    for job_id, request, models, series in rows:
        request = dict(request or {})
        own = request.pop(_OWN_STUDY_KEY, None)
        client = request.pop(_CLIENT_KEY, None)
        if own:
            kind, study = "upload", str(own)
        elif request.get("study_path"):
            kind, study = "paths", str(request["study_path"])
        else:
            kind, study = "archive", None
        conn.execute(
            _jobs_before.update()
            .where(_jobs_before.c.id == job_id)
            .values(
                input_kind=kind,
                study_path=study,
                client=str(client) if client else None,
                request=request,
            )
        )
        model_rows = [
            {"job_id": job_id, "position": i, "model_id": str(m)}
            for i, m in enumerate(models or [])
        ]
        if model_rows:
            conn.execute(_job_models.insert(), model_rows)
        series_rows = [
            {
                "job_id": job_id,
                "position": i,
                "series_instance_uid": str(s) if kind == "archive" else None,
                "folder": None if kind == "archive" else str(s),
            }
            for i, s in enumerate(series or [])
        ]
        if series_rows:
            conn.execute(_job_series.insert(), series_rows)

    if conn.dialect.name != "sqlite":  # SQLite cannot drop a default without copying the table
        op.alter_column("jobs", "input_kind", server_default=None)
    # A plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy of ``jobs`` would drop the
    # old table, and with foreign keys on, that cascades to its artifacts and dispatches.
    op.drop_column("jobs", "models")
    op.drop_column("jobs", "series")


def downgrade() -> None:
    op.add_column("jobs", sa.Column("models", sa.JSON(), nullable=False, server_default="[]"))
    op.add_column("jobs", sa.Column("series", sa.JSON(), nullable=False, server_default="[]"))
    conn = op.get_bind()
    models: dict[str, list[str]] = {}
    for job_id, _, model_id in conn.execute(
        sa.select(_job_models.c.job_id, _job_models.c.position, _job_models.c.model_id).order_by(
            _job_models.c.job_id, _job_models.c.position
        )
    ):
        models.setdefault(job_id, []).append(model_id)
    series: dict[str, list[str]] = {}
    for job_id, _, uid, folder in conn.execute(
        sa.select(
            _job_series.c.job_id,
            _job_series.c.position,
            _job_series.c.series_instance_uid,
            _job_series.c.folder,
        ).order_by(_job_series.c.job_id, _job_series.c.position)
    ):
        series.setdefault(job_id, []).append(uid if uid is not None else folder)
    rows = conn.execute(
        sa.select(
            _jobs_before.c.id,
            _jobs_before.c.request,
            _jobs_before.c.input_kind,
            _jobs_before.c.study_path,
            _jobs_before.c.client,
        )
    ).all()
    for job_id, request, kind, study, client in rows:
        values: dict[str, Any] = {
            "models": models.get(job_id, []),
            "series": series.get(job_id, []),
        }
        private: dict[str, Any] = {}
        if kind == "upload" and study:
            private[_OWN_STUDY_KEY] = study
        if client:
            private[_CLIENT_KEY] = client
        if private:
            values["request"] = {**(request or {}), **private}
        conn.execute(_jobs_before.update().where(_jobs_before.c.id == job_id).values(**values))
    op.drop_column("jobs", "client")
    op.drop_column("jobs", "study_path")
    op.drop_column("jobs", "input_kind")
    op.drop_index(op.f("ix_job_series_series_instance_uid"), table_name="job_series")
    op.drop_table("job_series")
    op.drop_index(op.f("ix_job_models_model_id"), table_name="job_models")
    op.drop_table("job_models")
