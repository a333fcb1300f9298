"""A whole node for the operations tests: ``nnunet_node.app.create_app`` (HTTP API, DICOM node,
job workers, dispatcher) served by a real uvicorn on a free loopback port, with a routing rule on
the demo model and a destination that the test may start (dcmtk's storescp) or leave dark.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from nnunet_node.app import create_app
from nnunet_node.core.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def routed_spec(folder: Path, pacs_port: int, *, quiet: float = 1.0) -> Path:
    """The repository's spec with the `phantom` model, a rule for phantom CT series (SEG and
    RTSTRUCT), and its destination PACS at ``pacs_port``: one attempt, so a dark PACS fails the
    dispatch at once (and it can be retried by hand)."""
    spec = yaml.safe_load((REPO / "model-serve-spec.yaml").read_text())
    spec["model_folder"] = str(REPO / "models")
    spec["models"] = [m for m in spec["models"] if m["id"] == "phantom"]
    spec["destinations"] = {
        "PACS": {
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": pacs_port,
            "max_attempts": 1,
            "retry_delay_s": 0.2,
        }
    }
    spec["routes"] = [
        {
            "name": "phantom-ct",
            "match": {"Modality": "CT", "SeriesDescription": "(?i).*phantom.*"},
            "nnunet_id": "phantom",
            "args": {"is_dicom": True, "save_rt_struct_output": True, "tta": False},
            "destinations": ["PACS"],
            "quiet_seconds": quiet,
        }
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class FullNode:
    """The composition root's app under uvicorn in a thread; ``client`` speaks to it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
        self.client = httpx.Client(base_url=self.url, timeout=60.0, headers=headers)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", lifespan="on", ws="none", loop="asyncio")
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> FullNode:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the node did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self._thread.join(90)
        self._sock.close()

    @property
    def context(self) -> Any:
        return self.app.state.context

    @property
    def dicom_port(self) -> int:
        port = self.app.state.services["dimse"].port
        assert port is not None
        return int(port)

    def wait_for(self, what: Callable[[], Any], timeout: float = 120.0, step: float = 0.1) -> Any:
        """Poll ``what()`` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            time.sleep(step)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def make_full_node() -> Callable[..., FullNode]:
    """``make_full_node(tmp, pacs_port, **settings)``: a :class:`FullNode`, not started."""

    def factory(tmp: Path, pacs_port: int, **overrides: Any) -> FullNode:
        values: dict[str, Any] = {
            "data_dir": tmp / "data",
            "model_serve_spec": routed_spec(tmp / "spec", pacs_port),
            "dicom_host": "127.0.0.1",
            "dicom_port": 0,
            "device": "cpu",
            "min_free_disk_mb": 0,
            "rate_limit_per_minute": 0,
            "workers": 1,
            "gpu_wait_s": 0,
        }
        values.update(overrides)
        return FullNode(load_settings(**values))

    return factory
