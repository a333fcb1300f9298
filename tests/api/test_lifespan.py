"""The composition root: one process serves HTTP, runs the workers and the DIMSE node, and stops
them all; dispatches can be retried over HTTP."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

from nnunet_node.storage.db import unit_of_work
from nnunet_node.storage.models import Dispatch, DispatchStatus
from tests.peer_tools import tool


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_lifespan_starts_and_stops_the_dimse_node(tmp_path: Path, make_node: Any) -> None:
    with make_node(tmp_path / "data", dicom_enabled=True, dicom_port=0) as live:
        service = live.app.state.services["dimse"]
        port = service.port
        assert port
        echo = subprocess.run(
            [tool("echoscu"), "-aec", live.settings.ae_title, "127.0.0.1", str(port)],
            capture_output=True,
            timeout=30,
            env={"TCP_NODELAY": "1"},
        )
        assert echo.returncode == 0, echo.stderr
        assert live.client.get("/readyz").json()["status"] == "ok"
    assert not _port_open(port)
    assert live.app.state.context is None
    assert live.app.state.services == {}


def test_dispatch_retry(tmp_path: Path, make_node: Any) -> None:
    with make_node(tmp_path / "data") as live:
        jobs = live.context.job_service
        jobs.stop()  # the row below must stay as made
        job = jobs.store.create(source="dimse", request={"nnunet_id": "phantom"}, models=["x"])
        other = jobs.store.create(source="dimse", request={"nnunet_id": "phantom"}, models=["x"])
        jobs.store.fail(job.id, "made for the test")
        with unit_of_work(live.context.session_factory) as session:
            failed = Dispatch(
                job_id=job.id,
                destination="pacs",
                status=DispatchStatus.FAILED,
                attempts=[{"at": "2026-01-01T00:00:00", "ok": False, "error": "refused"}],
            )
            sent = Dispatch(job_id=job.id, destination="archive", status=DispatchStatus.SENT)
            session.add_all([failed, sent])
            session.flush()
            failed_id, sent_id = failed.id, sent.id

        answer = live.client.post(f"/jobs/{job.id}/dispatches/{failed_id}/retry")
        assert answer.status_code == 200, answer.text
        view = answer.json()
        assert view["id"] == failed_id
        assert view["destination"] == "pacs"
        assert any(a.get("retry") for a in view["attempts"])
        assert view["attempts"][0]["error"] == "refused"  # the history is kept

        conflict = live.client.post(f"/jobs/{job.id}/dispatches/{sent_id}/retry")
        assert conflict.status_code == 409
        assert conflict.json()["status"] == "failed"
        for path in (
            f"/jobs/{other.id}/dispatches/{failed_id}/retry",  # not that job's dispatch
            f"/jobs/{job.id}/dispatches/999/retry",
            f"/jobs/nope/dispatches/{failed_id}/retry",
        ):
            assert live.client.post(path).status_code == 404
        job_view = live.client.get(f"/jobs/{job.id}").json()
        assert {d["destination"] for d in job_view["dispatches"]} == {"pacs", "archive"}
