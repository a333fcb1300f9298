"""``nnunet-node dicom`` stopped by SIGTERM while associations are open
(``NNUNET_NODE_DICOM_STOP_GRACE_S``, node/service.py): the ports close at once (a new connection
is refused), the associations open finish as usual within the grace, in the node's process and
in its receiver process, and those still open when it ends (or at a second signal) are aborted.

Real parts: the node as a subprocess (``python -m nnunet_node.cli dicom``, as the command line
runs it) with one receiver process, dcmtk's storescu sending, pynetdicom as an idle requester,
the node's SQLite index read afterwards."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.models import Instance
from tests.node.peers import DCMTK_ENV, free_port
from tests.peer_tools import tool
from tests.support.datasets import write_ct_series
from tests.support.node_process import REPO, NodeProcess


def refused(port: int) -> bool:
    """Whether a new TCP connection to the node's DICOM port is refused. (Tried only once the
    stop's INFO line is logged: a connection the node accepts counts as an association open
    until the node sees it close.)"""
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def until(what: Any, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(step)
    return bool(what())


def indexed_uids(data: Path) -> set[str]:
    engine = make_engine(f"sqlite:///{data / 'nnunet-node.db'}")
    try:
        with make_sessionmaker(engine)() as session:
            return set(session.scalars(select(Instance.sop_instance_uid)))
    finally:
        engine.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """The node with one receiver process beside its own (NNUNET_NODE_DICOM_PROCESSES=2)."""
    made = NodeProcess(tmp_path, free_port())
    made.env["NNUNET_NODE_DICOM_PROCESSES"] = "2"
    yield made
    made.kill_if_running()


def port_of(node: NodeProcess) -> int:
    return int(node.env["NNUNET_NODE_DICOM_PORT"])


def idle_associations(port: int, count: int) -> list[Any]:
    """``count`` associations (C-ECHO only) that stay open sending nothing; pynetdicom's
    timeouts long enough that only the node can end them."""
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 120
    made = []
    for _ in range(count):
        assoc = ae.associate("127.0.0.1", port, ae_title="NNUNET_NODE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        made.append(assoc)
    return made


def stop_lines(log: Path) -> tuple[list[str], list[str]]:
    """The stop's INFO line(s) (how many associations it waits for) and its WARNING line(s)."""
    text = log.read_text()
    waiting = re.findall(r".*stopping: new associations refused.*", text)
    aborted = re.findall(r".*association\(s\) still open.*aborted.*", text)
    return waiting, aborted


@pytest.mark.slow
def test_a_series_in_flight_at_sigterm_is_stored_whole_and_released(
    node: NodeProcess, tmp_path: Path
) -> None:
    """Two storescu associations at once (one on the node's process, one on its receiver)
    are mid-series at SIGTERM: a new connection is refused while they still send, both finish
    (exit 0, every instance acknowledged and in the index) and the node exits by itself well
    before its grace is over, with no association aborted."""
    grace = 20
    node.env["NNUNET_NODE_DICOM_STOP_GRACE_S"] = str(grace)
    series = [write_ct_series(tmp_path / f"series-{k}", 300, patient_id="DRAIN") for k in range(2)]
    node.start()
    port = port_of(node)
    logs = [tmp_path / f"storescu-{k}.log" for k in range(2)]
    senders = []
    storescu = [tool("storescu"), "-v", "+sd", "-aec", "NNUNET_NODE", "127.0.0.1"]
    for k, log in enumerate(logs):
        with open(log, "w") as out:
            senders.append(
                subprocess.Popen(
                    [*storescu, str(port), str(tmp_path / f"series-{k}")],
                    env=DCMTK_ENV,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )

    def acknowledged(log: Path) -> int:
        return log.read_text().count("Received Store Response (Success)")

    assert until(lambda: all(acknowledged(log) >= 20 for log in logs), 60), [
        acknowledged(log) for log in logs
    ]
    receiver_folder = tmp_path / "data" / "dicom" / ".incoming" / "receiver-1"
    assert receiver_folder.is_dir() and any(receiver_folder.iterdir())  # it serves one of them
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    assert until(lambda: stop_lines(node.log)[0], 5)  # logged once the ports are closed
    assert refused(port), "a new connection was still accepted"
    assert any(sender.poll() is None for sender in senders), "the senders ended first"
    at_refusal = [acknowledged(log) for log in logs]

    for sender, log in zip(senders, logs, strict=True):
        assert sender.wait(60) == 0, log.read_text()[-2000:]
    assert node.process.wait(grace + 30) == 0
    stopped_after = time.monotonic() - signalled
    assert stopped_after < grace, stopped_after  # ended by itself once the senders released

    for uids, log in zip(series, logs, strict=True):
        text = log.read_text()
        assert acknowledged(log) == len(uids), text[-2000:]
        assert "Abort" not in text and "Releasing Association" in text
    assert sum(at_refusal) < 2 * 300  # storing went on after the ports closed
    stored = indexed_uids(tmp_path / "data")
    for uids in series:
        assert set(uids.values()) <= stored
    waiting, aborted = stop_lines(node.log)
    assert (
        len(waiting) == 1 and "for 2 open association(s) (1 in receiver processes)" in (waiting[0])
    ), waiting
    assert f"up to {grace} s" in waiting[0]
    assert aborted == []


@pytest.mark.slow
def test_idle_associations_are_aborted_when_the_grace_ends(node: NodeProcess) -> None:
    """Two associations left open, sending nothing (one in each process): still open a moment
    after SIGTERM, aborted at the end of a 2 s grace, one WARNING naming both; the node exits 0."""
    grace = 2.0
    node.env["NNUNET_NODE_DICOM_STOP_GRACE_S"] = str(grace)
    node.start()
    port = port_of(node)
    associations = idle_associations(port, 2)
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert until(lambda: stop_lines(node.log)[0], 5)
    assert refused(port)
    time.sleep(0.5)
    assert all(assoc.is_established for assoc in associations)  # not aborted at once

    assert until(lambda: all(assoc.is_aborted for assoc in associations), grace + 20)
    aborted_after = time.monotonic() - signalled
    assert aborted_after >= grace - 0.2, aborted_after
    assert node.process.wait(30) == 0
    waiting, aborted = stop_lines(node.log)
    assert (
        len(waiting) == 1 and "for 2 open association(s) (1 in receiver processes)" in (waiting[0])
    )
    assert len(aborted) == 1 and "WARNING" in aborted[0], aborted
    assert "2 association(s) still open after 2 s" in aborted[0]


@pytest.mark.slow
def test_sigterm_to_every_process_at_once_drains_the_receiver_too(node: NodeProcess) -> None:
    """systemd signals every process of the service: the receiver process, which gets SIGTERM
    itself, gives its association the same grace instead of aborting it at once."""
    grace = 2.0
    node.env["NNUNET_NODE_DICOM_STOP_GRACE_S"] = str(grace)
    node.start()
    port = port_of(node)
    associations = idle_associations(port, 2)  # the second on the receiver
    assert node.process is not None
    node.signal_all(signal.SIGTERM)
    signalled = time.monotonic()
    assert until(lambda: stop_lines(node.log)[0], 5)
    time.sleep(0.5)
    assert all(assoc.is_established for assoc in associations)
    assert until(lambda: all(assoc.is_aborted for assoc in associations), grace + 20)
    assert time.monotonic() - signalled >= grace - 0.2
    assert node.process.wait(30) == 0
    _, aborted = stop_lines(node.log)
    assert len(aborted) == 1 and "2 association(s) still open after 2 s" in aborted[0], aborted
    assert "killed" not in node.log.read_text()


@pytest.mark.slow
def test_a_second_sigterm_aborts_at_once(node: NodeProcess) -> None:
    """A grace of 60 s; the second SIGTERM ends the wait: the idle associations are aborted and
    the node exits well before the grace is over, its WARNING saying why."""
    node.env["NNUNET_NODE_DICOM_STOP_GRACE_S"] = "60"
    node.start()
    port = port_of(node)
    associations = idle_associations(port, 2)
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    assert until(lambda: stop_lines(node.log)[0], 5)
    assert refused(port)
    time.sleep(0.5)
    assert all(assoc.is_established for assoc in associations)
    node.process.send_signal(signal.SIGTERM)
    again = time.monotonic()
    assert until(lambda: all(assoc.is_aborted for assoc in associations), 20)
    assert node.process.wait(30) == 0
    assert time.monotonic() - again < 30
    _, aborted = stop_lines(node.log)
    assert len(aborted) == 1 and "2 association(s) still open at a second signal" in aborted[0]


@pytest.mark.slow
def test_no_grace_aborts_at_sigterm_as_before(node: NodeProcess) -> None:
    """NNUNET_NODE_DICOM_STOP_GRACE_S=0: the associations open are aborted at SIGTERM, with
    neither the waiting line nor the WARNING."""
    node.env["NNUNET_NODE_DICOM_STOP_GRACE_S"] = "0"
    node.start()
    associations = idle_associations(port_of(node), 2)
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert until(lambda: all(assoc.is_aborted for assoc in associations), 20)
    assert time.monotonic() - signalled < 5  # the default grace would be 8 s
    assert node.process.wait(30) == 0
    assert stop_lines(node.log) == ([], [])


@pytest.mark.slow
def test_serve_closes_the_dicom_port_at_sigterm_and_waits_out_the_grace(tmp_path: Path) -> None:
    """``nnunet-node serve`` (uvicorn and the DICOM node in one process): SIGTERM closes the
    DICOM port at once, an idle association stays open for the 2 s grace and is then aborted
    with the WARNING line, and the process ends."""
    node = NodeProcess(tmp_path, free_port())  # its environment; started here as `serve`
    http_port = free_port()
    node.env.update(
        {
            "NNUNET_SERVE_PORT": str(http_port),
            "NNUNET_NODE_DICOM_PROCESSES": "1",
            "NNUNET_NODE_DICOM_STOP_GRACE_S": "2",
        }
    )
    port = port_of(node)
    with open(node.log, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "nnunet_node.cli", "serve"],
            cwd=REPO,
            env=node.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        assert until(
            lambda: "listening on" in node.log.read_text() or process.poll() is not None, 120, 0.2
        )
        assert process.poll() is None, node.log.read_text()[-3000:]
        (association,) = idle_associations(port, 1)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert until(lambda: stop_lines(node.log)[0], 5)
        assert refused(port)
        time.sleep(0.5)
        assert association.is_established
        assert until(lambda: association.is_aborted, 30)
        assert time.monotonic() - signalled >= 1.8
        # uvicorn raises the signal again once stopped (its default action: exit status -15)
        assert process.wait(30) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    waiting, aborted = stop_lines(node.log)
    assert len(waiting) == 1 and "for 1 open association(s) to end" in waiting[0], waiting
    assert len(aborted) == 1 and "1 association(s) still open after 2 s" in aborted[0], aborted
    assert "Application shutdown complete" in node.log.read_text()
