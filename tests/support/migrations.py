"""Migration checks shared by the SQLite and PostgreSQL tests."""

from __future__ import annotations

import json

from sqlalchemy import JSON, String, column, select, table, text

from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.jobs import JobFilters, JobStore
from nnunet_node.storage.migrations import current, downgrade, upgrade
from nnunet_node.storage.models import InputKind

HEAD = "0007"
"""The newest revision: tests that check the head name it here only."""


def _old_style_jobs(url: str) -> None:
    """Rows as revision 0001 stored them: kind inferred from the request's keys, a private
    ``_study_path`` key, ``models`` and ``series`` as JSON; one with an artifact and a dispatch."""
    engine = make_engine(url)
    created = "2026-11-01 10:00:00.000000"
    jobs = [
        ("a" * 32, {"nnunet_id": "phantom", "study_path": "/srv/s1"}, ["phantom"], ["ct"]),
        (
            "b" * 32,
            {"nnunet_id": "phantom", "_study_path": "/data/uploads/x/study", "_client": "10.0.0.7"},
            ["phantom"],
            ["ct"],
        ),
        (
            "c" * 32,
            {"nnunet_id": ["phantom", "phantom_cube"], "is_dicom": True},
            ["phantom", "phantom_cube"],
            ["1.2.3.4"],
        ),
    ]
    try:
        with engine.begin() as conn:
            for job_id, request, models, series in jobs:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, source, status, request, models, series, progress,"
                        " attempts, created_at) VALUES (:id, :source, 'done', :request, :models,"
                        " :series, '{}', 1, :created)"
                    ),
                    {
                        "id": job_id,
                        "source": "dimse" if job_id[0] == "c" else "http",
                        "request": json.dumps(request),
                        "models": json.dumps(models),
                        "series": json.dumps(series),
                        "created": created,
                    },
                )
            conn.execute(
                text(
                    "INSERT INTO job_artifacts (job_id, kind, stage, path) "
                    "VALUES (:id, 'dicom_segmentation', 0, '/x/prediction.dcm')"
                ),
                {"id": "c" * 32},
            )
            conn.execute(
                text(
                    "INSERT INTO dispatches (job_id, destination, status, attempts, updated_at) "
                    "VALUES (:id, 'PACS', 'sent', '[]', :created)"
                ),
                {"id": "c" * 32, "created": created},
            )
    finally:
        engine.dispose()


def check_old_style_jobs_upgrade(url: str) -> None:
    """On an empty database at ``url``: migrate to 0001, store old-style jobs, migrate to head and
    check every job reads as before; then migrate down to 0003 and check the JSON is back."""
    upgrade(url, "0001")
    _old_style_jobs(url)
    upgrade(url)
    assert current(url) == HEAD
    engine = make_engine(url)
    try:
        store = JobStore(make_sessionmaker(engine))
        paths, upload, archive = (store.get(c * 32) for c in "abc")
        assert paths.input_kind == InputKind.PATHS and paths.study_path == "/srv/s1"
        assert paths.series_folders == ("ct",) and paths.series_uids == ()
        assert paths.request == {"nnunet_id": "phantom", "study_path": "/srv/s1"}
        assert upload.input_kind == InputKind.UPLOAD
        assert upload.study_path == "/data/uploads/x/study"
        assert upload.request == {"nnunet_id": "phantom"}  # the private keys are gone
        assert upload.client == "10.0.0.7" and paths.client is None
        assert archive.input_kind == InputKind.ARCHIVE and archive.study_path is None
        assert archive.series_uids == ("1.2.3.4",) and archive.series_folders == ()
        assert archive.models == ("phantom", "phantom_cube")
        # the table copy SQLite needs elsewhere would have cascaded to these
        assert [a.kind for a in archive.artifacts] == ["dicom_segmentation"]
        assert [d.destination for d in archive.dispatches] == ["PACS"]
        items, total = store.list(JobFilters(model="phantom_cube"))
        assert total == 1 and items[0].id == "c" * 32
        assert store.list(JobFilters(model="phantom"))[1] == 3
        assert store.list(JobFilters(model="phan"))[1] == 0
    finally:
        engine.dispose()

    downgrade(url, "0004")  # the revision before this one
    engine = make_engine(url)
    try:
        old_jobs = table(
            "jobs",
            column("id", String),
            column("request", JSON),
            column("models", JSON),
            column("series", JSON),
        )
        with engine.connect() as conn:
            rows = {
                row[0]: (row[1], row[2], row[3])
                for row in conn.execute(
                    select(old_jobs.c.id, old_jobs.c.request, old_jobs.c.models, old_jobs.c.series)
                )
            }
    finally:
        engine.dispose()
    assert rows["b" * 32][0] == {
        "nnunet_id": "phantom",
        "_study_path": "/data/uploads/x/study",
        "_client": "10.0.0.7",
    }
    assert rows["c" * 32][1:] == (["phantom", "phantom_cube"], ["1.2.3.4"])
    assert rows["a" * 32][1:] == (["phantom"], ["ct"])
