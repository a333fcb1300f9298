"""Jobs through Celery workers against the in-process runner, in the same run.

Runs N jobs of the demo model (``phantom``, a 32^3 DICOM phantom, SEG and RTSTRUCT written and
filed in the archive) three ways, each process with one torch thread:

1. in-process: the node's own worker thread (``NNUNET_NODE_WORKERS=1``, no broker), the baseline;
2. through a throw-away ``redis-server`` to one ``nnunet-node worker`` process;
3. the same with two worker processes.

Prints jobs per minute of each, the ratio two workers / one worker (close to 2 on a machine with
two free cores), and the queue's added latency per job: K jobs submitted one at a time, each
awaited before the next, through the broker against in-process (submit to ``done`` as the
database shows it). The database is a SQLite file that all processes share (one host; several
hosts need PostgreSQL: ``--db-url``). Needs ``redis-server`` on the PATH.

    .venv/bin/python bench/bench_workers.py [--jobs 20] [--latency-jobs 5] [--db-url URL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from nnunet_node.core.phantom import make_phantom, write_dicom_series  # noqa: E402
from nnunet_node.core.settings import Settings, load_settings  # noqa: E402
from nnunet_node.pipeline.context import NodeContext, build_context  # noqa: E402
from nnunet_node.storage.migrations import upgrade  # noqa: E402
from nnunet_node.storage.models import JobStatus  # noqa: E402
from nnunet_node.storage.workers import WorkerStore  # noqa: E402
from tests.support.cluster import REDIS_SERVER, RedisServer, WorkerProcess  # noqa: E402

REQUEST = {"nnunet_id": "phantom", "series_folders": ["ct"], "is_dicom": True,
           "save_rt_struct_output": True, "tta": False}  # fmt: skip


def settings_for(root: Path, db_url: str, broker_url: str | None) -> Settings:
    return load_settings(
        data_dir=root / "data",
        db_url=db_url,
        broker_url=broker_url,
        model_serve_spec=REPO / "model-serve-spec.yaml",
        device="cpu",
        min_free_disk_mb=0,
        allowed_roots=[root],
        workers=1,
        dicom_enabled=False,
    )


def wait_done(context: NodeContext, job_ids: list[str], timeout: float = 1800.0) -> None:
    store = context.job_service.store
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending:
        for job_id in list(pending):
            status = store.status(job_id)
            if status == JobStatus.DONE:
                pending.discard(job_id)
            elif status in (JobStatus.FAILED, JobStatus.CANCELLED):
                raise SystemExit(f"job {job_id} {status.value}: {store.get(job_id).error}")
        if time.monotonic() > deadline:
            raise SystemExit(f"jobs not done after {timeout:.0f} s: {sorted(pending)}")
        time.sleep(0.05)  # light polling: the in-process runner shares this process


def run_batch(context: NodeContext, study: Path, n: int) -> float:
    """Submit ``n`` jobs at once; seconds until the last is done."""
    started = time.perf_counter()
    ids = [context.job_service.submit({**REQUEST, "study_path": str(study)}) for _ in range(n)]
    wait_done(context, ids)
    return time.perf_counter() - started


def run_sequential(context: NodeContext, study: Path, k: int) -> float:
    """Submit ``k`` jobs one at a time, each awaited; mean seconds per job."""
    total = 0.0
    for _ in range(k):
        started = time.perf_counter()
        job_id = context.job_service.submit({**REQUEST, "study_path": str(study)})
        wait_done(context, [job_id])
        total += time.perf_counter() - started
    return total / k


class Workers:
    """``count`` ``nnunet-node worker`` processes with one torch thread each."""

    def __init__(self, root: Path, settings: Settings, count: int) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "NNUNET_NODE_DATA": str(settings.data_dir),
            "NNUNET_NODE_DB_URL": settings.database_url,
            "NNUNET_NODE_BROKER_URL": str(settings.broker_url),
            "MODEL_SERVE_SPEC": str(settings.model_serve_spec),
            "NNUNET_NODE_ALLOWED_ROOTS": str(root),
            "NNUNET_NODE_MIN_FREE_DISK_MB": "0",
            "NNUNET_NODE_LOG_LEVEL": "WARNING",
        }
        self.names = [f"bench{i}-{os.getpid()}@{socket.gethostname()}" for i in range(count)]
        self.processes = [
            WorkerProcess(name, env, root / f"{name.split('@')[0]}.log") for name in self.names
        ]
        self.store = WorkerStore(build_sessions(settings))

    def wait_alive(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while {w.name for w in self.store.alive(60)} < set(self.names):
            if time.monotonic() > deadline or not all(p.running for p in self.processes):
                raise SystemExit("the workers did not start (see their logs)")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.stop(timeout=60)


def build_sessions(settings: Settings):  # type: ignore[no-untyped-def]
    from nnunet_node.storage.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings.database_url))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--latency-jobs", type=int, default=5)
    parser.add_argument("--db-url", default=None, help="default: a SQLite file in a temp folder")
    args = parser.parse_args()
    if not REDIS_SERVER:
        raise SystemExit("redis-server is not installed")
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    db_url = args.db_url or f"sqlite:///{root / 'node.db'}"
    upgrade(db_url)
    study = root / "study"
    write_dicom_series(make_phantom(5, shape=(32, 32, 32)), study / "ct")
    redis = RedisServer(root / "redis")
    redis.start()
    broker_url = redis.url
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()} at the start")
    try:
        # 1. in-process, the baseline
        context = build_context(settings_for(root, db_url, None))
        context.job_service.start()
        try:
            run_sequential(context, study, 1)  # load the model once: every mode runs warm
            inproc_batch = run_batch(context, study, args.jobs)
            inproc_latency = run_sequential(context, study, args.latency_jobs)
        finally:
            context.close()

        results: dict[int, float] = {}
        broker_latency = 0.0
        settings = settings_for(root, db_url, broker_url)
        context = build_context(settings)
        context.job_service.start()
        try:
            for count in (1, 2):
                workers = Workers(root, settings, count)
                try:
                    workers.wait_alive()
                    run_batch(context, study, count)  # warm each worker's cache (one load each)
                    results[count] = run_batch(context, study, args.jobs)
                    if count == 1:
                        broker_latency = run_sequential(context, study, args.latency_jobs)
                finally:
                    workers.stop()
        finally:
            context.close()
    finally:
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)

    def per_minute(seconds: float) -> float:
        return args.jobs / seconds * 60

    print(f"{args.jobs} jobs of the demo model (32^3 DICOM phantom, SEG + RTSTRUCT), warm models:")
    print(f"  in-process, 1 thread     {per_minute(inproc_batch):7.1f} jobs/min")
    print(f"  broker, 1 worker         {per_minute(results[1]):7.1f} jobs/min")
    print(f"  broker, 2 workers        {per_minute(results[2]):7.1f} jobs/min")
    print(f"  2 workers / 1 worker     {results[1] / results[2]:7.2f}x")
    print(f"  1 worker / in-process    {inproc_batch / results[1]:7.2f}x")
    print(f"latency of one job at a time ({args.latency_jobs} jobs, submit to done):")
    print(f"  in-process               {inproc_latency * 1000:7.0f} ms")
    print(f"  broker, 1 worker         {broker_latency * 1000:7.0f} ms")
    print(f"  added by the queue       {(broker_latency - inproc_latency) * 1000:7.0f} ms per job")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
