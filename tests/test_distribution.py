"""The distribution as a user installs it: a wheel (no editable install) in a fresh environment.

The wheel is built from a copy of the source tree, installed without dependencies into a fresh
virtual environment that sees the project's installed dependencies through a ``.pth`` line, and run
from a folder outside the repository, so nothing can come from the source checkout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "pyproject.toml",
    "README.md",
    "nnunet_node",
    "core",
    "storage",
    "inference",
    "export",
    "pipeline",
    "node",
    "api",
    "alembic",
]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(
                path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True,
        timeout=300,
    )  # fmt: skip
    (built,) = out.glob("nnunet_node-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The project's dependencies (torch, nnunetv2, ...) without copying gigabytes: a .pth line.
    # That folder's own .pth files (the editable install's finder) are not processed from here.
    import sysconfig

    (Path(purelib) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         str(wheel)],
        check=True,
        timeout=300,
    )  # fmt: skip
    return env_dir


def test_wheel_holds_one_top_level_package_and_the_migrations(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"nnunet_node", next(t for t in tops if t.endswith(".dist-info"))}
    assert "nnunet_node/alembic/env.py" in names
    assert "nnunet_node/alembic/script.py.mako" in names
    assert any(n.startswith("nnunet_node/alembic/versions/0001") for n in names)
    assert "nnunet_node/storage/archive.py" in names


def test_pip_show_lists_only_nnunet_node(fresh_env: Path) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(fresh_env / "bin" / "python"), "show",
         "-f", "nnunet-node"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    files = shown.split("Files:", 1)[1].split()
    tops = {f.split("/")[0] for f in files if not f.startswith("..")}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"nnunet_node"}, tops


def test_installed_node_migrates_and_serves(fresh_env: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NNUNET_NODE_", "PYTHON"))},
        "NNUNET_NODE_DATA": str(tmp_path / "data"),
        "MODEL_SERVE_SPEC": str(ROOT / "model-serve-spec.yaml"),
        "NNUNET_NODE_DICOM_PORT": str(_free_port()),
        "NNUNET_NODE_DICOM_HOST": "127.0.0.1",
    }
    cli = str(fresh_env / "bin" / "nnunet-node")
    python = str(fresh_env / "bin" / "python")
    where = subprocess.run(
        [python, "-c", "import nnunet_node; print(nnunet_node.__file__)"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(fresh_env)), where
    upgraded = subprocess.run(
        [cli, "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "data" / "nnunet-node.db").is_file()

    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [cli, "serve", "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
