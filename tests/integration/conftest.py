"""A whole node for the operations tests: ``nnunet_node.app.create_app`` (HTTP API, DICOM node,
job workers, dispatcher) served by a real uvicorn on a free loopback port, with a routing rule on
the demo model and a destination that the test may start (dcmtk's storescp) or leave dark.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nnunet_node.core.settings import load_settings
from tests.support.live_node import LiveNode
from tests.support.routed import routed_spec


@pytest.fixture(scope="session")
def make_full_node() -> Callable[..., LiveNode]:
    """``make_full_node(tmp, pacs_port, **settings)``: a :class:`LiveNode`, not started, whose
    ``client`` sends the API key when the settings have one."""

    def factory(tmp: Path, pacs_port: int, **overrides: Any) -> LiveNode:
        values: dict[str, Any] = {
            "data_dir": tmp / "data",
            # one attempt: a dark PACS fails the dispatch at once (it can be retried by hand)
            "model_serve_spec": routed_spec(
                tmp / "spec", pacs_port, pacs={"max_attempts": 1, "retry_delay_s": 0.2}
            ),
            "dicom_host": "127.0.0.1",
            "dicom_port": 0,
            "device": "cpu",
            "min_free_disk_mb": 0,
            "rate_limit_per_minute": 0,
            "workers": 1,
            "gpu_wait_s": 0,
        }
        values.update(overrides)
        settings = load_settings(**values)
        headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
        return LiveNode(settings, client_headers=headers, client_timeout=60.0)

    return factory
