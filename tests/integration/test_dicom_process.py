"""``nnunet-node dicom`` as a real process: killed with SIGKILL in the middle of a storescu
transfer, restarted, every acknowledged instance is in the archive and the index, nothing orphaned;
stopped cleanly by SIGTERM."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from nnunet_node.storage.archive import LOCK_FILE
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.models import Instance
from tests.node.peers import DCMTK_ENV, free_port
from tests.peer_tools import tool
from tests.support.datasets import write_ct_series
from tests.support.node_process import NodeProcess

STARTUP_S = 120


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path, free_port())
    yield node
    node.kill_if_running()


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_mid_transfer_loses_no_acknowledged_instance(
    node_process: NodeProcess, tmp_path: Path, processes: int
) -> None:
    """With one receiving process and with two (NNUNET_NODE_DICOM_PROCESSES): all are killed."""
    node_process.env["NNUNET_NODE_DICOM_PROCESSES"] = str(processes)
    folder = tmp_path / "ct"
    files = [folder / name for name in write_ct_series(folder, 150, size=512, patient_id="KILL")]
    node_process.start()
    port = node_process.env["NNUNET_NODE_DICOM_PORT"]
    storescu = subprocess.Popen(
        [
            tool("storescu"),
            "-v",
            "+sd",
            "-aec",
            "NNUNET_NODE",
            "127.0.0.1",
            port,
            str(files[0].parent),
        ],
        env=DCMTK_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert storescu.stdout is not None
    acknowledged: list[str] = []
    current: str | None = None
    killed = False
    for line in storescu.stdout:
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(current)
            if len(acknowledged) == 25 and not killed:
                node_process.kill_all()
                killed = True
    storescu.wait(60)
    storescu.stdout.close()
    assert killed and 25 <= len(acknowledged) < len(files), len(acknowledged)
    assert node_process.process is not None and node_process.process.wait(30) == -signal.SIGKILL

    node_process.start()  # the restart runs the archive's recovery
    assert node_process.signal(signal.SIGTERM) == 0  # and SIGTERM stops it cleanly

    data = tmp_path / "data"
    engine = make_engine(f"sqlite:///{data / 'nnunet-node.db'}")
    try:
        with make_sessionmaker(engine)() as session:
            rows = {i.sop_instance_uid: i.path for i in session.scalars(select(Instance))}
    finally:
        engine.dispose()
    sent = {Path(p).name: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    for path in acknowledged:
        assert sent[Path(path).name] in rows, f"acknowledged {path} is not in the index"
    archive = data / "dicom"
    on_disk = {
        str(p.relative_to(archive))
        for p in archive.rglob("*")
        if p.is_file() and p.name != LOCK_FILE  # the receivers' locks (storage/locks.py)
    }
    leftovers = {p for p in on_disk if p.startswith(".incoming")}
    assert not leftovers, leftovers
    assert on_disk == set(rows.values())  # no orphan file, no row without its file
    for rel in rows.values():
        pydicom.dcmread(archive / rel, stop_before_pixels=True)
