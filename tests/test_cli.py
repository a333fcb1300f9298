"""The command line as a user meets it: help written for users, one line naming the setting when a
port is taken, and ``nnunet-node serve`` over HTTPS with JSON logs and its docs served offline."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from nnunet_node.cli import build_parser, main
from nnunet_node.core.settings import Settings
from tests.node.peers import free_port
from tests.support.cluster import REDIS_SERVER, RedisServer
from tests.support.node_process import end_process
from tests.tls_certs import make_pki

REPO = Path(__file__).resolve().parents[1]


def test_help_is_written_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    text = parser.format_help()
    for words in ("serve", "dicom", "demo", "db", "NNUNET_SERVE_PORT", "nnunet-node demo"):
        assert words in text
    for command in ("serve", "dicom", "demo", "db"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: nnunet-node {command}")
        description = out.split("\n\n")[1]
        assert len(description.split()) >= 12, description  # a sentence or two, not a stub


@pytest.mark.parametrize(
    ("command", "variable", "taken"),
    [
        ("serve", "NNUNET_SERVE_PORT", "http"),
        ("serve", "NNUNET_NODE_DICOM_PORT", "dicom"),
        ("dicom", "NNUNET_NODE_DICOM_PORT", "dicom"),
    ],
)
def test_a_taken_port_stops_with_one_line_naming_the_setting(
    command: str,
    variable: str,
    taken: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = free_port()
        monkeypatch.setenv("NNUNET_NODE_DATA", str(tmp_path / "data"))
        monkeypatch.setenv("NNUNET_SERVE_PORT", str(port if taken == "http" else other))
        monkeypatch.setenv("NNUNET_NODE_DICOM_PORT", str(port if taken == "dicom" else other))
        assert main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert variable in err and str(port) in err and "already in use" in err


@pytest.mark.parametrize(
    ("command", "problem"), [("serve", "spec"), ("serve", "data"), ("dicom", "data")]
)
def test_a_bad_spec_or_data_folder_stops_with_one_line_and_no_traceback(
    command: str, problem: str, tmp_path: Path
) -> None:
    # `serve` found these in its app's start-up, and uvicorn logged Starlette's traceback of
    # the ConfigError (exit status 3); `dicom` showed a traceback for a data folder that is a file.
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - id: x\n    bogus: 1\n")
    data = tmp_path / "data"
    if problem == "data":
        data.write_text("a file where the data folder should be")
        spec = REPO / "model-serve-spec.yaml"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MODEL_SERVE_SPEC": str(spec),
        "NNUNET_NODE_DATA": str(data),
        "NNUNET_SERVE_PORT": str(free_port()),
        "NNUNET_NODE_DICOM_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, "-m", "nnunet_node.cli", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "ERROR" not in done.stderr, done.stderr  # uvicorn's "Application startup failed"
    last = done.stderr.strip().splitlines()[-1]
    if problem == "spec":
        assert last.startswith("nnunet-node: model-serve spec: model 'x': unknown key(s) 'bogus'")
    else:
        assert last == f"nnunet-node: NNUNET_NODE_DATA: cannot make the folder {data}: File exists"


def test_a_second_node_on_a_data_folder_in_use_stops_with_one_line(tmp_path: Path) -> None:
    """``serve`` on the data folder of a running node (other ports) stops with one line naming
    the first node, exit status 2, and the first node goes on answering. It used to start: its
    start-up put the first node's running job back in the queue (the job then ran twice, into
    one output folder) and deleted the first node's spare files under ``dicom/.incoming``, so
    that node's next C-STORE failed with 0xA701."""
    data = tmp_path / "data"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NNUNET_NODE_DATA": str(data),
        "NNUNET_NODE_DICOM_PROCESSES": "1",
        "NNUNET_NODE_DICOM_PORT": str(free_port()),
    }
    first = subprocess.Popen(
        [sys.executable, "-m", "nnunet_node.cli", "dicom"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert first.stdout is not None
        assert "listening on port" in first.stdout.readline()
        second = subprocess.run(
            [sys.executable, "-m", "nnunet_node.cli", "serve"],
            env={
                **env,
                "NNUNET_SERVE_PORT": str(free_port()),
                "NNUNET_NODE_DICOM_PORT": str(free_port()),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        assert "ERROR" not in second.stderr, second.stderr  # uvicorn's "startup failed" too
        assert second.stderr.strip().splitlines()[-1] == (
            f"nnunet-node: NNUNET_NODE_DATA: the folder {data} is in use by another node "
            f"(pid {first.pid}): stop it, or give this node a data folder of its own"
        )
        assert first.poll() is None  # the first node runs on
    finally:
        end_process(first, signal.SIGTERM)


def test_db_with_an_unknown_revision_says_so_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NNUNET_NODE_DATA", str(tmp_path / "data"))
    assert main(["db", "downgrade", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert "CommandError" not in err, err  # alembic's exception is not shown
    last = err.splitlines()[-1]  # after the log line naming the database
    assert last.startswith("nnunet-node db downgrade:") and "nonsense" in last, err


def test_worker_without_a_broker_and_a_downgrade_below_base_say_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The worker exited 1 through SystemExit; the downgrade showed alembic's "Relative revision
    # -1 didn't produce 1 migrations".
    monkeypatch.setenv("NNUNET_NODE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("NNUNET_NODE_BROKER_URL", raising=False)
    assert main(["worker"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnunet-node: worker: NNUNET_NODE_BROKER_URL is not set"), err
    assert main(["db", "downgrade"]) == 2  # a fresh database: nothing applied
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (
        "nnunet-node db downgrade: the database has no migration applied: nothing to undo"
    ), err


@pytest.mark.parametrize(
    ("command", "url", "says"),
    [
        ("db upgrade", "postgresql+psycopg://node:s3cret@/nnunet?host={tmp}&port=1", "cannot use"),
        ("serve", "postgresql+psycopg://node:s3cret@/nnunet?host={tmp}&port=1", "cannot use"),
        ("worker", "postgresql+psycopg://node:s3cret@/nnunet?host={tmp}&port=1", "cannot use"),
        ("dicom", "postgres://node:s3cret@db-host/nnunet", "is not a database URL"),
        ("db upgrade", "postgresql+psycopg2://node:s3cret@db-host/nnunet", "not installed"),
    ],
)
def test_a_database_that_cannot_be_used_stops_with_one_line_without_the_password(
    command: str, url: str, says: str, tmp_path: Path
) -> None:
    # PostgreSQL down, a mistyped dialect (`postgres://`) or a driver that is not installed gave
    # SQLAlchemy's traceback (130-190 lines; `serve` exit status 3), and `db upgrade` printed the
    # URL with its password.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NNUNET_NODE_DATA": str(tmp_path / "data"),
        "NNUNET_NODE_DB_URL": url.format(tmp=tmp_path),
        "NNUNET_NODE_BROKER_URL": "redis://127.0.0.1:1/0",
        "NNUNET_SERVE_PORT": str(free_port()),
        "NNUNET_NODE_DICOM_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, "-m", "nnunet_node.cli", *command.split()],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    out = done.stderr + done.stdout
    assert "Traceback" not in out and "s3cret" not in out, out
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nnunet-node: NNUNET_NODE_DB_URL: ") and says in last, out
    assert "node:***@" in last, last


def _log_until(command: list[str], env: dict[str, str], marker: str) -> tuple[str, str]:
    """Run ``nnunet-node <command>`` until a line holding ``marker`` appears (at most 180 s),
    then stop it with SIGINT; (that line, everything it wrote)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "nnunet_node.cli", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(180, process.kill)
    watchdog.start()
    seen = ""
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                seen = line
                break
    finally:
        rest = end_process(process)
        watchdog.cancel()
    return seen, "".join(lines) + rest


@pytest.mark.slow
@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (.ci/run does)")
def test_a_broker_password_is_never_logged(tmp_path: Path) -> None:
    # The node's and the worker's start-up lines gave NNUNET_NODE_BROKER_URL as it was, password
    # included (Celery's own banner already hid it).
    redis = RedisServer(tmp_path / "redis", password="s3cret-broker")
    redis.start()
    try:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "NNUNET_NODE_DATA": str(tmp_path / "data"),
            "MODEL_SERVE_SPEC": str(REPO / "model-serve-spec.yaml"),
            "NNUNET_NODE_BROKER_URL": redis.url,
            "NNUNET_NODE_DICOM_PORT": str(free_port()),
            "NNUNET_NODE_DICOM_PROCESSES": "1",
            "NNUNET_NODE_DEVICE": "cpu",
        }
        hidden = f"redis://:**@127.0.0.1:{redis.port}/0"
        line, out = _log_until(["dicom"], env, "jobs go to the broker")
        assert hidden in line and "s3cret" not in out, out
        # the worker connects with the password (Celery's "ready") and logs it hidden
        line, out = _log_until(["worker", "--device", "cpu", "--name", "w@test"], env, " ready.")
        assert "w@test ready." in line, out
        assert f"broker {hidden}" in out and "s3cret" not in out, out
    finally:
        redis.stop()


@pytest.mark.parametrize("peer", ["nothing listens", "an SCP that rejects the demo"])
def test_demo_without_a_node_says_so_in_one_line_and_writes_nothing(
    peer: str, tmp_path: Path
) -> None:
    # The demo wrote its phantom study and started the rule's destination SCP, then failed to
    # send (exit status 1, after several lines and pynetdicom's errors).
    port = free_port()
    server = None
    if peer != "nothing listens":
        scp = AE(ae_title="SOMEONE_ELSE")
        scp.require_called_aet = True  # the demo calls NNUNET_NODE: rejected
        scp.add_supported_context(Verification)
        server = scp.start_server(("127.0.0.1", port), block=False)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TMPDIR": str(scratch),  # where the demo writes its phantom study
        "NNUNET_NODE_DATA": str(tmp_path / "data"),
        "NNUNET_NODE_AE_TITLE": "NNUNET_NODE",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nnunet_node.cli", "demo", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if server is not None:
            server.shutdown()
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""  # not a step begun: no phantom, no destination SCP
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        f"nnunet-node demo: the DICOM node NNUNET_NODE@127.0.0.1:{port} does not answer a C-ECHO ("
    )
    reason = "Connection refused" if peer == "nothing listens" else "the association was rejected"
    assert reason in lines[0] and "nnunet-node serve" in lines[0]
    assert list(scratch.iterdir()) == []


def test_settings_name_the_missing_tls_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NNUNET_NODE_TLS_CERT"):
        Settings(data_dir=tmp_path, dicom_tls_port=2762)
    with pytest.raises(ValueError, match="NNUNET_NODE_TLS_CA"):
        Settings(data_dir=tmp_path, tls_ca=tmp_path / "absent.crt")


def docker_healthcheck(env: dict[str, str]) -> int:
    """Run the Dockerfile's ``HEALTHCHECK`` command as Docker would (``/bin/sh -c``), with
    ``env`` as the container's environment and this interpreter as its ``python`` (the check
    uses the standard library only); its exit status (0: healthy)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("HEALTHCHECK "))
    command = line.split(" CMD ", 1)[1].strip()
    assert command.startswith("python ")
    command = f"'{sys.executable}' " + command.removeprefix("python ")
    done = subprocess.run(
        ["/bin/sh", "-c", command], env={"PATH": os.environ["PATH"], **env}, capture_output=True
    )
    return done.returncode


def test_the_compose_worker_does_not_inherit_the_http_health_check() -> None:
    # The worker runs the node's image, whose HEALTHCHECK asks the HTTP API that a worker does
    # not serve: docker compose showed it unhealthy forever.
    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert services["worker"]["command"][:2] == ["nnunet-node", "worker"]
    assert services["worker"]["healthcheck"] == {"disable": True}
    assert "healthcheck" not in services["node"]  # the image's own, which the worker waits for
    assert services["worker"]["depends_on"]["node"] == {"condition": "service_healthy"}


@contextmanager
def https_node(tmp: Path) -> Iterator[tuple[str, ssl.SSLContext, list[str]]]:
    """``nnunet-node serve`` in a subprocess: HTTPS, JSON logs, no DICOM port; yields its URL,
    a context trusting its CA and a list that holds its log lines once the block has ended."""
    pki = make_pki(tmp / "pki")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NNUNET_NODE_DATA": str(tmp / "data"),
        "MODEL_SERVE_SPEC": str(REPO / "model-serve-spec.yaml"),
        "NNUNET_SERVE_PORT": str(port),
        "NNUNET_NODE_DICOM_ENABLED": "false",
        "NNUNET_NODE_HTTPS": "true",
        "NNUNET_NODE_TLS_CERT": str(pki.server.cert),
        "NNUNET_NODE_TLS_KEY": str(pki.server.key),
        "NNUNET_NODE_LOG_FORMAT": "json",
        "NNUNET_NODE_DEVICE": "cpu",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "nnunet_node.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"https://localhost:{port}"
    trust = ssl.create_default_context(cafile=str(pki.ca))
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz", verify=trust, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                out = process.communicate()[0]
                pytest.fail(f"nnunet-node serve did not start over HTTPS:\n{out}")
            time.sleep(0.5)
        yield url, trust, lines
    finally:
        lines.extend(end_process(process).splitlines())


@pytest.mark.slow
def test_serve_over_https_with_json_logs_and_offline_docs(tmp_path: Path) -> None:
    with https_node(tmp_path) as (url, ca, lines):
        with httpx.Client(base_url=url, verify=ca, timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            docs = client.get("/docs")
            assert docs.status_code == 200
            assert "cdn" not in docs.text.lower()
            assert "/docs-assets/swagger-ui-bundle.js" in docs.text
            script = client.get("/docs-assets/swagger-ui-bundle.js")
            assert script.status_code == 200 and "SwaggerUIBundle" in script.text
            assert client.get("/docs-assets/swagger-ui.css").status_code == 200
            assert client.get("/openapi.json").json()["info"]["title"] == "nnunet-node"
            for _ in range(3):
                client.get("/healthz")
            assert client.get("/jobs").status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on the port
            httpx.get(url.replace("https", "http") + "/healthz", timeout=5)
        # The Docker image's health check passes against a node serving HTTPS (it asked
        # http:// whatever NNUNET_NODE_HTTPS said, so such a container was never healthy)
        port = url.rsplit(":", 1)[1]
        assert docker_healthcheck({"NNUNET_SERVE_PORT": port, "NNUNET_NODE_HTTPS": "true"}) == 0
        assert docker_healthcheck({"NNUNET_SERVE_PORT": port}) != 0  # http:// to the TLS port
    assert docker_healthcheck({"NNUNET_SERVE_PORT": port, "NNUNET_NODE_HTTPS": "true"}) != 0
    records = [json.loads(line) for line in lines if line.strip()]  # every line is JSON
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = [str(r["message"]) for r in records]
    assert any("node ready" in m for m in messages), messages
    # uvicorn's start and stop lines under "uvicorn", not its logger's name "uvicorn.error"
    assert {"uvicorn"} == {r["logger"] for r in records if "Application startup" in r["message"]}
    assert not [r for r in records if r["logger"] == "uvicorn.error"], records
    assert not any("/healthz" in m or "/readyz" in m for m in messages), messages
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], records
