"""Migrations are the only way the schema is made: up, down, up again, and equal to the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from nnunet_node.storage.db import make_engine
from nnunet_node.storage.migrations import current, downgrade, upgrade
from nnunet_node.storage.models import Base
from tests.support.migrations import HEAD, check_old_style_jobs_upgrade

ROOT = Path(__file__).resolve().parents[2]
TABLES = {
    "patients",
    "studies",
    "series",
    "instances",
    "jobs",
    "job_models",
    "job_series",
    "job_artifacts",
    "dispatches",
    "workers",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_on_a_fresh_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert current(url) is None
    upgrade(url)
    assert current(url) == HEAD
    assert _tables(url) == TABLES
    downgrade(url, "base")
    assert current(url) is None
    assert _tables(url) == set()
    upgrade(url, "head")
    assert _tables(url) == TABLES
    upgrade(url)  # idempotent at head


def test_migrated_schema_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'diff.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_cli_db_upgrade(tmp_path: Path) -> None:
    env = {**os.environ, "NNUNET_NODE_DATA": str(tmp_path / "data")}
    env.pop("NNUNET_NODE_DB_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "nnunet_node.cli", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    db_file = tmp_path / "data" / "nnunet-node.db"
    assert db_file.is_file()
    assert current(f"sqlite:///{db_file}") == HEAD


def test_0002_splits_studies_without_patient_id_and_prunes_empty_entities(tmp_path: Path) -> None:
    """A database made before 0002: two studies filed under one empty Patient ID, a series and a
    study with no instances. After the upgrade each study has a patient of its own and keeps the
    name the index held; the empty series and study are gone; studies of an identified patient
    are untouched. Down again, the old unique key holds."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    engine = make_engine(url)
    now = "2026-01-01 00:00:00"
    with engine.begin() as conn:
        for pk, pid, name in ((1, "", "Nobody^Shared"), (2, "P1", "Doe^Jane")):
            conn.execute(
                text(
                    "INSERT INTO patients (id, patient_id, issuer_of_patient_id, patient_name, "
                    "patient_birth_date, patient_sex) VALUES (:pk, :pid, '', :name, '', '')"
                ),
                {"pk": pk, "pid": pid, "name": name},
            )
        for pk, uid, patient in ((1, "1.1", 1), (2, "1.2", 1), (3, "1.3", 2), (4, "1.4", 2)):
            conn.execute(
                text(
                    "INSERT INTO studies (id, study_instance_uid, patient_pk, study_date, "
                    "study_time, accession_number, study_id, study_description, "
                    "referring_physician_name, created_at, updated_at) "
                    "VALUES (:pk, :uid, :p, '', '', '', '', '', '', :now, :now)"
                ),
                {"pk": pk, "uid": uid, "p": patient, "now": now},
            )
        # studies 1-3 hold one instance each; study 4 holds a series with no instance
        for pk in (1, 2, 3, 4):
            conn.execute(
                text(
                    "INSERT INTO series (id, series_instance_uid, study_pk, modality, "
                    "series_description, body_part_examined, series_date, series_time, "
                    "frame_of_reference_uid, calling_ae, called_ae, first_received_at, "
                    "last_received_at) VALUES (:pk, :uid, :pk, 'CT', '', '', '', '', '', '', '', "
                    ":now, :now)"
                ),
                {"pk": pk, "uid": f"2.{pk}", "now": now},
            )
        for pk in (1, 2, 3):
            conn.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, series_pk, sop_class_uid, "
                    "transfer_syntax_uid, path, size_bytes, received_at, source, calling_ae, "
                    "called_ae) VALUES (:pk, :uid, :pk, '', '', 'x', 1, :now, '', '', '')"
                ),
                {"pk": pk, "uid": f"3.{pk}", "now": now},
            )
    engine.dispose()

    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        studies = conn.execute(
            text(
                "SELECT s.study_instance_uid, p.patient_id, p.study_scope, s.patient_name, p.id "
                "FROM studies s JOIN patients p ON p.id = s.patient_pk ORDER BY s.id"
            )
        ).all()
        series = conn.execute(text("SELECT series_instance_uid FROM series ORDER BY id")).all()
        patients = conn.execute(text("SELECT COUNT(*) FROM patients")).scalar()
    engine.dispose()
    assert [s[:4] for s in studies] == [
        ("1.1", "", "1.1", "Nobody^Shared"),
        ("1.2", "", "1.2", "Nobody^Shared"),
        ("1.3", "P1", "", "Doe^Jane"),
    ]
    assert studies[0][4] != studies[1][4]  # a patient record each
    assert [s[0] for s in series] == ["2.1", "2.2", "2.3"]  # the empty series 2.4 is gone
    assert patients == 3  # the old shared record had no study left

    downgrade(url, "0001")
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT patient_id, COUNT(*) FROM patients GROUP BY patient_id")
        ).all()
        kept = conn.execute(text("SELECT COUNT(*) FROM studies")).scalar()
    engine.dispose()
    assert sorted(rows) == [("", 1), ("P1", 1)]
    assert kept == 3


def test_upgrade_carries_old_style_jobs_over(tmp_path: Path) -> None:
    check_old_style_jobs_upgrade(f"sqlite:///{tmp_path / 'old.db'}")
