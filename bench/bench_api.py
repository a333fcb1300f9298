"""HTTP overhead of ``POST /infer`` over the inference engine, and ``/healthz`` latency under load.

A real node (``nnunet-node serve`` in a subprocess, as deployed) answers N sequential warm
``/infer`` requests on the demo model; this process runs the same N plans through its own warm
:class:`inference.engine.InferenceEngine`. The two are interleaved (HTTP, engine, HTTP, ...) so
that the shared machine's load hits both alike. It prints

- ``http/engine``: total time of the /infer requests over total time of the engine calls (the
  job row, worker hand-off, waiting, result and JSON on top of the inference); target <= 1.15;
- ``/healthz`` p50 / p95 / max latency measured by a probe every 50 ms while the /infer
  requests ran (inference runs in the node's worker thread, never in its event loop).

    .venv/bin/python bench/bench_api.py [--n 50] [--device cpu|auto|cuda] [--probe-ms 50]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunet_node.core.phantom import make_phantom, write_nifti  # noqa: E402
from nnunet_node.inference.cache import PredictorCache  # noqa: E402
from nnunet_node.inference.device import DevicePolicy  # noqa: E402
from nnunet_node.inference.engine import InferenceEngine  # noqa: E402
from nnunet_node.inference.request import normalise  # noqa: E402
from nnunet_node.inference.spec import ModelRegistry  # noqa: E402

SPEC = REPO / "model-serve-spec.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_node(data: Path, port: int, device: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NNUNET_NODE_DATA": str(data),
        "MODEL_SERVE_SPEC": str(SPEC),
        "NNUNET_NODE_DICOM_ENABLED": "false",
        "NNUNET_NODE_DEVICE": device,
        "NNUNET_NODE_RATE_LIMIT": "0",
        "NNUNET_NODE_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "nnunet_node.cli", "serve", "--port", str(port)]
    return subprocess.Popen(command, env=env, cwd=REPO)


def _wait_ready(client: httpx.Client, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the node exited with {process.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the node did not become ready in 180 s")


class HealthProbe(threading.Thread):
    """Probe /healthz every ``period`` seconds; keep latencies of probes made while ``active``."""

    def __init__(self, url: str, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.period = period
        self.active = threading.Event()
        self.stop = threading.Event()
        self.latencies: list[float] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                if not self.active.wait(0.05):
                    continue
                started = time.perf_counter()
                answer = client.get("/healthz")
                elapsed = time.perf_counter() - started
                if answer.status_code != 200:
                    raise SystemExit(f"/healthz answered {answer.status_code}")
                if self.active.is_set():
                    self.latencies.append(elapsed)
                time.sleep(self.period)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="requests (and engine calls)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "auto", "cuda"])
    parser.add_argument(
        "--probe-ms", type=float, default=50.0, help="pause between /healthz probes (0: none)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        data = Path(tmp) / "data"
        study = data / "studies" / "s1"
        write_nifti(make_phantom(5, shape=(32, 32, 32)), study / "ct" / "image.nii.gz")
        request = {"nnunet_id": "phantom", "study_path": str(study), "series_folders": ["ct"]}

        registry = ModelRegistry.from_yaml(SPEC)
        engine = InferenceEngine(
            PredictorCache(ttl_s=3600, max_entries=4, sweep_s=3600), DevicePolicy(args.device, 0)
        )
        plan = normalise(request, registry)

        port = _free_port()
        node = _start_node(data, port, args.device)
        url = f"http://127.0.0.1:{port}"
        probe = HealthProbe(url, period=args.probe_ms / 1000)
        try:
            with httpx.Client(base_url=url, timeout=300) as client:
                _wait_ready(client, node)
                if args.probe_ms > 0:
                    probe.start()
                for i in range(2):  # warm both: model loaded, code paths imported
                    assert client.post("/infer", json=request).status_code == 200
                    engine.run(plan, study, Path(tmp) / "engine" / f"warm{i}")
                http_times: list[float] = []
                engine_times: list[float] = []
                job_times: list[float] = []
                for i in range(args.n):
                    probe.active.set()
                    started = time.perf_counter()
                    answer = client.post("/infer", json=request)
                    http_times.append(time.perf_counter() - started)
                    probe.active.clear()
                    if answer.status_code != 200 or answer.json()["status"] != "done":
                        raise SystemExit(f"/infer failed: {answer.text}")
                    job_times.append(float(answer.json()["time_elapsed"]))
                    started = time.perf_counter()
                    engine.run(plan, study, Path(tmp) / "engine" / str(i))
                    engine_times.append(time.perf_counter() - started)
        finally:
            probe.stop.set()
            probe.active.set()
            node.send_signal(signal.SIGINT)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
            if probe.is_alive():
                probe.join(5)

    total_http, total_engine = sum(http_times), sum(engine_times)
    print(
        f"device {args.device}, {args.n} sequential warm requests, "
        "demo model on a 32^3 phantom (one patch)"
    )
    print(
        f"POST /infer      total {total_http:7.2f} s  median {statistics.median(http_times):.3f} s"
    )
    print(
        f"engine.run       total {total_engine:7.2f} s  "
        f"median {statistics.median(engine_times):.3f} s"
    )
    print(
        f"job run (worker) total {sum(job_times):7.2f} s  "
        f"median {statistics.median(job_times):.3f} s  (the runner's own time_elapsed)"
    )
    ratio = total_http / total_engine
    verdict = "ok" if ratio <= 1.15 else "over target"
    print(f"http/engine      {ratio:.3f} (target <= 1.15: {verdict})")
    median_ratio = statistics.median(http_times) / statistics.median(engine_times)
    overhead_ms = (total_http - total_engine) / args.n * 1000
    print(f"                 median ratio {median_ratio:.3f}; {overhead_ms:.1f} ms per request")
    lat = [x * 1000 for x in probe.latencies]
    if lat:
        print(
            f"/healthz during /infer: {len(lat)} probes, p50 {_percentile(lat, 0.5):.1f} ms, "
            f"p95 {_percentile(lat, 0.95):.1f} ms, max {max(lat):.1f} ms"
        )


if __name__ == "__main__":
    main()
