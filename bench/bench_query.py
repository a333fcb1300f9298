"""Query latency at scale: C-FIND and QIDO-RS over an index of 1,000,000 instances, on SQLite and
on PostgreSQL, in the storage layer and (``--layers``) through QIDO-RS over HTTP and C-FIND.

    .venv/bin/python bench/bench_query.py [--instances 1000000] [--runs 20]
        [--database-url postgresql+psycopg://USER@/postgres?host=SOCKET_DIR&port=PORT]
        [--layers] [--no-sqlite]

The index is bulk-loaded (rows only, no files: this measures the queries, not ingest; SQLite by
``executemany``, PostgreSQL by ``COPY``), then its aggregates are counted once
(:func:`storage.indexer.recount`, what migration 0006 runs). For ``--instances N``: N/400
patients of 2 studies each, N/200 studies of 3 series (CT of 100 instances, CT/MR/PT of 99, a SEG
of 1), dates spread over 2019-2024; study 0 is a large one (series ``1.3.0.100`` of 100
instances, two CT series of 500). ``--database-url`` names a PostgreSQL server database from which
a scratch database is created (and dropped at the end); the same queries then run there too,
after ``ANALYZE`` (what autovacuum does after a bulk load). SQLite gets no ``ANALYZE`` (the node
never runs one).

Each query runs ``--runs`` times, each in a fresh read-only session; p50 and p95 are printed,
and each p50 as a ratio to the baseline measured in the same run: one study by its Study
Instance UID (a unique-key look-up). ``--layers`` also starts the whole node (``create_app``
under uvicorn, the DICOM port on loopback) on the same database and times the queries as
QIDO-RS requests (``requests``, one kept-alive connection) and as C-FIND requests (pynetdicom,
one association; only the queries whose answer is small, since C-FIND has no limit), after
freezing the start-up objects out of garbage collection as ``nnunet-node serve`` does.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from nnunet_node.storage import indexer  # noqa: E402
from nnunet_node.storage.db import make_engine, make_read_sessionmaker  # noqa: E402
from nnunet_node.storage.migrations import upgrade  # noqa: E402
from nnunet_node.storage.query import (  # noqa: E402
    find_instances,
    find_series,
    find_studies,
    instance_refs,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT = "1.2.840.10008.1.2.1"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
SECOND_MODALITY = ("CT", "MR", "PT")


# --- the index -------------------------------------------------------------------------------


@dataclass
class Shape:
    """How many of each entity an index of ``instances`` has (module docstring)."""

    instances: int
    patients: int = 0
    studies: int = 0

    def __post_init__(self) -> None:
        self.studies = max(2, self.instances // 200)
        self.patients = max(1, self.studies // 2)


def _patient_rows(shape: Shape) -> Iterator[tuple[Any, ...]]:
    for i in range(shape.patients):
        yield (i + 1, f"P{i:06d}", "", "", f"Name{i}^Test", "19700101", "O")


def _study_date(i: int) -> str:
    return (date(2019, 1, 1) + timedelta(days=i * 7919 % 2190)).strftime("%Y%m%d")


def _study_rows(shape: Shape) -> Iterator[tuple[Any, ...]]:
    for i in range(shape.studies):
        p = i % shape.patients
        yield (
            i + 1,
            f"1.2.{i}",
            p + 1,
            _study_date(i),
            "120000",
            f"A{i}",
            f"S{i}",
            "CT chest",
            "",
            f"Name{p}^Test",
            "19700101",
            "O",
            NOW,
            NOW,
        )


def _series_plan(shape: Shape) -> list[tuple[int, str, int, str, int, int]]:
    """(series pk, UID, study pk, modality, series number, instances), the instances summing to
    ``shape.instances``."""
    plan: list[tuple[int, str, int, str, int, int]] = []
    big = [("1.3.0.100", "CT", 100), ("1.3.0.501", "CT", 500), ("1.3.0.502", "CT", 500)]
    for n, (uid, modality, count) in enumerate(big):
        plan.append((len(plan) + 1, uid, 1, modality, n + 1, count))
    left = shape.instances - sum(row[-1] for row in plan)
    rest = shape.studies - 1
    per_study = max(3, left // max(1, rest))
    for i in range(1, shape.studies):
        count = per_study if i < shape.studies - 1 else max(3, left - per_study * (rest - 1))
        first = max(1, (count - 1) // 2)
        second = max(1, count - 1 - first)
        plan.append((len(plan) + 1, f"1.3.{i}.1", i + 1, "CT", 1, first))
        plan.append((len(plan) + 1, f"1.3.{i}.2", i + 1, SECOND_MODALITY[i % 3], 2, second))
        plan.append((len(plan) + 1, f"1.3.{i}.3", i + 1, "SEG", 3, 1))
    return plan


def _series_rows(plan: list[tuple[int, str, int, str, int, int]]) -> Iterator[tuple[Any, ...]]:
    for pk, uid, study_pk, modality, number, _ in plan:
        yield (pk, uid, study_pk, modality, number, "", "", "", "", "", "", "", NOW, NOW, NOW)


def _instance_rows(plan: list[tuple[int, str, int, str, int, int]]) -> Iterator[tuple[Any, ...]]:
    pk = 0
    for series_pk, series_uid, study_pk, modality, _, count in plan:
        sop_class = SEG if modality == "SEG" else CT
        for n in range(count):
            pk += 1
            sop = f"1.4.{pk}"
            yield (
                pk,
                sop,
                series_pk,
                sop_class,
                n + 1,
                EXPLICIT,
                512,
                512,
                None,
                f"1.2.{study_pk - 1}/{series_uid}/{sop}.dcm",
                526_000,
                NOW,
                "import",
                "",
                "",
            )


_COLUMNS = {
    "patients": (
        "id, patient_id, issuer_of_patient_id, study_scope, patient_name, patient_birth_date, "
        "patient_sex"
    ),
    "studies": (
        "id, study_instance_uid, patient_pk, study_date, study_time, accession_number, study_id, "
        "study_description, referring_physician_name, patient_name, patient_birth_date, "
        "patient_sex, created_at, updated_at"
    ),
    "series": (
        "id, series_instance_uid, study_pk, modality, series_number, series_description, "
        "body_part_examined, series_date, series_time, frame_of_reference_uid, calling_ae, "
        "called_ae, first_received_at, last_received_at, completion_handled_at"
    ),
    "instances": (
        "id, sop_instance_uid, series_pk, sop_class_uid, instance_number, transfer_syntax_uid, "
        "rows, columns, number_of_frames, path, size_bytes, received_at, source, calling_ae, "
        "called_ae"
    ),
}


def _tables(shape: Shape) -> list[tuple[str, Iterator[tuple[Any, ...]]]]:
    plan = _series_plan(shape)
    return [
        ("patients", _patient_rows(shape)),
        ("studies", _study_rows(shape)),
        ("series", _series_rows(plan)),
        ("instances", _instance_rows(plan)),
    ]


def _batches(rows: Iterator[tuple[Any, ...]], size: int = 50_000) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def fill(engine: Engine, shape: Shape) -> None:
    """Bulk-load the index (empty, migrated) and count its aggregates."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table, rows in _tables(shape):
            columns = _COLUMNS[table]
            if engine.dialect.name == "postgresql":
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:  # type: ignore[attr-defined]
                    for row in rows:
                        copy.write_row(row)
            else:
                marks = ", ".join("?" * len(columns.split(",")))
                for batch in _batches(rows):
                    cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", batch)
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as conn:
        indexer.recount(conn)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))


# --- the queries -----------------------------------------------------------------------------


@dataclass
class Query:
    label: str
    storage: Callable[[Session], list[Any]]
    qido: str | None = None
    """The QIDO-RS request (path and query string under /dicom-web)."""
    find: tuple[str, dict[str, str]] | None = None
    """The C-FIND level and identifier, when the answer is small (C-FIND has no limit)."""


def queries(shape: Shape) -> list[Query]:
    middle = shape.studies // 2
    page = (shape.studies // 2) // 100 * 100
    return [
        Query(
            "study by StudyInstanceUID (baseline)",
            lambda s: find_studies(s, {"StudyInstanceUID": f"1.2.{middle}"}),
            f"/studies?StudyInstanceUID=1.2.{middle}",
            ("STUDY", {"StudyInstanceUID": f"1.2.{middle}"}),
        ),
        Query(
            "studies by PatientID",
            lambda s: find_studies(s, {"PatientID": "P000042"}),
            "/studies?PatientID=P000042",
            ("STUDY", {"PatientID": "P000042"}),
        ),
        Query(
            "studies by AccessionNumber",
            lambda s: find_studies(s, {"AccessionNumber": f"A{middle}"}),
            f"/studies?AccessionNumber=A{middle}",
            ("STUDY", {"AccessionNumber": f"A{middle}"}),
        ),
        Query(
            "studies, first 100",
            lambda s: find_studies(s, {}, limit=100),
            "/studies?limit=100",
        ),
        Query(
            "studies, no limit (QIDO-RS caps at 1000)",
            lambda s: find_studies(s, {}, limit=1000),
            "/studies",
        ),
        Query(
            f"studies, 100 from offset {page}",
            lambda s: find_studies(s, {}, limit=100, offset=page),
            f"/studies?limit=100&offset={page}",
        ),
        Query(
            "studies by StudyDate range, limit 100",
            lambda s: find_studies(s, {"StudyDate": "20220301-20220331"}, limit=100),
            "/studies?StudyDate=20220301-20220331&limit=100",
        ),
        Query(
            "studies on one StudyDate",
            lambda s: find_studies(s, {"StudyDate": _study_date(middle)}),
            f"/studies?StudyDate={_study_date(middle)}",
            ("STUDY", {"StudyDate": _study_date(middle)}),
        ),
        Query(
            "studies by PatientName wildcard, limit 100",
            lambda s: find_studies(s, {"PatientName": "name42*"}, limit=100),
            "/studies?PatientName=name42*&limit=100",
        ),
        Query(
            "studies by ModalitiesInStudy, limit 100",
            lambda s: find_studies(s, {"ModalitiesInStudy": "PT"}, limit=100),
            "/studies?ModalitiesInStudy=PT&limit=100",
        ),
        Query(
            "series by Modality, limit 100",
            lambda s: find_series(s, {"Modality": "MR"}, limit=100),
            "/series?Modality=MR&limit=100",
        ),
        Query(
            "series within a study",
            lambda s: find_series(s, {"StudyInstanceUID": "1.2.0"}),
            "/studies/1.2.0/series",
            ("SERIES", {"StudyInstanceUID": "1.2.0"}),
        ),
        Query(
            "instances within a series of 100",
            lambda s: find_instances(
                s, {"StudyInstanceUID": "1.2.0", "SeriesInstanceUID": "1.3.0.100"}
            ),
            "/studies/1.2.0/series/1.3.0.100/instances",
            ("IMAGE", {"StudyInstanceUID": "1.2.0", "SeriesInstanceUID": "1.3.0.100"}),
        ),
        Query(
            "retrieve list of a study of 1100 (C-MOVE)",
            lambda s: instance_refs(s, "STUDY", "1.2.0"),
        ),
    ]


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Timings:
    rows: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def time(self, label: str, runs: int, call: Callable[[], int]) -> None:
        call()  # warm-up (statement caches, pages in memory)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.rows[label] = call()
            times.append(time.perf_counter() - start)
        self.samples[label] = times


def p50_p95(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p95 * 1e3


def report(title: str, timings: Timings) -> None:
    print(f"\n{title}")
    print(f"  {'query':<46} {'p50 ms':>8} {'p95 ms':>8} {'x base':>7} {'rows':>6}")
    baseline = None
    for label, samples in timings.samples.items():
        p50, p95 = p50_p95(samples)
        baseline = baseline or p50
        print(f"  {label:<46} {p50:8.1f} {p95:8.1f} {p50 / baseline:7.1f} {timings.rows[label]:6d}")


def bench_storage(engine: Engine, shape: Shape, runs: int) -> Timings:
    sessions = make_read_sessionmaker(engine)
    timings = Timings()
    for query in queries(shape):

        def call(query: Query = query) -> int:
            with sessions() as session:
                return len(query.storage(session))

        timings.time(query.label, runs, call)
    return timings


DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
"""dcmtk sets TCP_NODELAY only when asked (else Nagle holds each small write ~40 ms)."""


def _find_keys(level: str) -> list[str]:
    """The keys of the benchmark's C-FIND identifiers: a study list's columns, and the series'
    and instances' at those levels."""
    keys = ["QueryRetrieveLevel", "StudyInstanceUID", "PatientName", "PatientID", "StudyDate"]
    keys += ["AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]
    if level in ("SERIES", "IMAGE"):
        keys += ["SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
    if level == "IMAGE":
        keys += ["SOPInstanceUID", "InstanceNumber"]
    return keys


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_layers(url: str, shape: Shape, runs: int) -> tuple[Timings, Timings, Timings]:
    """QIDO-RS over HTTP and C-FIND over DIMSE, against the whole node on the same index."""
    import requests
    import uvicorn
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from nnunet_node.app import create_app
    from nnunet_node.core.settings import load_settings

    data_dir = Path(tempfile.mkdtemp(prefix="bench-query-node-"))
    dicom_port = _free_port()
    settings = load_settings(
        data_dir=data_dir,
        db_url=url,
        model_serve_spec=ROOT / "model-serve-spec.yaml",
        dicom_port=dicom_port,
        device="cpu",
        rate_limit_per_minute=0,
        min_free_disk_mb=0,
        series_quiet_s=3600,
    )
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}/dicom-web"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    qido, cfind, process = Timings(), Timings(), Timings()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the node did not start")
            time.sleep(0.05)
        # as `nnunet-node serve` does once started: what start-up made (torch, pydicom...) is
        # left out of later collections, or each full collection holds the GIL 100-300 ms
        gc.collect()
        gc.freeze()
        http = requests.Session()
        for query in queries(shape):
            if query.qido is None:
                continue

            def get(path: str = query.qido) -> int:
                response = http.get(base + path, headers={"Accept": "application/dicom+json"})
                response.raise_for_status()
                return len(response.json())

            qido.time(query.label, runs, get)
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", dicom_port, ae_title=settings.ae_title)
        if not assoc.is_established:
            raise RuntimeError("C-FIND association refused")
        # DIMSE sends a command and its data set as two small writes: without TCP_NODELAY the
        # second waits for the node's delayed ACK (~40 ms), as a findscu without it would.
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for query in queries(shape):
                if query.find is None:
                    continue
                level, keys = query.find
                keys = {"QueryRetrieveLevel": level, **keys}

                def find(level: str = level, keys: dict[str, str] = keys) -> int:
                    identifier = Dataset()
                    for keyword in _find_keys(level):
                        setattr(identifier, keyword, keys.get(keyword, ""))
                    answers = 0
                    for status, _ in assoc.send_c_find(
                        identifier, StudyRootQueryRetrieveInformationModelFind
                    ):
                        if status and status.Status in (0xFF00, 0xFF01):
                            answers += 1
                    return answers

                cfind.time(query.label, runs, find)
        finally:
            assoc.release()
        if shutil.which("findscu"):
            for query in queries(shape):
                if query.find is None:
                    continue
                level, keys = query.find
                keys = {"QueryRetrieveLevel": level, **keys}
                command = ["findscu", "-v", "-S", "-aet", "BENCH", "-aec", settings.ae_title]
                for keyword in _find_keys(level):
                    command += ["-k", f"{keyword}={keys.get(keyword, '')}"]
                command += ["127.0.0.1", str(dicom_port)]

                def findscu(command: list[str] = command) -> int:
                    result = subprocess.run(
                        command, capture_output=True, text=True, env=DCMTK_ENV, check=True
                    )
                    return (result.stdout + result.stderr).count("(Pending)")

                process.time(query.label, runs, findscu)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    return qido, cfind, process


def run_backend(name: str, url: str, shape: Shape, args: argparse.Namespace) -> None:
    upgrade(url)
    engine = make_engine(url, synchronous="OFF")
    start = time.perf_counter()
    fill(engine, shape)
    engine.dispose()
    print(f"\n{name}: filled {shape.instances} instances in {time.perf_counter() - start:.1f} s")
    engine = make_engine(url)
    try:
        report(f"{name}, storage.query", bench_storage(engine, shape, args.runs))
    finally:
        engine.dispose()
    if args.layers:
        qido, cfind, process = bench_layers(url, shape, args.runs)
        report(f"{name}, QIDO-RS over HTTP", qido)
        report(f"{name}, C-FIND, pynetdicom in this process, one association", cfind)
        if process.samples:
            report(f"{name}, C-FIND, one findscu process per query", process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL server database to make a scratch database from (also run there)",
    )
    parser.add_argument("--layers", action="store_true", help="also QIDO-RS over HTTP, C-FIND")
    parser.add_argument("--no-sqlite", action="store_true", help="run on PostgreSQL only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shape = Shape(args.instances)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"index: {shape.patients} patients, {shape.studies} studies, "
        f"{len(_series_plan(shape))} series, {shape.instances} instances"
    )
    if not args.no_sqlite:
        folder = Path(tempfile.mkdtemp(prefix="bench-query-"))
        try:
            run_backend("SQLite", f"sqlite:///{folder / 'index.db'}", shape, args)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.database_url:
        name = f"bench_query_{uuid.uuid4().hex[:12]}"
        admin = create_engine(args.database_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(args.database_url).set(database=name).render_as_string(False)
        try:
            run_backend("PostgreSQL", url, shape, args)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
