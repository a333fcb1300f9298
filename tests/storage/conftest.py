"""Fixtures for the storage tests: a real SQLite file migrated by Alembic, an archive, DICOM bytes.

The DICOM builder makes small CT instances with pydicom directly (4x4 int16 pixels), so these tests
do not depend on the phantom generator.
"""

from __future__ import annotations

import io
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.storage.archive import Archive
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.migrations import upgrade


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One database migrated to head; tests copy it (migrating each time would cost ~0.2 s)."""
    path = tmp_path_factory.mktemp("template") / "index.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def index_url(tmp_path: Path, migrated_template: Path) -> str:
    target = tmp_path / "index.db"
    shutil.copyfile(migrated_template, target)
    return f"sqlite:///{target}"


@pytest.fixture
def index_sessions(index_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(index_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def archive(tmp_path: Path, index_sessions: sessionmaker[Session]) -> Archive:
    return Archive(tmp_path / "dicom", index_sessions)


def build_dataset(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    size: int = 4,
    **attributes: Any,
) -> Dataset:
    """A small CT Image Storage instance; keyword arguments set any other attribute."""
    with warnings.catch_warnings():
        # Tests build hostile values on purpose; pydicom warns when they are set.
        warnings.simplefilter("ignore")
        return _build(study_uid, series_uid, sop_uid, size, attributes)


def _build(
    study_uid: str | None,
    series_uid: str | None,
    sop_uid: str | None,
    size: int,
    attributes: dict[str, Any],
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = "P1"
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.arange(size * size, dtype=np.int16).tobytes()
    return ds


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def make_instance() -> Callable[..., bytes]:
    """``make_instance(**attributes) -> Part 10 bytes`` (see :func:`build_dataset`)."""

    def make(**attributes: Any) -> bytes:
        return encode(build_dataset(**attributes))

    return make


@pytest.fixture
def make_dataset() -> Callable[..., Dataset]:
    """``make_dataset(**attributes) -> Dataset`` (see :func:`build_dataset`)."""
    return build_dataset
