"""Suite-wide checks. Under ``CI=true`` every real DICOM peer (dcmtk, dicom3tools) must be
installed: CI installs them, so a missing one stops the run here instead of skipping tests."""

from __future__ import annotations

import pytest

from tests.peer_tools import in_ci, missing_reason, missing_tools


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = missing_tools()
    if missing and in_ci():
        raise pytest.UsageError(
            "CI=true but real DICOM peers are missing: "
            + "; ".join(missing_reason(name) for name in missing)
        )
