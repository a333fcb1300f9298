"""Helpers for the DICOMweb tests (``tests/api/dicomweb``): the real app on a free loopback port,
dicomweb-client on it.

dicomweb-client speaks through ``requests`` (blocking), so the app runs under uvicorn in a thread
with its real lifespan (migrations on a SQLite file, job workers, the demo models), and the tests
are plain synchronous code, as a user's script would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.core.settings import Settings, load_settings
from tests.support.live_node import LiveNode

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "model-serve-spec.yaml"
API_KEY = "dicomweb-test-key"


def dicomweb_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "model_serve_spec": SPEC,
        "dicom_enabled": False,
        "device": "cpu",
        "rate_limit_per_minute": 0,
        "workers": 1,
        "gpu_wait_s": 0,
        "min_free_disk_mb": 0,
        "api_key": API_KEY,
        "cors_origins": ["http://viewer.example"],
        "series_quiet_s": 3600,
    }
    values.update(overrides)
    return load_settings(**values)


class Node(LiveNode):
    """A :class:`~tests.support.live_node.LiveNode` with what dicomweb-client needs."""

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def session(self, key: str | None = API_KEY) -> requests.Session:
        session = requests.Session()
        if key:
            session.headers["Authorization"] = f"Bearer {key}"
        return session

    def dicomweb_client(self) -> DICOMwebClient:
        """dicomweb-client on the node's DICOMweb root, sending the key as a bearer token."""
        return DICOMwebClient(url=self.dicomweb, session=self.session())


@dataclass(frozen=True)
class PhantomStudy:
    study_uid: str
    series_uid: str
    patient_id: str
    files: list[Path]


def write_phantom_study(
    folder: Path, *, seed: int, patient_id: str, description: str = "Test CT"
) -> PhantomStudy:
    """A phantom CT series; the default description matches no route of the demo spec (its
    ``phantom-ct`` route wants "phantom" in SeriesDescription), so no job starts."""
    import pydicom

    phantom = make_phantom(seed, shape=(40, 40, 40))
    files = write_dicom_series(
        phantom, folder, patient_id=patient_id, series_description=description
    )
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return PhantomStudy(first.StudyInstanceUID, first.SeriesInstanceUID, patient_id, files)
