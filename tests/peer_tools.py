"""The real DICOM peers the suite runs: dcmtk's command-line tools and dicom3tools' ``dciodvfy``.

Found by their real location, not as the first name on ``PATH``: with the virtual environment
activated, pynetdicom's own console scripts ``storescu``, ``findscu``, ``echoscu`` and ``storescp``
(small Python scripts in ``.venv/bin``) come first on ``PATH`` and take other options than dcmtk's.
dcmtk and dicom3tools are compiled programs, so a candidate that is a script (``#!``) is passed
over.

A test that needs a tool that is not installed is skipped with the command that installs it; under
``CI=true`` (CI installs every tool) it fails instead, so a missing tool is never a silent skip.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

DCMTK_TOOLS = ("storescu", "findscu", "movescu", "getscu", "echoscu", "storescp", "dcmdump")
DICOM3TOOLS = ("dciodvfy",)
_PACKAGE = {**dict.fromkeys(DCMTK_TOOLS, "dcmtk"), **dict.fromkeys(DICOM3TOOLS, "dicom3tools")}
_FALLBACK_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin", "/opt/local/bin")


def _is_program(path: Path) -> bool:
    """An executable file that is not an interpreter script."""
    if not path.is_file() or not os.access(path, os.X_OK):
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(2) != b"#!"
    except OSError:
        return False


@functools.cache
def find_tool(name: str) -> str | None:
    """The path of dcmtk's or dicom3tools' ``name``, or None when it is not installed."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for folder in [*dirs, *_FALLBACK_DIRS]:
        candidate = Path(folder) / name
        if _is_program(candidate):
            return str(candidate)
    return None


def missing_reason(name: str) -> str:
    package = _PACKAGE.get(name, name)
    return (
        f"{package}'s {name} is not installed (Debian/Ubuntu: sudo apt-get install {package}); "
        "the tests that use it as a real DICOM peer need it"
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def tool(name: str) -> str:
    """The path of ``name`` for a test that runs it: skipped (failed under CI) when missing."""
    path = find_tool(name)
    if path is None:
        if in_ci():
            pytest.fail(f"CI: {missing_reason(name)}", pytrace=False)
        pytest.skip(missing_reason(name))
    return path


def missing_tools() -> list[str]:
    """Every peer tool the suite uses that is not installed."""
    return [name for name in (*DCMTK_TOOLS, *DICOM3TOOLS) if find_tool(name) is None]
