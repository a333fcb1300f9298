"""The parts of a node with workers on other hosts, started for real on loopback: a throw-away
``redis-server`` (the Celery broker) and ``nnunet-node worker`` processes. Used by the Celery
worker tests (``tests/integration/test_celery_workers.py``) and by ``bench/bench_workers.py``."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.node.peers import free_port

REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server")
"""Debian's ``redis-server`` (``.ci/run`` installs it), or None."""


class RedisServer:
    """A throw-away ``redis-server`` on a loopback port, no persistence: a restart loses every
    message it held (the hard case for the node). Its log and working files go to ``folder``.
    With ``password`` it asks for it (``--requirepass``) and ``url`` carries it."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.password = password
        secret = f":{password}@" if password else ""
        self.url = f"redis://{secret}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until it answers PING.

        :raises RuntimeError: ``redis-server`` is not installed, or did not answer in time.
        """
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (Debian: apt install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.folder),
                    *(["--requirepass", self.password] if self.password else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                    sock.sendall(auth + b"PING\r\n")
                    answer = sock.recv(32)
                    if answer.startswith(b"+OK\r\n+PONG" if auth else b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class WorkerProcess:
    """``nnunet-node worker`` (``python -m nnunet_node.cli worker``: CPU, one torch thread) in its
    own process with environment ``env``, listening on ``queues`` (the worker's default when
    None); stdout and stderr go to ``log``."""

    def __init__(self, name: str, env: dict[str, str], log: Path, queues: str | None = None):
        self.name = name
        self.queues = queues
        self.log = log
        command = [sys.executable, "-m", "nnunet_node.cli", "worker"]
        command += ["--device", "cpu", "--threads", "1", "--name", name]
        if queues is not None:
            command += ["--queues", queues]
        with open(log, "wb") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the process (SIGSTOP) for the block, then let it go on (SIGCONT)."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(20)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM: Celery's warm shut-down) without waiting."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL when it has not stopped within ``timeout`` seconds."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
