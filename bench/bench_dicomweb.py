"""DICOMweb benchmark: STOW-RS instances per second, QIDO-RS latency over 100,000 instances.

    .venv/bin/python bench/bench_dicomweb.py [--studies 1000] [--per-series 100]
        [--stow-studies 5] [--queries 100] [--data-dir DIR]

The node runs as in production (``create_app`` under uvicorn, on a loopback port) and is driven
over HTTP with ``requests``. Steps:

1. STOW-RS: ``--stow-studies`` studies of ``--per-series`` small CT instances (8x8 pixels), 100
   instances per request, through the real ingest. The baseline is ``Archive.ingest`` called in
   process on the same kind of instances (measured in the same run), so the ratio is what HTTP and
   multipart cost on top of ingest.
2. The rest of the index (up to ``--studies`` studies, one series of ``--per-series`` instances
   each) is bulk-inserted: each series' header is read by ``storage.archive.read_header`` from a
   real encoded instance (the rows ingest would write), then the rows go in with executemany
   and their counts are made with ``storage.indexer.recount``; no files are written for them,
   as QIDO-RS reads only the index. Ingesting 100,000 instances one by one would take far
   longer than this benchmark may run (ingest fsyncs every file).
3. QIDO-RS, ``--queries`` requests each, p50 and p95: studies by PatientID, series of a study,
   instances of a series of ``--per-series``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import uvicorn
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, select

from nnunet_node.app import create_app
from nnunet_node.core.settings import load_settings
from nnunet_node.storage.archive import Archive, read_header
from nnunet_node.storage.indexer import recount
from nnunet_node.storage.models import Instance, Patient, Series, Study, utcnow

REPO = Path(__file__).resolve().parents[1]
BATCH = 100


def encode_instance(study: str, series: str, number: int, patient: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient
    ds.PatientName = f"Bench^{patient}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = patient[-8:]
    ds.StudyDescription = "Bench study"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Bench CT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.full(64, number, np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def study_parts(index: int, per_series: int) -> tuple[str, str, str, list[bytes]]:
    study, series, patient = generate_uid(), generate_uid(), f"BENCH{index:06d}"
    return (
        study,
        series,
        patient,
        [encode_instance(study, series, n + 1, patient) for n in range(per_series)],
    )


def multipart(parts: list[bytes], boundary: str = "bench-boundary") -> bytes:
    out = bytearray()
    for part in parts:
        out += f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += part
    out += f"\r\n--{boundary}--\r\n".encode()
    return bytes(out)


class Server:
    def __init__(self, data_dir: Path) -> None:
        settings = load_settings(
            data_dir=data_dir,
            model_serve_spec=REPO / "model-serve-spec.yaml",
            dicom_enabled=False,
            device="cpu",
            rate_limit_per_minute=0,
            min_free_disk_mb=0,
            series_quiet_s=3600,
        )
        self.app = create_app(settings)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/dicom-web"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", lifespan="on", ws="none")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def bulk_insert(context: Any, studies: list[tuple[str, str, str, bytes]], per_series: int) -> None:
    """Index rows exactly as ingest would write them, from each series' real header."""
    now = utcnow()
    with context.session_factory() as session, session.begin():
        for study_uid, series_uid, _patient_id, sample in studies:
            header = read_header(sample)
            patient_pk = session.scalar(
                insert(Patient).returning(Patient.id), [dict(header.patient)]
            )
            study_pk = session.scalar(
                insert(Study).returning(Study.id),
                [
                    {
                        "study_instance_uid": study_uid,
                        "patient_pk": patient_pk,
                        **header.study,
                        "created_at": now,
                        "updated_at": now,
                    }
                ],
            )
            series_pk = session.scalar(
                insert(Series).returning(Series.id),
                [
                    {
                        "series_instance_uid": series_uid,
                        "study_pk": study_pk,
                        **header.series,
                        "first_received_at": now,
                        "last_received_at": now,
                        "completion_handled_at": now,
                    }
                ],
            )
            rows = []
            for n in range(per_series):
                sop = generate_uid()
                rows.append(
                    {
                        "sop_instance_uid": sop,
                        "series_pk": series_pk,
                        "sop_class_uid": header.sop_class_uid,
                        "transfer_syntax_uid": header.transfer_syntax_uid,
                        **header.instance,
                        "instance_number": n + 1,
                        "path": f"{study_uid}/{series_uid}/{sop}.dcm",
                        "size_bytes": len(sample),
                        "received_at": now,
                        "source": "import",
                    }
                )
            session.execute(insert(Instance), rows)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return p50 * 1000, p95 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--per-series", type=int, default=100)
    parser.add_argument("--stow-studies", type=int, default=5)
    parser.add_argument("--baseline", type=int, default=200, help="instances ingested in process")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    random.seed(7)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    print(f"data folder: {data_dir}")

    with Server(data_dir) as server:
        context = server.app.state.context
        http = requests.Session()

        # 1. baseline: ingest in process (a separate archive folder, same database)
        baseline_archive = Archive(data_dir / "baseline", context.session_factory)
        _, _, _, parts = study_parts(999_999, args.baseline)
        t0 = time.perf_counter()
        for part in parts:
            baseline_archive.ingest(part, source="bench")
        ingest_rate = len(parts) / (time.perf_counter() - t0)

        # 1. STOW-RS
        stow_parts = [study_parts(i, args.per_series) for i in range(args.stow_studies)]
        stored = 0
        t0 = time.perf_counter()
        for _, _, _, parts in stow_parts:
            for start in range(0, len(parts), BATCH):
                body = multipart(parts[start : start + BATCH])
                response = http.post(
                    f"{server.url}/studies",
                    data=body,
                    headers={
                        "Content-Type": 'multipart/related; type="application/dicom"; '
                        "boundary=bench-boundary"
                    },
                )
                response.raise_for_status()
                stored += len(response.json()["00081199"]["Value"])
        stow_rate = stored / (time.perf_counter() - t0)

        # 2. the rest of the index
        t0 = time.perf_counter()
        rest = []
        for i in range(args.stow_studies, args.studies):
            study, series, patient = generate_uid(), generate_uid(), f"BENCH{i:06d}"
            rest.append((study, series, patient, encode_instance(study, series, 1, patient)))
        for start in range(0, len(rest), 50):
            bulk_insert(context, rest[start : start + 50], args.per_series)
        with context.session_factory() as session, session.begin():
            recount(session.connection())  # the counts ingest keeps, for the bulk-loaded rows
        with context.session_factory() as session:
            total = len(session.scalars(select(Instance.id)).all())
        bulk_s = time.perf_counter() - t0

        # 3. QIDO-RS
        everything = [(s, x, p) for s, x, p, _ in stow_parts] + [(s, x, p) for s, x, p, _ in rest]
        queries = {
            "studies by PatientID": lambda s, x, p: (f"{server.url}/studies", {"PatientID": p}),
            "series of a study": lambda s, x, p: (f"{server.url}/studies/{s}/series", {}),
            f"instances of a series of {args.per_series}": lambda s, x, p: (
                f"{server.url}/studies/{s}/series/{x}/instances",
                {},
            ),
        }
        results = {}
        for name, make in queries.items():
            for s, x, p in everything[:5]:  # warm up
                url, params = make(s, x, p)
                http.get(url, params=params).raise_for_status()
            samples = []
            counts = set()
            for _ in range(args.queries):
                url, params = make(*random.choice(everything))
                t = time.perf_counter()
                response = http.get(url, params=params)
                body = response.json()
                samples.append(time.perf_counter() - t)
                response.raise_for_status()
                counts.add(len(body))
            results[name] = (*percentiles(samples), sorted(counts))

    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    total -= args.baseline  # the baseline's instances share the database
    print(f"index: {total} instances in {args.studies} studies ({args.stow_studies} by STOW-RS,")
    print(f"       the rest bulk-inserted from real headers in {bulk_s:.1f} s)")
    print(f"STOW-RS: {stow_rate:.1f} instances/s ({stored} instances, {BATCH} per request)")
    print(f"Archive.ingest in process (baseline): {ingest_rate:.1f} instances/s")
    print(f"ratio STOW-RS / in-process ingest: {stow_rate / ingest_rate:.2f}")
    for name, (p50, p95, counts) in results.items():
        print(f"QIDO-RS {name}: p50 {p50:.1f} ms, p95 {p95:.1f} ms (results per answer {counts})")


if __name__ == "__main__":
    main()
