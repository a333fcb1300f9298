"""Series: how the last instance arrived, and when the series' content last changed.

``last_source`` (``dimse``, ``stow``...) is the path of the arrival that completes a series, so
that a routed job is labelled by the arrival that made it (a series first sent by C-STORE and
re-sent by STOW-RS is a ``stow`` job the second time). ``content_changed_at`` is the last
arrival that changed the series (a new instance, or other bytes than the copy held): a re-sent
byte-identical copy does not move it, so series completion can tell that an arrival changed
nothing and leave the job that already covers the series standing. Existing rows: an empty
``last_source`` (completion then uses the first instance's source, as before) and
``content_changed_at`` from ``last_received_at``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 07:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_series = sa.table(
    "series",
    sa.column("last_received_at", sa.DateTime(timezone=True)),
    sa.column("content_changed_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(
            sa.Column("last_source", sa.String(length=16), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("content_changed_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.execute(_series.update().values(content_changed_at=_series.c.last_received_at))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("content_changed_at")
        batch.drop_column("last_source")
