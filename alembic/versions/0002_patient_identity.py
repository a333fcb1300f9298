"""Patient identity: each study keeps its own patient attributes; a study without a Patient ID
gets a patient record of its own; series and studies with no instances are removed.

- ``studies`` gains ``patient_name``, ``patient_birth_date``, ``patient_sex``, filled from the
  patient row the study was filed under (what the index held; the files keep what was sent);
- ``patients`` gains ``study_scope`` and is unique on (Patient ID, Issuer, scope): every study
  filed under an empty Patient ID is given a patient record of its own, scoped to the study;
- series without instances, studies without series and patients without studies are deleted.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 01:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STUDY_PATIENT_COLUMNS = (
    ("patient_name", 324),
    ("patient_birth_date", 8),
    ("patient_sex", 16),
)


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        for name, length in _STUDY_PATIENT_COLUMNS:
            batch.add_column(
                sa.Column(name, sa.String(length=length), nullable=False, server_default="")
            )
        batch.create_index(op.f("ix_studies_patient_name"), ["patient_name"])
    for name, _ in _STUDY_PATIENT_COLUMNS:
        op.execute(
            f"UPDATE studies SET {name} = "
            f"(SELECT patients.{name} FROM patients WHERE patients.id = studies.patient_pk)"
        )

    with op.batch_alter_table("patients") as batch:
        batch.add_column(
            sa.Column("study_scope", sa.String(length=64), nullable=False, server_default="")
        )
        batch.drop_constraint("uq_patients_patient_id", type_="unique")
        batch.create_unique_constraint(
            "uq_patients_patient_id", ["patient_id", "issuer_of_patient_id", "study_scope"]
        )

    conn = op.get_bind()
    # Every study filed under an empty Patient ID gets a patient record of its own.
    rows = conn.execute(
        sa.text(
            "SELECT studies.id, studies.study_instance_uid, studies.patient_name, "
            "studies.patient_birth_date, studies.patient_sex, patients.issuer_of_patient_id "
            "FROM studies JOIN patients ON patients.id = studies.patient_pk "
            "WHERE patients.patient_id = '' ORDER BY studies.id"
        )
    ).all()
    for study_pk, uid, name, birth, sex, issuer in rows:
        conn.execute(
            sa.text(
                "INSERT INTO patients (patient_id, issuer_of_patient_id, study_scope, "
                "patient_name, patient_birth_date, patient_sex) "
                "VALUES ('', :issuer, :uid, :name, :birth, :sex)"
            ),
            {"issuer": issuer, "uid": uid, "name": name, "birth": birth, "sex": sex},
        )
        patient_pk = conn.execute(
            sa.text("SELECT id FROM patients WHERE patient_id = '' AND study_scope = :uid"),
            {"uid": uid},
        ).scalar_one()
        conn.execute(
            sa.text("UPDATE studies SET patient_pk = :p WHERE id = :s"),
            {"p": patient_pk, "s": study_pk},
        )
    _prune(conn)


def _prune(conn: sa.Connection) -> None:
    conn.execute(
        sa.text(
            "DELETE FROM series WHERE NOT EXISTS "
            "(SELECT 1 FROM instances WHERE instances.series_pk = series.id)"
        )
    )
    conn.execute(
        sa.text(
            "DELETE FROM studies WHERE NOT EXISTS "
            "(SELECT 1 FROM series WHERE series.study_pk = studies.id)"
        )
    )
    conn.execute(
        sa.text(
            "DELETE FROM patients WHERE NOT EXISTS "
            "(SELECT 1 FROM studies WHERE studies.patient_pk = patients.id)"
        )
    )


def downgrade() -> None:
    conn = op.get_bind()
    # Studies scoped to a patient record of their own go back to one record per Patient ID.
    keepers = conn.execute(
        sa.text(
            "SELECT patient_id, issuer_of_patient_id, MIN(id) FROM patients "
            "GROUP BY patient_id, issuer_of_patient_id HAVING COUNT(*) > 1"
        )
    ).all()
    for pid, issuer, keep in keepers:
        conn.execute(
            sa.text(
                "UPDATE studies SET patient_pk = :keep WHERE patient_pk IN (SELECT id FROM "
                "patients WHERE patient_id = :pid AND issuer_of_patient_id = :issuer)"
            ),
            {"keep": keep, "pid": pid, "issuer": issuer},
        )
        conn.execute(
            sa.text(
                "DELETE FROM patients WHERE patient_id = :pid "
                "AND issuer_of_patient_id = :issuer AND id != :keep"
            ),
            {"keep": keep, "pid": pid, "issuer": issuer},
        )
    with op.batch_alter_table("patients") as batch:
        batch.drop_constraint("uq_patients_patient_id", type_="unique")
        batch.create_unique_constraint(
            "uq_patients_patient_id", ["patient_id", "issuer_of_patient_id"]
        )
        batch.drop_column("study_scope")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index(op.f("ix_studies_patient_name"))
        for name, _ in _STUDY_PATIENT_COLUMNS:
            batch.drop_column(name)
