"""Shared by the storage tests: the check that the aggregates the index keeps (storage/indexer.py)
equal what its rows count, and an index as migration 0005 left it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from nnunet_node.storage.models import Instance, Series, Study


def counted_aggregates(session: Session) -> dict[str, dict[str, Any]]:
    """Per study UID and per series UID, what the rows say, counted here (not by the code under
    test): ``{"studies": {uid: (series, instances, modalities)}, "series": {uid: instances}}``."""
    per_series: dict[str, int] = {
        uid: n
        for uid, n in session.execute(
            select(Series.series_instance_uid, func.count(Instance.id))
            .outerjoin(Instance, Instance.series_pk == Series.id)
            .group_by(Series.series_instance_uid)
        )
    }
    series_count: dict[str, int] = defaultdict(int)
    instance_count: dict[str, int] = defaultdict(int)
    modalities: dict[str, set[str]] = defaultdict(set)
    for uid, series_uid, modality in session.execute(
        select(Study.study_instance_uid, Series.series_instance_uid, Series.modality).outerjoin(
            Series, Series.study_pk == Study.id
        )
    ):
        series_count[uid] += 0
        if series_uid is not None:
            series_count[uid] += 1
            instance_count[uid] += per_series[series_uid]
            if modality:
                modalities[uid].add(modality)
    studies = {
        uid: (n, instance_count[uid], "\\".join(sorted(modalities[uid])))
        for uid, n in series_count.items()
    }
    return {"studies": dict(studies), "series": dict(per_series)}


def kept_aggregates(session: Session) -> dict[str, dict[str, Any]]:
    """The same, as the index's aggregate columns hold them."""
    studies = session.execute(
        select(
            Study.study_instance_uid,
            Study.number_of_series,
            Study.number_of_instances,
            Study.modalities_in_study,
        )
    )
    series = session.execute(select(Series.series_instance_uid, Series.number_of_instances))
    return {
        "studies": {uid: (n_series, n_inst, mods) for uid, n_series, n_inst, mods in studies},
        "series": {uid: n for uid, n in series},
    }


def assert_aggregates_counted(session: Session) -> None:
    """The kept aggregates equal the counted ones, for every study and series."""
    assert kept_aggregates(session) == counted_aggregates(session)


def fill_0005(engine: Engine) -> None:
    """Three studies as a 0005 index holds them: CT series of 2 + SEG of 1; MR of 1; a series
    without a modality, of 1 instance."""
    now = "2026-01-01 00:00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO patients (id, patient_id, issuer_of_patient_id, study_scope, "
                "patient_name, patient_birth_date, patient_sex) "
                "VALUES (1, 'P1', '', '', '', '', '')"
            )
        )
        for pk in (1, 2, 3):
            conn.execute(
                text(
                    "INSERT INTO studies (id, study_instance_uid, patient_pk, study_date, "
                    "study_time, accession_number, study_id, study_description, "
                    "referring_physician_name, patient_name, patient_birth_date, patient_sex, "
                    "created_at, updated_at) "
                    "VALUES (:pk, :uid, 1, '', '', '', '', '', '', '', '', '', :now, :now)"
                ),
                {"pk": pk, "uid": f"1.{pk}", "now": now},
            )
        for pk, study, modality in ((1, 1, "CT"), (2, 1, "SEG"), (3, 2, "MR"), (4, 3, "")):
            conn.execute(
                text(
                    "INSERT INTO series (id, series_instance_uid, study_pk, modality, "
                    "series_description, body_part_examined, series_date, series_time, "
                    "frame_of_reference_uid, calling_ae, called_ae, first_received_at, "
                    "last_received_at) VALUES (:pk, :uid, :study, :modality, '', '', '', '', "
                    "'', '', '', :now, :now)"
                ),
                {"pk": pk, "uid": f"2.{pk}", "study": study, "modality": modality, "now": now},
            )
        for pk, series in ((1, 1), (2, 1), (3, 2), (4, 3), (5, 4)):
            conn.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, series_pk, sop_class_uid, "
                    "transfer_syntax_uid, path, size_bytes, received_at, source, calling_ae, "
                    "called_ae) VALUES (:pk, :uid, :series, '', '', 'x', 1, :now, '', '', '')"
                ),
                {"pk": pk, "uid": f"3.{pk}", "series": series, "now": now},
            )
