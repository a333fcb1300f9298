"""Query latency of storage.query at 100k instances (C-FIND / QIDO-RS back end, no HTTP).

The index is filled with bulk INSERTs (rows only, no files: this measures the queries, not
ingest): 500 patients, 1000 studies, 1001 series, 100,000 instances, one series of exactly 100.
Each query runs 30 times in a read-only session; p50 and p95 are printed.

    .venv/bin/python bench/bench_query.py [--instances 100000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from nnunet_node.storage.db import make_engine, make_read_sessionmaker  # noqa: E402
from nnunet_node.storage.migrations import upgrade  # noqa: E402
from nnunet_node.storage.models import Instance, Patient, Series, Study  # noqa: E402
from nnunet_node.storage.query import find_instances, find_series, find_studies, instance_refs  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
BLANK = {"body_part_examined": "", "series_date": "", "series_time": ""}


def fill(url: str, instances: int) -> None:
    engine = make_engine(url, synchronous="OFF")
    studies = 1000
    with engine.begin() as c:
        c.execute(
            insert(Patient),
            [
                {"id": i + 1, "patient_id": f"P{i:05d}", "patient_name": f"Name{i}^Test"}
                for i in range(500)
            ],
        )
        c.execute(
            insert(Study),
            [
                {
                    "id": i + 1,
                    "study_instance_uid": f"1.2.{i}",
                    "patient_pk": i % 500 + 1,
                    "study_date": f"2024{i % 12 + 1:02d}{i % 28 + 1:02d}",
                    "study_time": "120000",
                    "accession_number": f"A{i}",
                    "study_description": "CT head",
                }
                for i in range(studies)
            ],
        )
        series = [
            {
                "id": i + 1,
                "series_instance_uid": f"1.3.{i}",
                "study_pk": i + 1,
                "modality": ["CT", "SEG", "MR"][i % 3],
                "series_number": 1,
                **BLANK,
            }
            for i in range(studies)
        ]
        series.append(
            {
                "id": studies + 1,
                "series_instance_uid": "1.3.hundred",
                "study_pk": 1,
                "modality": "CT",
                "series_number": 2,
                **BLANK,
            }
        )
        c.execute(insert(Series), series)
        c.execute(
            insert(Instance),
            [
                {
                    "sop_instance_uid": f"1.4.{i}",
                    "series_pk": studies + 1 if i < 100 else i % studies + 1,
                    "sop_class_uid": CT,
                    "instance_number": i,
                    "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "path": f"x/{i}.dcm",
                    "size_bytes": 1000,
                }
                for i in range(instances)
            ],
        )
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    folder = Path(tempfile.mkdtemp(prefix="query-"))
    try:
        url = f"sqlite:///{folder / 'index.db'}"
        upgrade(url)
        start = time.perf_counter()
        fill(url, args.instances)
        print(f"filled {args.instances} instances in {time.perf_counter() - start:.1f} s")
        engine = make_engine(url)
        sessions = make_read_sessionmaker(engine)

        def bench(label: str, fn: Callable[[Session], list[Any]]) -> None:
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                with sessions() as s:
                    rows = fn(s)
                times.append(time.perf_counter() - t)
            times.sort()
            p50, p95 = times[len(times) // 2], times[int(len(times) * 0.95)]
            print(f"{label:<44} p50 {p50 * 1e3:6.1f} ms  p95 {p95 * 1e3:6.1f} ms  {len(rows)} rows")

        bench("studies by PatientID", lambda s: find_studies(s, {"PatientID": "P00042"}))
        bench("studies, first 100", lambda s: find_studies(s, {}, limit=100))
        bench(
            "studies by StudyDate range, limit 100",
            lambda s: find_studies(s, {"StudyDate": "20240301-20240331"}, limit=100),
        )
        bench(
            "studies by PatientName wildcard, limit 100",
            lambda s: find_studies(s, {"PatientName": "name4*"}, limit=100),
        )
        bench(
            "studies by ModalitiesInStudy, limit 100",
            lambda s: find_studies(s, {"ModalitiesInStudy": "SEG"}, limit=100),
        )
        bench("series within a study", lambda s: find_series(s, {"StudyInstanceUID": "1.2.0"}))
        bench(
            "instances within a series of 100",
            lambda s: find_instances(
                s, {"StudyInstanceUID": "1.2.0", "SeriesInstanceUID": "1.3.hundred"}
            ),
        )
        bench("retrieve list of a study (C-MOVE)", lambda s: instance_refs(s, "STUDY", "1.2.0"))
        engine.dispose()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
