"""``nnunet-node dicom`` as a real subprocess, configured through the environment (the tests of
tests/integration/test_dicom_process.py and test_graceful_stop.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def end_process(
    process: subprocess.Popen[str], signum: int = signal.SIGINT, timeout: float = 60.0
) -> str:
    """Send ``signum`` to ``process`` and wait up to ``timeout`` seconds for it to exit, then
    kill it; what it wrote on a piped stdout since (\"\" when stdout is not a pipe)."""
    process.send_signal(signum)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out or ""


class NodeProcess:
    """``nnunet-node dicom`` in a subprocess, configured through the environment."""

    def __init__(self, tmp: Path, port: int) -> None:
        spec = tmp / "spec.yaml"
        if not spec.exists():
            spec.write_text(f"model_folder: {tmp}\nmodels: []\n")
        self.env = {
            **os.environ,
            "MODEL_SERVE_SPEC": str(spec),
            "NNUNET_NODE_DATA": str(tmp / "data"),
            "NNUNET_NODE_DICOM_PORT": str(port),
            "NNUNET_NODE_DICOM_HOST": "127.0.0.1",
            "NNUNET_NODE_MIN_FREE_DISK_MB": "0",
        }
        self.log = tmp / "node.log"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self._close()
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nnunet_node.cli", "dicom"],
                cwd=REPO,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.process.stdout is not None
        for line in self.process.stdout:  # blocks until the node says it listens
            if "listening on port" in line:
                return
        raise AssertionError(f"the node did not start:\n{self.log.read_text()[-3000:]}")

    def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(60)

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def kill_all(self) -> None:
        """SIGKILL the node's process and its receiver processes at once (a power loss, the
        OOM killer taking the container)."""
        self.signal_all(signal.SIGKILL)

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to the node's process and its child processes at once (as systemd
        does with its default ``KillMode=control-group``)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in [self.process.pid, *map(int, children.read_text().split())]:
            os.kill(pid, signum)

    def kill_if_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()
