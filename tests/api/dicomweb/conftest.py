"""Fixtures for the DICOMweb tests: one live node for the session, a phantom study stored in it."""

from __future__ import annotations

from collections.abc import Iterator

import pydicom
import pytest

from tests.support.dicomweb import Node, PhantomStudy, dicomweb_settings, write_phantom_study


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    live = Node(dicomweb_settings(tmp_path_factory.mktemp("dicomweb-node"))).start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return write_phantom_study(tmp_path_factory.mktemp("phantom"), seed=11, patient_id="DW-11")


@pytest.fixture(scope="session")
def stored(node: Node, phantom_study: PhantomStudy) -> PhantomStudy:
    """The phantom study, stored through dicomweb-client's STOW-RS."""
    datasets = [pydicom.dcmread(f) for f in phantom_study.files]
    response = node.dicomweb_client().store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == len(phantom_study.files)
    assert "FailedSOPSequence" not in response
    assert response.RetrieveURL.endswith(f"/studies/{phantom_study.study_uid}")
    return phantom_study
