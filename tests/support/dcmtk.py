"""dcmtk's command-line tools as real DICOM peers: run with Nagle off (``TCP_NODELAY=1``: dcmtk
leaves it on, which costs about 40 ms per DIMSE message), found by their real location
(:mod:`tests.peer_tools`: skipped when missing, failed under CI)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.peer_tools import tool

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(
    *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool (found by its real location; skipped when missing) with Nagle off (in
    ``cwd``); output (stdout + stderr) in ``.stdout``."""
    return subprocess.run(
        [tool(args[0]), *args[1:]],
        env=DCMTK_ENV,
        capture_output=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def retrieve(
    tool: str, port: int, *options: str, cwd: Path | None = None, **keys: str
) -> subprocess.CompletedProcess[str]:
    """Run ``movescu`` or ``getscu`` (verbose) against the node at ``port`` with ``options``
    (``-S``, ``-aem PACS``, ``-od DIR``...) and one ``-k Keyword=value`` per key, in order
    (in ``cwd``: movescu's ``+B`` writes there, whatever ``-od`` says)."""
    identifier = [arg for key, value in keys.items() for arg in ("-k", f"{key}={value}")]
    return dcmtk(
        tool, "-v", *options, "-aec", "NNUNET_NODE", *identifier, "127.0.0.1", str(port), cwd=cwd
    )


@dataclass(frozen=True)
class Retrieved:
    """What one getscu run gave: its exit status, its output (stdout and stderr together) and
    the files it wrote, sorted by name."""

    returncode: int
    output: str
    files: list[Path]


def get_series(port: int, out_dir: Path, keys: Mapping[str, str], *options: str) -> Retrieved:
    """C-GET with dcmtk's getscu (verbose) from the node (AE NNUNET_NODE) at ``port`` on
    loopback, into ``out_dir`` (made here when absent), with the identifier ``keys`` (one
    ``-k Keyword=value`` each, in order: a series' usually, any level works) and ``options``
    (the information model, ``-S`` Study Root or ``-P`` Patient Root; a transfer syntax
    preference such as ``+xr``; ``+B``...). Nothing is asserted: the caller checks the exit
    status and the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = retrieve("getscu", port, *options, "-od", str(out_dir), **keys)
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    return Retrieved(result.returncode, result.stdout, files)


def storescu(port: int, folder: Path, timeout: float = 60) -> None:
    """Send every file in ``folder`` with dcmtk's storescu to the node (AE NNUNET_NODE) at
    ``port`` on loopback.

    :raises AssertionError: storescu failed (its output is the message).
    """
    result = dcmtk(
        "storescu", "+sd", "-aec", "NNUNET_NODE", "127.0.0.1", str(port), str(folder),
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
