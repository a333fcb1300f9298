"""A routed series sent again, over the real node (HTTP, DICOM, job workers, completion): storescu
sends a phantom CT series and the rule runs the `phantom` model once; the same instances again,
by STOW-RS and by C-STORE, make no new job (the done job stands); a changed instance by STOW-RS
runs the rule again, as a ``stow`` job that supersedes the first, shown so on ``/ui/jobs``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from tests.node.peers import free_port
from tests.support.dcmtk import storescu
from tests.support.live_node import LiveNode

pytestmark = pytest.mark.slow

BOUNDARY = "resendboundary"


def _stow(node: LiveNode, parts: list[bytes]) -> None:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    answer = node.client.post(
        "/dicom-web/studies",
        content=body + f"--{BOUNDARY}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        },
    )
    assert answer.status_code == 200, answer.text


def _jobs(node: LiveNode) -> list[dict[str, Any]]:
    answer = node.client.get("/jobs")
    assert answer.status_code == 200, answer.text
    return list(reversed(answer.json()["items"]))  # oldest first


def _finished(node: LiveNode, count: int) -> list[dict[str, Any]]:
    """Wait until there are ``count`` jobs, every one finished; return them, oldest first."""

    def ready() -> list[dict[str, Any]] | None:
        jobs = _jobs(node)
        assert len(jobs) <= count, [(j["job_id"], j["source"], j["status"]) for j in jobs]
        if len(jobs) == count and all(j["status"] not in ("queued", "running") for j in jobs):
            return jobs
        return None

    found: list[dict[str, Any]] = node.wait_for(ready, timeout=180)
    return found


def _handled(node: LiveNode) -> None:
    """Wait until series completion has handled every arrival (nothing left waiting)."""
    node.wait_for(lambda: node.context.completion.waiting() == [] or None, timeout=60)


def test_resent_series_runs_again_only_when_it_changed(tmp_path: Path, make_full_node: Any) -> None:
    files = write_dicom_series(make_phantom(5, shape=(32, 32, 32)), tmp_path / "ct")
    with make_full_node(tmp_path, free_port()) as node:
        storescu(node.dicom_port, files[0].parent)
        (first,) = _finished(node, 1)
        assert first["status"] == "done" and first["source"] == "dimse", first

        # The same instances again, by STOW-RS (other File Meta, same data sets), then C-STORE.
        _stow(node, [path.read_bytes() for path in files])
        _handled(node)
        storescu(node.dicom_port, files[0].parent)
        _handled(node)
        (still,) = _finished(node, 1)
        assert still["job_id"] == first["job_id"] and still["status"] == "done"
        assert still["superseded_by"] is None

        # One instance changed (same SOP Instance UID, a window added), by STOW-RS.
        ds = pydicom.dcmread(files[3])
        ds.WindowCenter, ds.WindowWidth = 40, 400
        changed = io.BytesIO()
        ds.save_as(changed, enforce_file_format=True)
        _stow(node, [changed.getvalue()])
        old, new = _finished(node, 2)
        assert new["status"] == "done" and new["source"] == "stow", new
        assert old["status"] == "superseded" and old["superseded_by"] == new["job_id"]
        stow_jobs = node.client.get("/jobs", params={"source": "stow"}).json()["items"]
        assert [j["job_id"] for j in stow_jobs] == [new["job_id"]]
        rows = node.client.get("/ui/jobs/rows")
        assert rows.status_code == 200
        row = rows.text.split(f'id="job-{new["job_id"]}"')[1].split("</tr>")[0]
        assert "<small>stow</small>" in row and "dimse" not in row, row
