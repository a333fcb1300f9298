"""The suite's real DICOM peers are found where they really are, and a missing one is a skip that
says what to install (a failure under CI)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.outcomes import Failed, Skipped

from tests import peer_tools


@pytest.fixture(autouse=True)
def _fresh_lookup() -> Iterator[None]:
    peer_tools.find_tool.cache_clear()
    yield
    peer_tools.find_tool.cache_clear()


def test_a_script_of_the_same_name_first_on_path_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `source .venv/bin/activate` does: pynetdicom's console script `storescu` comes first.
    fake = tmp_path / "storescu"
    fake.write_text("#!/usr/bin/env python\nprint('pynetdicom storescu')\n")
    fake.chmod(0o755)
    real = peer_tools.find_tool("storescu")
    peer_tools.find_tool.cache_clear()
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    found = peer_tools.find_tool("storescu")
    assert found != str(fake)
    if real is not None:
        assert Path(found or "").read_bytes()[:2] != b"#!"


def test_a_missing_tool_is_a_skip_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert "sudo apt-get install dcmtk" in peer_tools.missing_reason("getscu")
    assert "sudo apt-get install dicom3tools" in peer_tools.missing_reason("dciodvfy")
    with pytest.raises(Skipped, match=r"no-such-dicom-tool is not installed"):
        peer_tools.tool("no-such-dicom-tool")


def test_a_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match=r"CI: .*no-such-dicom-tool"):
        peer_tools.tool("no-such-dicom-tool")
