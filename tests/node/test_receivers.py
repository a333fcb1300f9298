"""The node with several receiving processes on its DICOM port (``NNUNET_NODE_DICOM_PROCESSES``,
node/receivers.py): the node's process and a receiver process accept associations on one port.

Real parts: the DIMSE service as ``nnunet-node dicom`` builds it, dcmtk's storescu, findscu and
getscu, pynetdicom as a requester, SQLite. The node's process hands each connection to the
process serving the fewest associations; which process serves one is read from ``/proc`` (the
process holding the connection's socket), or from the receiver's own folder in ``.incoming``
(each receiver keeps spare files there once it has received)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.core.settings import Settings
from nnunet_node.node.receivers import receiver_folder
from nnunet_node.node.service import DimseService
from nnunet_node.pipeline.context import NodeContext, build_context
from nnunet_node.storage.models import Instance, Job, Series
from tests.node.peers import free_port
from tests.peer_tools import tool
from tests.support.dcmtk import DCMTK_ENV, dcmtk, get_series
from tests.support.node_process import end_process
from tests.tls_certs import make_pki

REPO = Path(__file__).resolve().parents[2]


class Node:
    """Context and DIMSE service with two receiving processes; job workers not started (routed
    jobs stay queued, to be counted)."""

    def __init__(self, tmp: Path) -> None:
        spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
        spec["model_folder"] = str(REPO / "models")
        spec["models"] = [m for m in spec["models"] if m["id"] == "phantom"]
        spec["routes"] = [
            {
                "name": "routed-ct",
                "match": {"Modality": "CT", "SeriesDescription": "Routed.*"},
                "nnunet_id": "phantom",
                "quiet_seconds": 1,
            }
        ]
        (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
        self.pki = make_pki(tmp / "pki")
        settings = Settings(
            dicom_tls_port=0,
            tls_cert=self.pki.server.cert,
            tls_key=self.pki.server.key,
            tls_ca=self.pki.ca,
            data_dir=tmp / "data",
            model_serve_spec=tmp / "spec.yaml",
            dicom_host="127.0.0.1",
            dicom_port=0,
            dicom_processes=2,
            device="cpu",
            min_free_disk_mb=0,
            series_quiet_s=30,
        )
        self.context: NodeContext = build_context(settings)
        self.service = DimseService(self.context)
        self.service.start_sync()
        assert self.service.receivers is not None
        self.receivers = self.service.receivers

    @property
    def port(self) -> int:
        assert self.service.port is not None
        return self.service.port

    @property
    def tls_port(self) -> int:
        assert self.service.node is not None and self.service.node.tls_port is not None
        return self.service.node.tls_port

    @property
    def receiver_folder(self) -> Path:
        return self.context.archive.incoming / receiver_folder(1)

    def receiver_took_part(self) -> bool:
        folder = self.receiver_folder
        return folder.is_dir() and any(folder.iterdir())

    def instances(self) -> list[Instance]:
        with self.context.session_factory() as session:
            return list(session.scalars(select(Instance)))

    def stop(self) -> None:
        self.service.stop_sync()
        self.context.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    made = Node(tmp_path_factory.mktemp("receivers"))
    try:
        yield made
    finally:
        made.stop()


def series(folder: Path, seed: int, *, slices: int = 8, description: str = "Phantom CT") -> Path:
    phantom = make_phantom(seed, shape=(slices, 32, 32), spacing=(1.0, 1.0, 4.0))
    write_dicom_series(phantom, folder, series_description=description)
    return folder


def storescu_at_once(port: int, groups: list[list[Path]], *extra: str) -> list[Any]:
    """One storescu process per group of files, all at once (``-v``: one line per response)."""
    processes = [
        subprocess.Popen(
            [tool("storescu"), "-v", *extra, "-aec", "NNUNET_NODE", "127.0.0.1", str(port)]
            + [str(p) for p in group],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for group in groups
    ]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    return [(p.returncode, out) for p, out in zip(processes, outputs, strict=True)]


def until(what: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stores_counted() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "nnunet_node_dimse_requests_total", {"service": "C-STORE", "outcome": "success"}
    )
    return value or 0.0


def test_several_associations_at_once_are_all_stored_indexed_and_counted(
    node: Node, tmp_path: Path
) -> None:
    sent: list[Path] = []
    counted_before = stores_counted()
    for attempt in range(6):
        folders = [series(tmp_path / f"a{attempt}s{i}", seed=10 * attempt + i) for i in range(4)]
        groups = [sorted(f.iterdir()) for f in folders]
        results = storescu_at_once(node.port, groups)
        assert [rc for rc, _ in results] == [0, 0, 0, 0], results
        sent += [p for group in groups for p in group]
        if node.receiver_took_part():
            break
    assert node.receiver_took_part(), "the kernel gave the receiver process no association"
    indexed = {i.sop_instance_uid: i for i in node.instances()}
    for path in sent:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert sop in indexed, f"{path.name} acknowledged but not indexed"
        stored = node.context.archive.path_for(indexed[sop])
        assert stored.read_bytes()[-256:] == path.read_bytes()[-256:]
    # Every C-STORE reaches the node's metrics, the receiver's too (sent every 0.25 s).
    until(lambda: stores_counted() - counted_before >= len(sent))
    assert stores_counted() - counted_before == len(sent)


def test_a_series_sent_over_both_processes_is_routed_once(node: Node, tmp_path: Path) -> None:
    # One slice per association, eight at once: both processes file parts of the series
    # (all eight on one process: a chance of 1 in 128).
    files = sorted(series(tmp_path / "routed", seed=100, description="Routed CT").iterdir())
    results = storescu_at_once(node.port, [[f] for f in files])
    assert [rc for rc, _ in results] == [0] * len(files), results
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID

    def jobs() -> list[Job]:
        with node.context.session_factory() as session:
            return [
                j
                for j in session.scalars(select(Job))
                if series_uid in [s.series_instance_uid for s in j.series]
            ]

    made = until(jobs, timeout=30)
    time.sleep(2.5)  # more passes of the completion watcher (quiet period 1 s)
    assert [j.route_name for j in jobs()] == ["routed-ct"] == [j.route_name for j in made]
    with node.context.session_factory() as session:
        count = session.scalar(
            select(func.count(Instance.id))
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
        )
    assert count == len(files)


def test_find_and_get_are_served_by_every_process(node: Node, tmp_path: Path) -> None:
    folder = series(tmp_path / "qr", seed=200, slices=8)
    files = sorted(folder.iterdir())
    assert storescu_at_once(node.port, [files])[0][0] == 0
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    # Eight associations of each: the kernel spreads them over both processes.
    for _ in range(8):
        found = dcmtk(
            "findscu", "-v", "-S", "-aec", "NNUNET_NODE",
            "-k", "QueryRetrieveLevel=IMAGE",
            "-k", f"StudyInstanceUID={first.StudyInstanceUID}",
            "-k", f"SeriesInstanceUID={first.SeriesInstanceUID}",
            "-k", "SOPInstanceUID",
            "127.0.0.1", str(node.port),
        )  # fmt: skip
        assert found.returncode == 0, found.stdout
        assert len(re.findall(r"Find Response: \d+ \(Pending\)", found.stdout)) == len(files)
    keys = {
        "QueryRetrieveLevel": "SERIES",
        "StudyInstanceUID": first.StudyInstanceUID,
        "SeriesInstanceUID": first.SeriesInstanceUID,
    }
    for attempt in range(4):
        got = get_series(node.port, tmp_path / f"get{attempt}", keys, "-S")
        assert got.returncode == 0, got.output
        assert len(got.files) == len(files)


def test_tls_associations_are_served_by_every_process(node: Node, tmp_path: Path) -> None:
    """Eight TLS associations at once, one slice each (all on one process: 1 in 128), all
    stored; a client certificate from another CA is refused on every process."""
    files = sorted(series(tmp_path / "tls", seed=250).iterdir())
    tls = ["+tls", str(node.pki.client.key), str(node.pki.client.cert), "+cf", str(node.pki.ca)]
    processes = [
        subprocess.Popen(
            [
                tool("storescu"),
                *tls,
                "-aec",
                "NNUNET_NODE",
                "localhost",
                str(node.tls_port),
                str(f),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for f in files
    ]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0] * len(files), outputs
    indexed = {i.sop_instance_uid for i in node.instances()}
    assert {_sop_uid(f) for f in files} <= indexed
    rogue = ["+tls", str(node.pki.rogue_client.key), str(node.pki.rogue_client.cert)]
    for _ in range(6):
        refused = dcmtk(
            "echoscu", *rogue, "+cf", str(node.pki.ca), "-aec", "NNUNET_NODE",
            "localhost", str(node.tls_port),
        )  # fmt: skip
        assert refused.returncode != 0, refused.stdout


def _receiver_has_connection(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds an established TCP connection on local ``port``."""
    return _connections_held(pid, port) > 0


def _connections_held(pid: int, port: int) -> int:
    """How many established TCP connections on local ``port`` process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            held += 1
    return held


def test_associations_at_once_are_shared_evenly_between_the_processes(node: Node) -> None:
    """Four associations open at once on two processes: two each, every time (the kernel's
    choice by address hash, with SO_REUSEPORT, gave three and one or four and none in half the
    runs). Once released, each process has counted them ended."""
    until(lambda: node.receivers.loads() == [0, 0])
    (receiver_pid,) = node.receivers.pids()
    ae = AE(ae_title="BALANCE")
    ae.add_requested_context(Verification)
    for round_ in range(3):
        held = [ae.associate("127.0.0.1", node.port, ae_title="NNUNET_NODE") for _ in range(4)]
        try:
            assert all(assoc.is_established for assoc in held)
            assert [assoc.send_c_echo().Status for assoc in held] == [0, 0, 0, 0]
            assert node.receivers.loads() == [2, 2], round_
            mine = _connections_held(os.getpid(), node.port)
            theirs = _connections_held(receiver_pid, node.port)
            assert (mine, theirs) == (2, 2), round_
        finally:
            for assoc in held:
                assoc.release()
        until(lambda: node.receivers.loads() == [0, 0])


def test_a_receiver_killed_mid_way_loses_nothing_acknowledged(node: Node, tmp_path: Path) -> None:
    folder = series(tmp_path / "big", seed=300, slices=24)
    files = sorted(folder.iterdir())
    (pid,) = node.receivers.pids()
    processes: list[subprocess.Popen[str]] = []
    logs: list[Path] = []
    try:
        # 2400 small files per association: the receiver's is still sending when it is killed.
        # Output goes to files: a pipe nobody reads fills up (-v writes ~300 bytes per file)
        # and storescu, blocked writing it, would never see its association break.
        for i in range(12):  # until one association is the receiver's
            logs.append(tmp_path / f"storescu-{i}.log")
            with logs[-1].open("w") as log:
                processes.append(
                    subprocess.Popen(
                        [
                            *(tool("storescu"), "-v", "-aec", "NNUNET_NODE"),
                            *("127.0.0.1", str(node.port), *map(str, files * 100)),
                        ],
                        env=DCMTK_ENV,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            time.sleep(0.3)
            if _receiver_has_connection(pid, node.port):
                break
        assert _receiver_has_connection(pid, node.port), "no association reached the receiver"
        time.sleep(0.3)  # mid-way through its instances
        os.kill(pid, signal.SIGKILL)
        # The association the receiver held breaks: its storescu ends on its own, failing.
        until(lambda: any(p.poll() not in (None, 0) for p in processes), timeout=30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=60)
        outputs = [(p.returncode, log.read_text()) for p, log in zip(processes, logs, strict=True)]
    # A new receiver takes the dead one's place, after finishing its interrupted writes.
    until(lambda: node.receivers.pids() and node.receivers.pids() != [pid], timeout=60)
    until(lambda: not [p for p in node.receiver_folder.iterdir() if p.stat().st_size], 30)
    # Every acknowledged instance is indexed and on disk, and every row has its file.
    sops = {str(path): _sop_uid(path) for path in files}
    acknowledged: set[str] = set()
    for _, out in outputs:
        sending = None
        for line in out.splitlines():
            if line.startswith("I: Sending file: "):
                sending = line.removeprefix("I: Sending file: ").strip()
            elif "Received Store Response (Success)" in line and sending is not None:
                acknowledged.add(sops[sending])
    assert acknowledged
    rows = {i.sop_instance_uid: i for i in node.instances() if i.sop_instance_uid in sops.values()}
    assert acknowledged <= set(rows)
    for row in rows.values():
        stored = node.context.archive.path_for(row)
        assert stored.is_file() and stored.stat().st_size == row.size_bytes
    assert not [p for p in node.context.archive.incoming.rglob("*.tmp") if p.stat().st_size]
    # The new receiver serves: several associations at once all succeed.
    again = storescu_at_once(node.port, [files[i::4] for i in range(4)])
    assert [rc for rc, _ in again] == [0, 0, 0, 0], again


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_the_spec_is_logged_once_by_the_node_not_again_by_each_receiver(tmp_path: Path) -> None:
    """``nnunet-node dicom`` with three processes: the routing table and the model-serve spec's
    summary appear once in the log, the node's process's (each receiver logged both again);
    the receivers started (the node says so once they said they were ready), and the node
    answers a C-ECHO."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NNUNET_NODE_DATA": str(tmp_path / "data"),
        "MODEL_SERVE_SPEC": str(REPO / "model-serve-spec.yaml"),
        "NNUNET_NODE_DICOM_HOST": "127.0.0.1",
        "NNUNET_NODE_DICOM_PORT": str(port),
        "NNUNET_NODE_DICOM_PROCESSES": "3",
        "NNUNET_NODE_DEVICE": "cpu",
    }
    log = tmp_path / "node.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "nnunet_node.cli", "dicom"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        until(
            lambda: "nnunet-node dicom: ready" in log.read_text() or process.poll() is not None,
            timeout=120,
        )
        assert process.poll() is None, log.read_text()
        ae = AE(ae_title="LOGCHECK")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="NNUNET_NODE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        end_process(process)
    lines = log.read_text().splitlines()
    assert len([ln for ln in lines if "nnunet_node.pipeline.routing: routing: " in ln]) == 1, lines
    assert len([ln for ln in lines if "nnunet_node.pipeline.spec: spec " in ln]) == 1, lines
    assert any("2 DICOM receiver process(es) serving associations" in ln for ln in lines), lines
    assert not [ln for ln in lines if "Traceback" in ln or " ERROR " in ln], lines


def test_requests_refused_in_either_process_are_counted_by_the_node(node: Node) -> None:
    """A request refused before its handler (here a SERIES-level C-GET without its unique key,
    0xA900) is counted in the node's /metrics whichever process served it: a receiver's refusal
    was counted in the receiver only, so the node's figure missed it."""
    from prometheus_client import REGISTRY
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet as GetModel,
    )

    def refused() -> float:
        value = REGISTRY.get_sample_value(
            "nnunet_node_dimse_requests_total", {"service": "C-GET", "outcome": "failure"}
        )
        return value or 0.0

    until(lambda: node.receivers.loads() == [0, 0])
    before = refused()
    ae = AE(ae_title="REFUSED")
    ae.add_requested_context(GetModel)
    held = [ae.associate("127.0.0.1", node.port, ae_title="NNUNET_NODE") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        assert node.receivers.loads() == [1, 1]  # one association in each process
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = "1.2.3.4"  # no SeriesInstanceUID
        for assoc in held:
            statuses = [s.Status for s, _ in assoc.send_c_get(query, GetModel) if s]
            assert statuses == [0xA900]
    finally:
        for assoc in held:
            assoc.release()
    until(lambda: refused() - before >= 2)
    time.sleep(0.5)  # a receiver sends its counts every 0.25 s: nothing more comes
    assert refused() - before == 2
