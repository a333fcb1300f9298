"""Real DICOM peers for tests: dcmtk's storescp as a destination, on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.peer_tools import tool

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


@contextmanager
def storescp(
    folder: Path,
    *,
    ae_title: str = "PACS",
    port: int | None = None,
    tls: tuple[Path, Path, Path] | None = None,
) -> Iterator[int]:
    """dcmtk's storescp writing what it receives to ``folder``; yields its port. With ``tls``
    (key, certificate, CA file) it speaks TLS only and requires a client certificate the CA
    signed."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    secure = ["+tls", str(tls[0]), str(tls[1]), "+cf", str(tls[2])] if tls else []
    options = [*secure, "-aet", ae_title, "-od", str(folder), "--accept-all"]
    process = subprocess.Popen(
        [tool("storescp"), *options, str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def received(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.exists() else []
