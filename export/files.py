"""File names of a stage's DICOM outputs (``docs/reference-contract.md``, "Response"), and
writing them.

``prediction[_<suffix>].dcm`` is the binary SEG, ``struct[_<suffix>].dcm`` the RTSTRUCT and
``proba[_<suffix>].dcm`` the fractional SEG (the contract leaves that name open; the reference
names it after its probability NIfTI, ``proba[_<suffix>].nii.gz``, and so do we).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Literal

from pydicom import Dataset

from nnunet_node.core.errors import InvalidRequest

DicomKind = Literal["seg", "rtstruct", "fractional"]

STEMS: dict[str, str] = {"seg": "prediction", "rtstruct": "struct", "fractional": "proba"}
_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_suffix(suffix: str | None) -> str | None:
    """The request's ``suffix`` if it is safe in a file name, else :class:`InvalidRequest`."""
    if suffix is None or suffix == "":
        return None
    if not isinstance(suffix, str) or not _SUFFIX.match(suffix) or ".." in suffix:
        raise InvalidRequest(
            f"suffix: {suffix!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return suffix


def dicom_output_name(kind: DicomKind, suffix: str | None = None) -> str:
    """``dicom_output_name("seg", "v2") == "prediction_v2.dcm"``."""
    if kind not in STEMS:
        raise ValueError(f"unknown DICOM output kind {kind!r}; one of {sorted(STEMS)}")
    checked = check_suffix(suffix)
    return f"{STEMS[kind]}_{checked}.dcm" if checked else f"{STEMS[kind]}.dcm"


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file, atomically (a temporary file renamed into place), so
    a crash never leaves half a file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
