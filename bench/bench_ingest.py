"""Ingest rate: Archive.ingest against a plain careful writer of the same bytes, in the same run.

1000 CT instances of 512x512 int16 are encoded as Part 10 bytes in memory first (not timed).
Then, each into a fresh folder on the same disk:

  plain   temp file + fsync + rename into <study>/<series>/<sop>.dcm, no index
  ingest  Archive.ingest into a freshly migrated SQLite index (header parse, temp + fsync,
          one transaction with its WAL fsync, rename)

and prints instances per second for each and their ratio. ``--threads N`` adds a run with N
threads ingesting at once (as N DIMSE associations would); ``--variants`` shows what the
durability choices cost (SQLite synchronous=NORMAL instead of FULL; fsync of the folder; no
fsync at all, safe against a crash of the process only).

    .venv/bin/python bench/bench_ingest.py [--count 1000] [--size 512] [--threads 4] [--variants]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nnunet_node.storage.archive import Archive, read_header  # noqa: E402
from nnunet_node.storage.db import make_engine, make_sessionmaker  # noqa: E402
from nnunet_node.storage.headers import read_header_pydicom  # noqa: E402
from nnunet_node.storage.migrations import upgrade  # noqa: E402


def make_instances(count: int, size: int) -> list[tuple[str, str, str, bytes]]:
    """(study, series, sop, Part 10 bytes) for ``count`` CT slices of one series."""
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = rng.integers(-1000, 1500, size=(size, size), dtype=np.int16)
    out = []
    for n in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.PatientID, ds.PatientName = "BENCH", "Bench^Ingest"
        ds.StudyDate, ds.StudyTime, ds.Modality = "20240101", "120000", "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, n + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(n)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.roll(pixels, n, axis=0).tobytes()
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        out.append((study, series, ds.SOPInstanceUID, buffer.getvalue()))
    return out


def plain_write(root: Path, study: str, series: str, sop: str, data: bytes) -> None:
    folder = root / study / series
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{sop}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / f"{sop}.dcm")


def timed(label: str, items: list[tuple[str, str, str, bytes]], fn: Callable[..., None]) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    for item in items:
        fn(*item)
    elapsed = time.perf_counter() - start
    cpu_ms = (time.process_time() - cpu) / len(items) * 1000
    rate = len(items) / elapsed
    print(f"{label:<34} {rate:8.1f} instances/s  ({elapsed:.2f} s, CPU {cpu_ms:.2f} ms/instance)")
    return rate


def fresh_archive(
    base: Path,
    name: str,
    synchronous: str = "FULL",
    fsync_folders: bool = False,
    fsync: bool = True,
) -> tuple[Archive, object]:
    url = f"sqlite:///{base / name}.db"
    upgrade(url)
    engine = make_engine(url, synchronous=synchronous)
    archive = Archive(
        base / name, make_sessionmaker(engine), fsync=fsync, fsync_folders=fsync_folders
    )
    return archive, engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=4, help="0 skips the threaded run")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also ingest with synchronous=NORMAL and with fsync_folders=True",
    )
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="ingest-", dir=args.dir))
    try:
        print(f"encoding {args.count} CT instances of {args.size}x{args.size} int16 ...")
        items = make_instances(args.count, args.size)
        print(f"{len(items[0][3]) / 1024:.0f} KiB each; writing under {base}")

        scan = timed("header: direct scan (no disk)", items, lambda *i: read_header(i[3]))
        pydicom_rate = timed(
            "header: pydicom Dataset (no disk)",
            items,
            lambda *i: read_header_pydicom(i[3]),
        )
        print(f"ratio scan/pydicom: {scan / pydicom_rate:.2f}")
        plain = timed(
            "plain write (temp+fsync+rename)", items, lambda *i: plain_write(base / "plain", *i)
        )

        archive, engine = fresh_archive(base, "archive")
        rate = timed(
            "Archive.ingest (files + index)",
            items,
            lambda *i: archive.ingest(i[3], source="bench", calling_ae="BENCH"),
        )
        engine.dispose()  # type: ignore[attr-defined]
        print(f"ratio ingest/plain: {rate / plain:.2f}")

        if args.variants:
            for label, sync, fsync, folders in (
                ("  with synchronous=NORMAL", "NORMAL", True, False),
                ("  with fsync_folders=True", "FULL", True, True),
                ("  no fsync, synchronous=NORMAL", "NORMAL", False, False),
            ):
                name = f"v-{sync}-{fsync}-{folders}"
                archive, engine = fresh_archive(base, name, sync, folders, fsync)
                variant = timed(label, items, lambda *i, a=archive: a.ingest(i[3], source="bench"))
                engine.dispose()  # type: ignore[attr-defined]
                print(f"{'':34} ratio to plain: {variant / plain:.2f}")

        if args.threads > 0:
            archive, engine = fresh_archive(base, "threaded")
            chunks = [items[t :: args.threads] for t in range(args.threads)]

            def work(chunk: list[tuple[str, str, str, bytes]]) -> None:
                for item in chunk:
                    archive.ingest(item[3], source="bench")

            start = time.perf_counter()
            threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            threaded = len(items) / elapsed
            print(
                f"{'Archive.ingest, ' + str(args.threads) + ' threads':<34} {threaded:8.1f} "
                f"instances/s  ({elapsed:.2f} s); ratio to plain: {threaded / plain:.2f}"
            )
            engine.dispose()  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
