"""Jobs on worker processes through Celery, with real parts only.

A node in broker mode (``create_app`` served by uvicorn, its DICOM node on a free port) on a
PostgreSQL database, a throw-away ``redis-server`` as the broker, and two ``nnunet-node worker``
processes on loopback (each its own process, one torch thread, the committed demo models), all
sharing one data folder, as hosts mounting the same storage would. A dcmtk ``storescp`` stands
for the PACS that routed results go to.

Runs when ``NNUNET_NODE_TEST_POSTGRES_URL`` is set (``.ci/run`` sets it) and ``redis-server`` is
installed (``.ci/run`` installs it); under ``CI`` a missing ``redis-server`` fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.core.settings import load_settings
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.migrations import upgrade
from nnunet_node.storage.models import Instance
from tests.node.peers import received, storescp
from tests.support.cluster import REDIS_SERVER, RedisServer, WorkerProcess
from tests.support.dcmtk import storescu
from tests.support.live_node import LiveNode
from tests.support.postgres import NOT_SET, SERVER_URL, scratch_database
from tests.support.routed import routed_spec

REPO = Path(__file__).resolve().parents[2]
if os.environ.get("CI") and not REDIS_SERVER:
    raise RuntimeError("redis-server is not installed: .ci/run installs it")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SERVER_URL, reason=NOT_SET),
    pytest.mark.skipif(
        not REDIS_SERVER, reason="redis-server is not installed (.ci/run installs it)"
    ),
]

LEASE_S = 15.0
"""Short leases, so a killed worker's job is taken over within seconds; long enough that a
worker starved of CPU on a busy machine still renews its lease in time."""
SMALL = (32, 32, 32)
"""One 32^3 patch of the demo model: a job of a second or two."""
LONG = (64, 64, 64)
"""27 sliding windows: a job long enough to catch while it infers."""
INFERRING = ("load", "model", "predict")
"""Progress steps of a job whose model is loading or predicting."""
HTTP_ARGS = {"is_dicom": True, "save_rt_struct_output": True, "tta": False}


@dataclass
class Cluster:
    settings: Any
    app: Any
    client: httpx.Client
    redis: RedisServer
    workers: dict[str, WorkerProcess]
    env: dict[str, str]
    logs: Path
    pacs: Path
    dicom_port: int
    studies: Path
    sessions: Any
    made: dict[str, Path] = field(default_factory=dict)

    # --- the node's HTTP API ---------------------------------------------------------------
    def submit(self, study: Path, **extra: Any) -> str:
        body = {
            "nnunet_id": "phantom",
            "study_path": str(study),
            "series_folders": ["ct"],
            **HTTP_ARGS,
            **extra,
        }
        answer = self.client.post("/jobs", json=body)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        answer = self.client.get(f"/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def alive(self) -> dict[str, dict[str, Any]]:
        answer = self.client.get("/workers")
        assert answer.status_code == 200, answer.text
        return {w["name"]: w for w in answer.json()}

    def wait(
        self, what: str, check: Callable[[], Any], timeout: float = 180.0, step: float = 0.1
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(step)
        logs = "\n".join(f"--- {n}\n{w.tail()}" for n, w in self.workers.items())
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def wait_finished(self, job_ids: list[str], timeout: float = 300.0) -> list[dict[str, Any]]:
        def finished() -> list[dict[str, Any]] | None:
            views = [self.job(j) for j in job_ids]
            terminal = ("done", "failed", "cancelled", "superseded")
            return views if all(v["status"] in terminal for v in views) else None

        result: list[dict[str, Any]] = self.wait(f"jobs {job_ids}", finished, timeout, 0.3)
        return result

    def wait_workers(self, names: list[str]) -> None:
        self.wait(f"workers {names}", lambda: set(names) <= set(self.alive()), 180.0, 0.3)

    def start_worker(self, name: str, queues: str = "default") -> WorkerProcess:
        worker = _worker(name, queues, self.env, self.logs)
        self.workers[name] = worker
        return worker

    # --- studies ------------------------------------------------------------------------------
    def study(self, name: str, seed: int, shape: tuple[int, int, int] = SMALL) -> Path:
        """A phantom CT series at ``<studies>/<name>/ct`` (made once)."""
        if name not in self.made:
            folder = self.studies / name
            phantom = make_phantom(seed, shape=shape, spacing=(1.2, 1.2, 1.5))
            write_dicom_series(phantom, folder / "ct")
            self.made[name] = folder
        return self.made[name]

    def job_objects(self, job_id: str) -> list[str]:
        """SOP Instance UIDs of the archive's instances that a job's artifacts name."""
        view = self.job(job_id)
        uids = [a["sop_instance_uid"] for a in view["artifacts"] if a["sop_instance_uid"]]
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))
                )
            )


def _worker(name: str, queues: str, env: dict[str, str], logs: Path) -> WorkerProcess:
    log = logs / f"worker-{name.split('@')[0]}-{uuid.uuid4().hex[:6]}.log"
    return WorkerProcess(name, env, log, queues)


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    with scratch_database("nnunet_workers") as url:
        yield url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pg_database: str) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    logs = tmp / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:  # whatever started is stopped, even if set-up fails
        redis = RedisServer(tmp / "redis")
        stack.callback(redis.stop)
        redis.start()
        upgrade(pg_database)  # as `nnunet-node db upgrade` would; the node's start finds it current
        pacs_folder = tmp / "pacs"
        pacs_port = stack.enter_context(storescp(pacs_folder))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "NNUNET_NODE_DATA": str(tmp / "data"),
            "NNUNET_NODE_DB_URL": pg_database,
            "NNUNET_NODE_BROKER_URL": redis.url,
            # all models, phantom_cube in a model group: only workers listening on "cube" run it;
            # 3 s quiet: storescu on a busy machine may pause over a second
            "MODEL_SERVE_SPEC": str(
                routed_spec(tmp, pacs_port, quiet=3, models=None, queues={"phantom_cube": "cube"})
            ),
            "NNUNET_NODE_DEVICE": "cpu",
            "NNUNET_NODE_JOB_LEASE_S": str(LEASE_S),
            "NNUNET_NODE_BROKER_RESEND_S": "4",
            "NNUNET_NODE_MIN_FREE_DISK_MB": "0",
            "NNUNET_NODE_ALLOWED_ROOTS": str(tmp),
            "NNUNET_NODE_LOG_LEVEL": "INFO",
        }
        workers: dict[str, WorkerProcess] = {}

        def stop_workers() -> None:
            for worker in workers.values():
                worker.terminate()
            for worker in workers.values():
                worker.stop()

        stack.callback(stop_workers)
        for name, queues in (("a@loopback", "default,cube"), ("b@loopback", "default")):
            workers[name] = _worker(name, queues, env, logs)
        settings = load_settings(
            data_dir=tmp / "data",
            db_url=pg_database,
            broker_url=redis.url,
            model_serve_spec=env["MODEL_SERVE_SPEC"],
            device="cpu",
            job_lease_s=LEASE_S,
            broker_resend_s=4,
            min_free_disk_mb=0,
            allowed_roots=[tmp],
            dicom_host="127.0.0.1",
            dicom_port=0,
            rate_limit_per_minute=0,
        )
        node = LiveNode(settings, client_timeout=60.0)
        stack.callback(node.stop)
        node.start(timeout=180.0)
        engine = make_engine(pg_database)
        stack.callback(engine.dispose)
        cluster = Cluster(
            settings=settings,
            app=node.app,
            client=node.client,
            redis=redis,
            workers=workers,
            env=env,
            logs=logs,
            pacs=pacs_folder,
            dicom_port=node.dicom_port,
            studies=tmp / "studies",
            sessions=make_sessionmaker(engine),
        )
        cluster.wait_workers(list(workers))
        yield cluster


def _zip_names(client: httpx.Client, job_id: str) -> list[str]:
    answer = client.get(f"/download/{job_id}")
    assert answer.status_code == 200, answer.text
    return zipfile.ZipFile(io.BytesIO(answer.content)).namelist()


def test_jobs_from_http_and_cstore_run_once_on_both_workers(cluster: Cluster) -> None:
    http_jobs = [cluster.submit(cluster.study(f"http{i}", seed=20 + i)) for i in range(8)]
    routed_series = []
    for i in range(4):
        folder = cluster.study(f"routed{i}", seed=40 + i)
        storescu(cluster.dicom_port, folder / "ct", timeout=120)
        routed_series.append(folder)

    def routed_jobs() -> list[str] | None:
        page = cluster.client.get("/jobs", params={"source": "dimse", "limit": 50}).json()
        ids = [j["job_id"] for j in page["items"]]
        return ids if len(ids) == 4 else None

    routed = cluster.wait("four routed jobs", routed_jobs, 120, 0.3)
    views = cluster.wait_finished(http_jobs + routed)

    assert [v["status"] for v in views] == ["done"] * 12, [v["error"] for v in views]
    assert all(v["attempts"] == 1 for v in views)  # each ran once, nowhere else
    assert {v["worker"] for v in views} == {"a@loopback", "b@loopback"}
    for view in views:
        kinds = sorted(a["kind"] for a in view["artifacts"])
        assert kinds == ["dicom_segmentation", "dicom_struct", "nifti_prediction"], kinds
        # SEG and RTSTRUCT filed in the archive once each, by whichever worker ran the job
        assert len(cluster.job_objects(view["job_id"])) == 2
        names = _zip_names(cluster.client, view["job_id"])
        assert any(n.endswith("prediction.nii.gz") for n in names), names
    with cluster.sessions() as session:
        filed = session.scalar(select(func.count(Instance.id)).where(Instance.source == "job"))
    assert filed == 24  # 12 jobs x (SEG + RTSTRUCT): no duplicate object

    # The node dispatches routed results whichever host ran the job.
    for job_id in routed:
        cluster.wait(
            f"dispatch of {job_id}",
            lambda j=job_id: [d["status"] for d in cluster.job(j)["dispatches"]] == ["sent"],
            60,
            0.3,
        )
    assert len(received(cluster.pacs)) == 8

    alive = cluster.alive()
    done_by = {n: sum(v["worker"] == n for v in views) for n in alive}
    assert all(count >= 1 for count in done_by.values()), done_by


def test_a_second_job_for_the_same_model_does_not_load_it_again(cluster: Cluster) -> None:
    alive = cluster.alive()
    assert sum(w["jobs_done"] for w in alive.values()) == 12  # the first test's jobs
    assert max(w["jobs_done"] for w in alive.values()) >= 6
    for name in ("a@loopback", "b@loopback"):
        worker = alive[name]
        assert worker["model_loads"] == 1, worker  # one load, then warm for every later job
        assert [m["model"] for m in worker["models"]] == ["phantom"]
        assert worker["device"] == "cpu"
    assert alive["a@loopback"]["queues"] == ["default", "cube"]
    ready = cluster.client.get("/readyz").json()  # the worker processes, not the node's threads
    assert (ready["status"], ready["workers"]) == ("ok", 2)
    assert ready["broker"] == cluster.redis.url  # (no password in this one to hide)
    page = cluster.client.get("/ui/workers")  # the dashboard lists them too
    assert page.status_code == 200
    assert 'data-worker="a@loopback"' in page.text and 'data-worker="b@loopback"' in page.text


def test_model_group_queue_and_queue_position(cluster: Cluster) -> None:
    # Jobs of phantom_cube go to the "cube" queue, which only worker a takes.
    cascade = {
        "nnunet_id": ["phantom", "phantom_cube"],
        "series_folders": [["ct"], ["ct", "from:phantom"]],
        "is_dicom": False,
    }
    study = cluster.study("cube", seed=61)
    worker_a = cluster.workers["a@loopback"]
    first = cluster.submit(study, **cascade)
    cluster.wait("the first cube job to start", lambda: cluster.job(first)["status"] != "queued")
    with worker_a.paused():  # hold it mid-job while two more jobs queue behind it
        queued = [cluster.submit(study, **cascade) for _ in range(2)]
        views = [cluster.job(j) for j in queued]
        assert [v["queue"] for v in views] == ["cube", "cube"]
        assert [v["queue_position"] for v in views] == [0, 1]
        assert cluster.job(first)["queue_position"] is None
    done = cluster.wait_finished([first, *queued])
    assert [v["status"] for v in done] == ["done"] * 3, [v["error"] for v in done]
    assert {v["worker"] for v in done} == {"a@loopback"}
    assert all(v["attempts"] == 1 for v in done)


def _wait_inferring(cluster: Cluster, job_id: str) -> dict[str, Any]:
    """Wait until the job's model is loading or predicting on a worker; return the job."""

    def inferring() -> dict[str, Any] | None:
        view = cluster.job(job_id)
        assert view["status"] in ("queued", "running"), view
        running = view["status"] == "running"
        return view if running and view["progress"].get("step") in INFERRING else None

    found: dict[str, Any] = cluster.wait(f"job {job_id} to infer", inferring, 180, 0.02)
    return found


def test_progress_and_cancel_of_a_job_running_on_a_worker(cluster: Cluster) -> None:
    job_id = cluster.submit(cluster.study("long", seed=70, shape=LONG))
    view = _wait_inferring(cluster, job_id)
    holder = cluster.workers[view["worker"]]
    with holder.paused():  # frozen mid-job: the cancel lands while it runs, whatever its speed
        progress = cluster.job(job_id)["progress"]
        assert (progress["model"], progress["stage"], progress["stages"]) == ("phantom", 0, 1)
        assert 0.0 <= progress["fraction"] < 1.0
        assert cluster.alive()[holder.name]["current_job"] == job_id
        answer = cluster.client.post(f"/jobs/{job_id}/cancel")
        assert answer.status_code == 200, answer.text
        time.sleep(1.5)  # longer than the worker's interval between two reads of the row
    cluster.wait(
        "the worker to stop the job",
        lambda: cluster.alive()[holder.name]["current_job"] is None,
        120,
        0.3,
    )
    view = cluster.job(job_id)
    assert view["status"] == "cancelled"
    assert view["result"] is None and view["artifacts"] == []
    assert not list(Path(view["output_dir"]).rglob("prediction*.nii.gz"))
    # the worker takes the next job as usual
    after = cluster.submit(cluster.study("http0", seed=20))
    assert cluster.wait_finished([after])[0]["status"] == "done"


def test_a_worker_killed_mid_job_is_replaced_by_the_other(cluster: Cluster) -> None:
    job_id = cluster.submit(cluster.study("long", seed=70, shape=LONG))
    victim = cluster.workers[_wait_inferring(cluster, job_id)["worker"]]
    victim.kill()
    survivor = next(n for n in cluster.workers if n != victim.name)

    view = cluster.wait_finished([job_id])[0]
    assert view["status"] == "done", view["error"]
    assert view["worker"] == survivor
    assert view["attempts"] == 2
    kinds = sorted(a["kind"] for a in view["artifacts"])
    assert kinds == ["dicom_segmentation", "dicom_struct", "nifti_prediction"], kinds
    assert len(cluster.job_objects(job_id)) == 2  # SEG and RTSTRUCT filed once each
    assert len(list(Path(view["output_dir"]).rglob("prediction*.nii.gz"))) == 1
    cluster.wait(
        "the killed worker to drop out of /workers",
        lambda: victim.name not in cluster.alive(),
        3 * LEASE_S + 10,
        0.5,
    )
    assert survivor in cluster.alive()
    # bring it back for the tests that follow
    cluster.start_worker(victim.name, victim.queues)
    cluster.wait_workers([victim.name])


def test_jobs_queued_while_the_broker_restarts_all_run(cluster: Cluster) -> None:
    jobs = [cluster.submit(cluster.study(f"http{i}", seed=20 + i)) for i in range(5)]
    cluster.redis.restart()  # no persistence: every message it held is gone
    views = cluster.wait_finished(jobs)
    assert [v["status"] for v in views] == ["done"] * 5, [v["error"] for v in views]
    assert all(v["attempts"] == 1 for v in views)
    # and the broker serves new jobs again
    again = cluster.submit(cluster.study("http1", seed=21))
    assert cluster.wait_finished([again])[0]["status"] == "done"
