"""Fixtures for the HTTP API tests: the real app served by uvicorn on a free loopback port.

Each :class:`~tests.support.live_node.LiveNode` is ``create_app(settings)`` run by a real uvicorn
server in a thread, with the real lifespan (migrations on a SQLite file, job workers, the committed
demo models). Tests talk to it over TCP with httpx, as any client would. Tests get the helpers
through fixtures (``make_node``, ``make_study``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from nnunet_node.core.phantom import make_phantom, write_dicom_series, write_nifti
from nnunet_node.core.settings import Settings, load_settings
from tests.support.live_node import LiveNode

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "model-serve-spec.yaml"
PHANTOM_SHAPE = (32, 32, 32)
"""One 32^3 patch of the demo models: the smallest volume they segment well (seed 5)."""
PHANTOM_SEED = 5


def models_only_spec(folder: Path) -> Path:
    """The repository's spec with its models only: no routing rule fires on what tests archive, so
    the only jobs are the ones a test makes."""
    raw = yaml.safe_load(SPEC.read_text())
    raw["model_folder"] = str((SPEC.parent / raw["model_folder"]).resolve())
    raw.pop("routes", None)
    raw.pop("destinations", None)
    path = folder / "model-serve-spec.yaml"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw))
    return path


def node_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test node: its own data folder, the demo models, CPU, no DIMSE AE, no rate
    limit."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "model_serve_spec": models_only_spec(data_dir.parent / f"{data_dir.name}-spec"),
        "dicom_enabled": False,
        "device": "cpu",
        "rate_limit_per_minute": 0,
        "workers": 1,
        "gpu_wait_s": 0,
    }
    values.update(overrides)
    return load_settings(**values)


@dataclass(frozen=True)
class Study:
    """A phantom study on disk: ``root`` holds ``ct_nifti/image.nii.gz`` and ``ct_dicom/*.dcm``."""

    root: Path
    nifti: str = "ct_nifti"
    dicom: str = "ct_dicom"


def write_study(root: Path, seed: int = PHANTOM_SEED) -> Study:
    phantom = make_phantom(seed, shape=PHANTOM_SHAPE)
    write_nifti(phantom, root / "ct_nifti" / "image.nii.gz")
    write_dicom_series(phantom, root / "ct_dicom", patient_id=f"PH{seed}")
    return Study(root)


NodeFactory = Callable[..., LiveNode]


@pytest.fixture(scope="session")
def make_node() -> NodeFactory:
    """``make_node(data_dir, **settings)``: a :class:`LiveNode`, not started (use ``with``)."""

    def factory(data_dir: Path, **overrides: Any) -> LiveNode:
        return LiveNode(node_settings(data_dir, **overrides))

    return factory


@pytest.fixture(scope="session")
def make_study() -> Callable[..., Study]:
    """``make_study(root, seed=5)``: write a phantom study (NIfTI and DICOM) under ``root``."""
    return write_study


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node-data")


@pytest.fixture(scope="module")
def study(data_dir: Path) -> Study:
    """A phantom study inside the node's data folder (the default allowed root)."""
    return write_study(data_dir / "studies" / "study01")


@pytest.fixture(scope="module")
def node(data_dir: Path, study: Study) -> Iterator[LiveNode]:
    """One running node for the module: no API key, no rate limit, no DIMSE."""
    with LiveNode(node_settings(data_dir)) as live:
        yield live


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (none when it does not exist)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def list_files() -> Callable[[Path], list[str]]:
    return files_under
