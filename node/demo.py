"""``nnunet-node demo``: a newcomer's first minute with a running node.

Writes a phantom CT study (``core.phantom``) to a temporary folder, sends it to the node by
C-STORE, waits for the job the default routing rule makes of it (``GET /jobs?study_uid=...`` over
HTTP; straight from the database when the HTTP API is not running, as with ``nnunet-node dicom``),
and prints where the SEG and RTSTRUCT landed and how long each step took. While it waits, a
progress bar (rich) follows the job's status, stage and step.

So that the results have somewhere to go, the demo runs the rule's destination itself for the
occasion (:class:`DemoDestination`, a small storage SCP with the destination's AE title, on its
loopback host and port) and shows the SEG and RTSTRUCT arriving there. When something already
listens on that port (a PACS of your own, ``storescp``), the results go there instead.

Before anything (no phantom written, no destination started), the node must answer a C-ECHO
(PS3.4 A) as the demo will call it: otherwise one line on stderr says why, and the exit status
is 2.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from nnunet_node.core.errors import SendError
from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.core.settings import Settings
from nnunet_node.core.spec import SpecFile
from nnunet_node.node.access import is_loopback
from nnunet_node.pipeline.dispatch import send_files
from nnunet_node.pipeline.routing import Destination, RoutingTable
from nnunet_node.storage.db import make_engine, make_sessionmaker
from nnunet_node.storage.jobs import MAX_PAGE, JobFilters, JobStore

TERMINAL = {"done", "failed", "cancelled", "superseded"}
UNREACHABLE = 2
"""Exit status when the node does not answer the C-ECHO (as for the CLI's other refusals)."""
ECHO_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_S = 300.0
ARRIVAL_TIMEOUT_S = 60.0
PHANTOM_ATTRIBUTES = {"Modality": "CT", "SeriesDescription": "Phantom CT"}


@dataclass(frozen=True)
class Arrival:
    """One instance the demo destination received."""

    modality: str
    sop_instance_uid: str
    study_instance_uid: str
    calling_ae: str


class DemoDestination:
    """A small storage SCP standing in for a rule's destination during the demo: it accepts
    C-STORE of any storage SOP class (PS3.4 B) as ``destination.ae_title`` on the destination's
    host and port and remembers what arrived (nothing is written to disk)."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.arrivals: list[Arrival] = []
        self._arrived = threading.Condition()
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> bool:
        """Listen; False when the port is taken (another SCP is the destination)."""
        ae = AE(ae_title=self.destination.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        try:
            self._server = ae.start_server(
                (self.destination.host, int(self.destination.port or 0)),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            )
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: evt.Event) -> int:
        dataset = event.dataset
        arrival = Arrival(
            str(dataset.get("Modality", "")),
            str(dataset.get("SOPInstanceUID", "")),
            str(dataset.get("StudyInstanceUID", "")),
            str(event.assoc.requestor.ae_title).strip(),
        )
        with self._arrived:
            self.arrivals.append(arrival)
            self._arrived.notify_all()
        return 0x0000

    def wait_for(self, study_uid: str, modalities: set[str], timeout_s: float) -> list[Arrival]:
        """What arrived of the study once every modality in ``modalities`` did, or at
        ``timeout_s`` (another node sending to the same port does not count)."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while True:
                ours = [a for a in self.arrivals if a.study_instance_uid == study_uid]
                left = deadline - time.monotonic()
                if modalities <= {a.modality for a in ours} or left <= 0:
                    return ours
                self._arrived.wait(left)


def _demo_destinations(settings: Settings) -> list[Destination]:
    """The loopback destinations of the rules a phantom CT series matches."""
    try:
        routing = RoutingTable.from_spec(SpecFile.read(settings.model_serve_spec))
    except Exception as exc:  # the node itself reports a bad spec; the demo goes on without
        print(f"   (the spec {settings.model_serve_spec} could not be read: {exc})")
        return []
    names = {d for route in routing.matching(PHANTOM_ATTRIBUTES) for d in route.destinations}
    return [
        routing.destinations[name]
        for name in sorted(names)
        if routing.destinations[name].port is not None
        and is_loopback(routing.destinations[name].host)
    ]


def _jobs_over_http(client: httpx.Client, study_uid: str) -> list[dict[str, Any]] | None:
    try:
        response = client.get("/jobs", params={"study_uid": study_uid, "limit": 10})
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return list(response.json().get("items", []))


def _jobs_from_db(settings: Settings, study_uid: str) -> list[dict[str, Any]]:
    engine = make_engine(settings.database_url)
    try:
        jobs, _ = JobStore(make_sessionmaker(engine)).list(
            JobFilters(study_instance_uid=study_uid), limit=MAX_PAGE
        )
        return [
            {
                "job_id": j.id,
                "status": j.status.value,
                "route_name": j.route_name,
                "error": j.error,
                "progress": j.progress,
                "result": j.result,
                "artifacts": [
                    {"kind": a.kind, "path": a.path, "sop_instance_uid": a.sop_instance_uid}
                    for a in j.artifacts
                ],
                "dispatches": [
                    {"destination": d.destination, "status": d.status.value} for d in j.dispatches
                ],
            }
            for j in jobs
        ]
    finally:
        engine.dispose()


def _progress_of(job: dict[str, Any]) -> dict[str, Any]:
    """The bar's description and completed fraction from a job's ``status`` and ``progress``
    (``stage``, ``stages``, ``step``, ``fraction``)."""
    progress = job.get("progress") or {}
    status = str(job.get("status"))
    step = progress.get("step") or ""
    stages = progress.get("stages")
    stage = progress.get("stage")
    where = f" · stage {int(stage) + 1}/{stages}" if stage is not None and stages else ""
    fraction = 1.0 if status == "done" else float(progress.get("fraction") or 0.0)
    return {"description": f"{status}{where} {step}".rstrip(), "completed": fraction}


@contextlib.contextmanager
def _pynetdicom_quiet() -> Any:
    """pynetdicom's own log lines about a failed association (ERROR "unable to connect", the
    rejection's result, source and reason) held back for a moment: the demo says it in one."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def echo_node(host: str, port: int, called_ae: str, calling_ae: str) -> str | None:
    """C-ECHO the node (Verification SOP Class, PS3.4 A) as ``calling_ae``; None when it
    answers Success, else why not in a few words (the connection refused or timed out, the
    association rejected or aborted, or the status it answered)."""
    try:
        with socket.create_connection((host, port), timeout=ECHO_TIMEOUT_S):
            pass
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_TIMEOUT_S
    with _pynetdicom_quiet():
        assoc = ae.associate(host, port, ae_title=called_ae)
        if assoc.is_rejected:
            return f"the association was rejected (calling AE title {calling_ae})"
        if not assoc.is_established:
            return "the association was not accepted"
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
    code = status.get("Status") if status is not None else None
    if code is None:
        return "no answer to the C-ECHO"
    return None if code == 0x0000 else f"the C-ECHO was answered 0x{int(code):04X}"


def run_demo(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int | None = None,
    http_port: int | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    phantom_shape: tuple[int, int, int] | None = None,
) -> int:
    """Send a phantom study to the node at ``host:port`` and follow its job; 0 when it is done,
    :data:`UNREACHABLE` (2) when the node does not answer a C-ECHO first (one line on stderr,
    nothing written), 1 when the study could not be sent or its job did not end done."""
    port = port or settings.dicom_port
    http_port = http_port or settings.http_port
    calling = _calling_ae(settings)
    unreachable = echo_node(host, port, settings.ae_title, calling)
    if unreachable is not None:
        print(
            f"nnunet-node demo: the DICOM node {settings.ae_title}@{host}:{port} does not answer "
            f"a C-ECHO ({unreachable}); start it with `nnunet-node serve`, or give its --host "
            "and --port",
            file=sys.stderr,
        )
        return UNREACHABLE
    started = time.perf_counter()
    scps: list[DemoDestination] = []
    for destination in _demo_destinations(settings):
        scp = DemoDestination(destination)
        if scp.start():
            scps.append(scp)
            print(
                f"0. listening as the rule's destination {destination.name} "
                f"({destination.ae_title}@{destination.host}:{destination.port}) for the results"
            )
        else:
            print(
                f"0. something already listens at {destination.name} "
                f"({destination.host}:{destination.port}): the results go there"
            )
    try:
        return _run(settings, host, port, http_port, started, scps, timeout_s, phantom_shape)
    finally:
        for scp in scps:
            scp.stop()


def _calling_ae(settings: Settings) -> str:
    """The demo's calling AE title: with an allow-list, the first allowed one."""
    return (settings.allowed_calling_aes or ["NNUNET_DEMO"])[0]


def _run(
    settings: Settings,
    host: str,
    port: int,
    http_port: int,
    started: float,
    scps: list[DemoDestination],
    timeout_s: float,
    phantom_shape: tuple[int, int, int] | None,
) -> int:
    headers = {"X-API-Key": settings.api_key} if settings.api_key else {}

    with tempfile.TemporaryDirectory(prefix="nnunet-node-demo-") as tmp:
        study_uid = generate_uid()
        files = write_dicom_series(
            make_phantom(7, shape=phantom_shape),
            Path(tmp) / "ct",
            study_uid=study_uid,
            series_description="Phantom CT",
        )
        written = time.perf_counter()
        print(f"1. wrote a phantom CT series: {len(files)} slices ({written - started:.1f} s)")
        print(f"   StudyInstanceUID {study_uid}")

        node = Destination("node", settings.ae_title, host, port)
        try:
            report = send_files(node, files, calling_ae=_calling_ae(settings))
        except SendError as exc:
            print(f"   could not send it: {exc}. Is the node running (`nnunet-node serve`)?")
            return 1
        sent = time.perf_counter()
        print(
            f"2. sent it by C-STORE to {settings.ae_title}@{host}:{port}: "
            f"{report.sent} instances ({sent - written:.1f} s)"
        )

    print("3. waiting for the routed job (the series is complete after its quiet period) ...")
    client = httpx.Client(base_url=f"http://{host}:{http_port}", headers=headers, timeout=10)
    queued_at: float | None = None
    job: dict[str, Any] | None = None
    source = "HTTP"
    bar = Progress(
        TextColumn("   {task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
    task = bar.add_task("series quiet period", total=1.0)
    try:
        with bar:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                jobs = _jobs_over_http(client, study_uid)
                if jobs is None:
                    source = "database"
                    jobs = _jobs_from_db(settings, study_uid)
                if jobs:
                    job = jobs[0]
                    if queued_at is None:
                        queued_at = time.perf_counter()
                        bar.console.print(
                            f"   job {job['job_id']} (rule {job.get('route_name')}) queued "
                            f"{queued_at - sent:.1f} s after the last instance (read via {source})",
                            soft_wrap=True,
                        )
                    bar.update(task, **_progress_of(job))
                    if job["status"] in TERMINAL:
                        break
                time.sleep(0.5)
    finally:
        client.close()

    finished = time.perf_counter()
    if job is None:
        print("   no job was made: does a rule of the spec's `routes:` match phantom CT series?")
        return 1
    if job["status"] != "done":
        print(f"   job {job['job_id']} ended {job['status']}: {job.get('error') or 'timed out'}")
        return 1
    print(f"4. job {job['job_id']} done in {finished - (queued_at or sent):.1f} s")
    result = job.get("result") or {}
    for kind, label in (("dicom_segmentation", "DICOM-SEG"), ("dicom_struct", "RTSTRUCT")):
        for path in result.get(kind) or []:
            print(f"   {label}: {path}")
    archived = [a for a in job.get("artifacts", []) if a.get("sop_instance_uid")]
    if archived:
        print(
            f"   {len(archived)} result instance(s) also in the node's archive "
            f"({settings.archive_dir}/{study_uid}/...): find them with findscu, QIDO-RS or WADO-RS"
        )
    for scp in scps:
        arrived = scp.wait_for(study_uid, {"SEG", "RTSTRUCT"}, ARRIVAL_TIMEOUT_S)
        name = scp.destination
        if not {"SEG", "RTSTRUCT"} <= {a.modality for a in arrived}:
            print(f"5. {name.name} has not received the SEG and RTSTRUCT yet: see the node's log")
            return 1
        print(f"5. received at {name.name} ({name.ae_title}@{name.host}:{name.port}):")
        for arrival in arrived:
            print(f"   {arrival.modality} {arrival.sop_instance_uid} from {arrival.calling_ae}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0
