"""A whole node for the operations tests: ``nnunet_node.app.create_app`` (HTTP API, DICOM node,
job workers, dispatcher) served by a real uvicorn on a free loopback port, with a routing rule on
the demo model and a destination that the test may start (dcmtk's storescp) or leave dark.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from nnunet_node.core.settings import load_settings
from tests.support.live_node import LiveNode

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


@pytest.fixture(scope="session")
def make_full_node() -> Callable[..., LiveNode]:
    """``make_full_node(tmp, pacs_port, **settings)``: a :class:`LiveNode`, not started, whose
    ``client`` sends the API key when the settings have one."""

    def factory(tmp: Path, pacs_port: int, **overrides: Any) -> LiveNode:
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
        settings = load_settings(**values)
        headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
        return LiveNode(settings, client_headers=headers, client_timeout=60.0, require_stop=False)

    return factory
