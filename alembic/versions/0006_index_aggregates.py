"""Query aggregates kept with the index, and a series' instances indexed in Instance Number order.

Each series keeps its number of instances, each study its number of series and of instances and
its modalities (``modalities_in_study``: distinct, sorted, backslash-separated), so that C-FIND
and QIDO-RS read them (PS3.4 C.3.4 NumberOfStudyRelatedInstances, ModalitiesInStudy...) instead
of counting instance rows per answer. Ingest keeps them in the transaction of each instance row
(storage/indexer.py); this migration counts them for the rows already there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 04:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_series = sa.table(
    "series",
    sa.column("id", sa.Integer()),
    sa.column("study_pk", sa.Integer()),
    sa.column("modality", sa.String()),
    sa.column("number_of_instances", sa.Integer()),
)
_studies = sa.table(
    "studies",
    sa.column("id", sa.Integer()),
    sa.column("number_of_series", sa.Integer()),
    sa.column("number_of_instances", sa.Integer()),
    sa.column("modalities_in_study", sa.Text()),
)
_instances = sa.table("instances", sa.column("series_pk", sa.Integer()))


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(
            sa.Column("number_of_instances", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("studies") as batch:
        batch.add_column(
            sa.Column("number_of_series", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("number_of_instances", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("modalities_in_study", sa.Text(), nullable=False, server_default="")
        )
    _backfill()
    # Replaces the index on series_pk alone: the same look-ups, and each series' instances
    # come in Instance Number order without a sort.
    op.create_index(
        "ix_instances_series_pk_instance_number", "instances", ["series_pk", "instance_number"]
    )
    op.drop_index("ix_instances_series_pk", table_name="instances")


def _backfill() -> None:
    """Count the aggregates of the rows already indexed (one statement per table, plus one
    UPDATE per study that has a modality)."""
    conn = op.get_bind()
    per_series = (
        sa.select(sa.func.count())
        .select_from(_instances)
        .where(_instances.c.series_pk == _series.c.id)
        .scalar_subquery()
    )
    conn.execute(sa.update(_series).values(number_of_instances=per_series))
    series_of_study = (
        sa.select(sa.func.count())
        .select_from(_series)
        .where(_series.c.study_pk == _studies.c.id)
        .scalar_subquery()
    )
    instances_of_study = (
        sa.select(sa.func.coalesce(sa.func.sum(_series.c.number_of_instances), 0))
        .where(_series.c.study_pk == _studies.c.id)
        .scalar_subquery()
    )
    conn.execute(
        sa.update(_studies).values(
            number_of_series=series_of_study, number_of_instances=instances_of_study
        )
    )
    modalities: dict[int, set[str]] = {}
    rows = conn.execute(
        sa.select(_series.c.study_pk, _series.c.modality)
        .where(_series.c.modality != "")
        .distinct()
    )
    for study_pk, modality in rows:
        modalities.setdefault(study_pk, set()).add(modality)
    if modalities:
        conn.execute(
            sa.update(_studies)
            .where(_studies.c.id == sa.bindparam("_pk"))
            .values(modalities_in_study=sa.bindparam("_m")),
            [{"_pk": pk, "_m": "\\".join(sorted(ms))} for pk, ms in modalities.items()],
        )


def downgrade() -> None:
    op.create_index("ix_instances_series_pk", "instances", ["series_pk"])
    op.drop_index("ix_instances_series_pk_instance_number", table_name="instances")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("modalities_in_study")
        batch.drop_column("number_of_instances")
        batch.drop_column("number_of_series")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("number_of_instances")
