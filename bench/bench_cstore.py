"""C-STORE throughput: dcmtk's storescu sending CT slices to the node, beside a bare SCP.

Usage: ``.venv/bin/python bench/bench_cstore.py [--count 1000] [--rounds 2]``

Each round sends ``--count`` CT instances of 512x512 (int16, ~0.5 MB each) with dcmtk's
``storescu`` (found by its real location, never pynetdicom's script of the same name; the
summary names the path; ``TCP_NODELAY=1``) over one association to

(a) a bare pynetdicom storage SCP that only writes the received bytes
    (``event.encoded_dataset()`` to a file), with the node's maximum PDU, and
(b) the node's AE (:class:`node.ae.DicomNode`) with the full, durable ingest: the dataset
    streams into a temporary file as it arrives, its header is read, the file is fsynced while
    the index rows commit in SQLite (``synchronous=FULL``), then it is renamed into place
    (node/transport.py, storage/incoming.py); the node with pynetdicom's plain associations
    (polling, the dataset gathered in memory, then :meth:`Archive.ingest`) is measured too;

then the same with 4 associations at once (4 storescu processes, a quarter of the files each).
It prints instances per second and the ratio node / bare for each. Targets (issue 6): ratio at
least 0.9 and at least 180 instances/s on the 2-core machines. Every run starts with
``os.sync()``, so that no run pays for the writeback of the one before (the bare SCP leaves its
0.5 GB in the page cache).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nnunet_node.core.settings import Settings  # noqa: E402
from nnunet_node.node.ae import MAX_PDU, DicomNode  # noqa: E402
from nnunet_node.pipeline.dispatch import set_tcp_nodelay  # noqa: E402
from nnunet_node.pipeline.routing import RoutingTable  # noqa: E402
from nnunet_node.storage.archive import Archive  # noqa: E402
from nnunet_node.storage.db import make_engine, make_sessionmaker  # noqa: E402
from nnunet_node.storage.migrations import upgrade  # noqa: E402
from tests.peer_tools import find_tool, missing_reason  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def write_series(folder: Path, count: int, *, series: int = 4) -> list[Path]:
    """``count`` CT slices of 512x512 in ``series`` series of one study (one file per slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, frame = generate_uid(), generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    pixels = np.random.default_rng(0).integers(-1000, 1000, (512, 512), dtype=np.int16).tobytes()
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uids[i % series]
        ds.FrameOfReferenceUID = frame
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^CT", "CT"
        ds.StudyDate, ds.SeriesDescription = "20240101", "bench"
        ds.SeriesNumber, ds.InstanceNumber = i % series + 1, i // series + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i // series)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = pixels
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@contextmanager
def bare_scp(out: Path, *, fsync: bool = False) -> Iterator[int]:
    """A pynetdicom storage SCP that writes the received bytes and nothing else; with ``fsync``
    it also flushes each file to disk before answering (what the node must do to acknowledge)."""
    out.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        with open(out / event.request.AffectedSOPInstanceUID, "wb") as handle:
            handle.write(event.encoded_dataset())
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = MAX_PDU
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), (evt.EVT_C_STORE, on_store)],
    )
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


@contextmanager
def node_scp(data: Path, *, event_driven: bool = True, fsync: bool = True) -> Iterator[int]:
    """The node's AE with its real archive (migrated SQLite, fsynced files)."""
    settings = Settings(data_dir=data, dicom_port=0, min_free_disk_mb=0)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    archive = Archive(settings.archive_dir, make_sessionmaker(engine), fsync=fsync)
    node = DicomNode(
        settings,
        archive,
        RoutingTable.from_spec({}),
        host="127.0.0.1",
        port=0,
        event_driven=event_driven,
    )
    node.start()
    try:
        yield node.port
    finally:
        node.stop()
        engine.dispose()


def storescu() -> str:
    """dcmtk's storescu, by its real location: the first ``storescu`` on ``PATH`` may be
    pynetdicom's Python script (in ``.venv/bin``), which takes other options and is far slower.

    :raises SystemExit: dcmtk is not installed.
    """
    path = find_tool("storescu")
    if path is None:
        raise SystemExit(missing_reason("storescu"))
    return path


def send(port: int, folders: list[Path], called: str) -> float:
    """dcmtk's storescu per folder, all at once; returns the wall time of the slowest."""
    program = storescu()
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [program, "+sd", "-aec", called, "127.0.0.1", str(port), str(folder)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {err[-500:]}")
    return time.perf_counter() - started


def measure(
    make: Callable[[Path], object], work: Path, folders: list[Path], count: int, called: str
) -> float:
    target = work / "target"
    shutil.rmtree(target, ignore_errors=True)
    # What an earlier run left dirty in the page cache would be written back during this one
    # and slow its fsyncs: start each run with everything on disk.
    os.sync()
    with make(target) as port:  # type: ignore[attr-defined]
        seconds = send(port, folders, called)
    stored = sum(1 for p in target.rglob("*") if p.is_file() and p.suffix != ".db")
    shutil.rmtree(target, ignore_errors=True)
    if stored < count:
        raise RuntimeError(f"only {stored} of {count} instances arrived")
    return count / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"storescu: {storescu()} (dcmtk)", flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-cstore-"))
    try:
        print(f"writing {args.count} CT instances of 512x512 ...", flush=True)
        one = work / "one"
        write_series(one, args.count)
        quarters = [work / f"q{i}" for i in range(4)]
        for i, path in enumerate(sorted(one.iterdir())):
            quarters[i % 4].mkdir(exist_ok=True)
            os.link(path, quarters[i % 4] / path.name)

        names = ("bare1", "barefsync1", "node1", "polling1", "nofsync1", "bare4", "node4")
        results: dict[str, list[float]] = {k: [] for k in names}
        polling = functools.partial(node_scp, event_driven=False)
        nofsync = functools.partial(node_scp, fsync=False)
        bare_fsync = functools.partial(bare_scp, fsync=True)
        for round_ in range(args.rounds):
            results["bare1"].append(measure(bare_scp, work, [one], args.count, "BARE"))
            results["barefsync1"].append(measure(bare_fsync, work, [one], args.count, "BARE"))
            results["node1"].append(measure(node_scp, work, [one], args.count, "NNUNET_NODE"))
            results["polling1"].append(measure(polling, work, [one], args.count, "NNUNET_NODE"))
            results["nofsync1"].append(measure(nofsync, work, [one], args.count, "NNUNET_NODE"))
            results["bare4"].append(measure(bare_scp, work, quarters, args.count, "BARE"))
            results["node4"].append(measure(node_scp, work, quarters, args.count, "NNUNET_NODE"))
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in results.items()),
                flush=True,
            )
        med = {k: statistics.median(v) for k, v in results.items()}
        print()
        print(
            f"C-STORE, {args.count} CT 512x512 instances, {storescu()} TCP_NODELAY=1, "
            f"max PDU {MAX_PDU} (median of {args.rounds} rounds)"
        )
        for n, label in (("1", "1 association "), ("4", "4 associations")):
            bare, node = med[f"bare{n}"], med[f"node{n}"]
            print(
                f"  {label}: bare pynetdicom SCP {bare:7.1f} inst/s | "
                f"node (full ingest) {node:7.1f} inst/s | ratio {node / bare:.2f}"
            )
        print(
            f"  node with pynetdicom's plain associations (1 association):   "
            f"{med['polling1']:7.1f} inst/s | ratio {med['polling1'] / med['bare1']:.2f}"
        )
        print(
            f"  node, archive without fsync (1 association):                 "
            f"{med['nofsync1']:7.1f} inst/s | ratio {med['nofsync1'] / med['bare1']:.2f}"
        )
        print(
            f"  bare SCP that fsyncs each file before answering (1 association): "
            f"{med['barefsync1']:7.1f} inst/s | node / it {med['node1'] / med['barefsync1']:.2f}"
        )
        print("  targets: ratio >= 0.9 and node >= 180 inst/s (one association)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
