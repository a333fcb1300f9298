"""The real app over real HTTP: ``nnunet_node.app.create_app(settings)`` served by uvicorn in a
thread, on a loopback port the OS picked, with its real lifespan (migrations, job workers, and the
DICOM node when the settings enable it). Tests talk to it over TCP as any client would."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn

from nnunet_node.app import create_app
from nnunet_node.core.settings import Settings


class LiveNode:
    """The app under uvicorn in a thread. ``client`` is an httpx client bound to it, sending
    ``client_headers`` with every request (none by default: tests of the key send their own).
    Use as a context manager, or :meth:`start` and :meth:`stop`. With ``require_stop`` a server
    thread still running 90 s after :meth:`stop` fails the test; the whole-node fixtures turn it
    off (a job worker the test left inferring may outlive the shut-down's wait)."""

    def __init__(
        self,
        settings: Settings,
        *,
        client_headers: dict[str, str] | None = None,
        client_timeout: float = 120.0,
        require_stop: bool = True,
    ) -> None:
        self.settings = settings
        self.require_stop = require_stop
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(
            base_url=self.url, timeout=client_timeout, headers=client_headers or {}
        )
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", lifespan="on", ws="none", loop="asyncio")
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, timeout: float = 60.0) -> LiveNode:
        """Start serving; return once uvicorn has run the lifespan's start-up.

        :raises RuntimeError: the server stopped, or did not start within ``timeout`` seconds.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the node did not start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Close the client, run the lifespan's shut-down and wait for the thread.

        :raises AssertionError: the server thread is still running after 90 s (with
            ``require_stop``).
        """
        self.client.close()
        self.server.should_exit = True
        self._thread.join(90)
        self._sock.close()
        if self.require_stop:
            assert not self._thread.is_alive(), "the node did not stop"

    def __enter__(self) -> LiveNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def context(self) -> Any:
        """The node's :class:`~nnunet_node.pipeline.context.NodeContext`."""
        return self.app.state.context

    @property
    def dicom_port(self) -> int:
        """The port the DICOM node listens on (the settings must enable it)."""
        port = self.app.state.services["dimse"].port
        assert port is not None, "the DICOM node is not running"
        return int(port)

    def wait_for(self, what: Callable[[], Any], timeout: float = 120.0, step: float = 0.1) -> Any:
        """Poll ``what()`` until it returns something truthy; return that.

        :raises AssertionError: still falsy after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            time.sleep(step)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
