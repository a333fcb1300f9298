"""CPU per received instance on the node's C-STORE ingest path, this tree against a baseline tree.

Usage::

    .venv/bin/python bench/bench_ingest_cpu.py [--count 2000] [--threads 1,4] [--rounds 3]
        [--size 256] [--baseline /path/to/a/checkout/of/main]

``--count`` CT instances (``--size`` x ``--size`` int16 pixels, the header of a real CT slice,
4 series of one study) are encoded as Part 10 bytes first (not timed). Each run then files them
into a fresh archive with a freshly migrated SQLite index (``synchronous=FULL``, fsync on), through
the calls the C-STORE handler makes for a streamed dataset (node/handlers.py,
pipeline/pynetdicom_internals.py): :meth:`Archive.open_incoming` with the Part 10 head, the
dataset written in fragments of the node's maximum PDU with ``read_ahead`` between them,
``complete`` after the last, then :meth:`Archive.ingest_incoming`, from 1 and from 4 threads (as
1 and 4 associations; each thread files a quarter of the instances).

Each run is a process of its own that imports ``nnunet_node`` from the tree it measures (this one,
and with ``--baseline`` the other one: ``git worktree add /tmp/base main``, or ``git archive``),
so both run the same bytes under the same load; the runs alternate, ``--rounds`` times. It prints
the process's CPU time per instance (``os.times``: every thread, user and kernel, the fsyncs'
waiting excluded; user time apart, where Python's work shows) and the wall rate, the medians per
tree, and the ratios baseline / this tree (above 1: this tree spends less).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAGMENT = 131072 - 6  # the node's maximum PDU (node/ae.py) less the PDV item's header


def make_corpus(path: Path, count: int, size: int) -> None:
    """Write ``count`` Part 10 CT instances, concatenated, with a JSON index of their offsets."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, frame = generate_uid(), generate_uid()
    series_uids = [generate_uid() for _ in range(4)]
    pixels = np.random.default_rng(0).integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
    offsets = []
    with open(path, "wb") as out:
        for i in range(count):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240101"
            ds.StudyTime = ds.SeriesTime = "120000"
            ds.AccessionNumber, ds.Modality = "ACC1", "CT"
            ds.Manufacturer, ds.ReferringPhysicianName = "Bench", "Ref^Doc"
            ds.StudyDescription, ds.SeriesDescription = "CT chest", f"bench {i % 4}"
            ds.PatientName, ds.PatientID = "Bench^CT", "BENCH"
            ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
            ds.BodyPartExamined, ds.SliceThickness, ds.KVP = "CHEST", 1.0, 120
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uids[i % 4]
            ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", i % 4 + 1, i // 4 + 1
            ds.ImagePositionPatient = [0.0, 0.0, float(i // 4)]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.FrameOfReferenceUID = frame
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows = ds.Columns = size
            ds.PixelSpacing = [0.7, 0.7]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.WindowCenter, ds.WindowWidth = 40, 400
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = pixels
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
            offsets.append((out.tell(), len(data)))
            out.write(data)
    path.with_suffix(".json").write_text(json.dumps(offsets))


def child(tree: Path, corpus: Path, threads: int) -> None:
    """One run (in its own process): file the corpus into a fresh archive from ``threads``
    threads with the modules of ``tree``; print a JSON line of the figures."""
    sys.path.insert(0, str(tree))
    from nnunet_node.storage.archive import Archive
    from nnunet_node.storage.db import make_engine, make_sessionmaker
    from nnunet_node.storage.migrations import upgrade

    blob = corpus.read_bytes()
    items = [blob[o : o + n] for o, n in json.loads(corpus.with_suffix(".json").read_text())]
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-cpu-", dir=corpus.parent))
    try:
        url = f"sqlite:///{work / 'index.db'}"
        upgrade(url)
        engine = make_engine(url)
        archive = Archive(work / "archive", make_sessionmaker(engine))

        def file_one(data: bytes) -> None:
            # The Part 10 head (preamble, File Meta) as node/handlers.py makes it, then the
            # dataset as the PDUs bring it.
            meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
            incoming = archive.open_incoming(data[:meta_end])
            view = memoryview(data)[meta_end:]
            while view:
                incoming.write(view[:FRAGMENT])
                view = view[FRAGMENT:]
                if view:
                    incoming.read_ahead()
            incoming.complete()
            archive.ingest_incoming(incoming, source="dimse", calling_ae="STORESCU", called_ae="N")

        chunks = [items[i::threads] for i in range(threads)]
        errors: list[BaseException] = []

        def work_chunk(chunk: list[bytes]) -> None:
            try:
                for data in chunk:
                    file_one(data)
            except BaseException as exc:  # reported below
                errors.append(exc)

        times0, wall0 = os.times(), time.perf_counter()
        if threads == 1:  # in this thread (a profiler of the main thread sees it)
            work_chunk(chunks[0])
        else:
            pool = [threading.Thread(target=work_chunk, args=(c,)) for c in chunks]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        times, wall = os.times(), time.perf_counter() - wall0
        user, system = times.user - times0.user, times.system - times0.system
        if errors:
            raise errors[0]
        archive.close()
        from sqlalchemy import text

        with engine.connect() as conn:
            counted = conn.execute(text("SELECT sum(number_of_instances) FROM series")).scalar()
            rows = conn.execute(text("SELECT count(*) FROM instances")).scalar()
        if counted != len(items) or rows != len(items):
            raise SystemExit(f"index holds {rows} rows, counts say {counted}, sent {len(items)}")
        per = 1000 / len(items)
        figures = {
            "cpu_ms": (user + system) * per,
            "user_ms": user * per,
            "rate": len(items) / wall,
        }
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each slice")
    parser.add_argument("--threads", default="1,4", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare against")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--child", nargs=3, metavar=("TREE", "CORPUS", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return 0
    trees = {"this": ROOT}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), **trees}
    args.dir.mkdir(parents=True, exist_ok=True)
    corpus = args.dir / f"ingest-cpu-{os.getpid()}.bin"
    make_corpus(corpus, args.count, args.size)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for n in range(args.rounds):
            for threads in [int(t) for t in args.threads.split(",")]:
                for name, tree in trees.items():
                    os.sync()
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", str(tree), str(corpus), str(threads)],
                        check=True,
                        capture_output=True,
                        text=True,
                        env=env,
                    ).stdout
                    figures = json.loads(out.strip().splitlines()[-1])
                    results.setdefault((name, threads), []).append(figures)
                    print(
                        f"round {n + 1} {name:8s} threads={threads}: "
                        f"{figures['cpu_ms']:.3f} ms CPU/instance ({figures['user_ms']:.3f} user), "
                        f"{figures['rate']:.0f} inst/s",
                        flush=True,
                    )
    finally:
        corpus.unlink(missing_ok=True)
        corpus.with_suffix(".json").unlink(missing_ok=True)
    print(f"\n{args.count} instances of {args.size}x{args.size}, medians of {args.rounds}:")
    for threads in [int(t) for t in args.threads.split(",")]:

        def median(key: str, name: str, threads: int = threads) -> float:
            return statistics.median(r[key] for r in results[(name, threads)])

        cpu = {name: median("cpu_ms", name) for name in trees}
        user = {name: median("user_ms", name) for name in trees}
        line = ", ".join(
            f"{name} {cpu[name]:.3f} ms ({user[name]:.3f} user, {median('rate', name):.0f}/s)"
            for name in trees
        )
        ratio = (
            f"; baseline/this: CPU {cpu['baseline'] / cpu['this']:.2f}"
            f", user {user['baseline'] / user['this']:.2f}"
            if args.baseline
            else ""
        )
        print(f"  threads={threads}: {line}{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
