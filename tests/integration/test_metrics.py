"""``/metrics`` of a whole node after real traffic: storescu sends a phantom CT series, the rule
runs the demo model and the dispatcher sends SEG and RTSTRUCT to a storescp; findscu queries,
and QIDO-RS, WADO-RS and STOW-RS requests follow. The scrape is parsed with prometheus-client's
own parser and every count is checked against what happened (counters are process-wide, so
counts are taken as the difference from a scrape before the traffic)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.storage.models import Instance, Job, JobStatus
from tests.node.peers import free_port, storescp
from tests.support.dcmtk import dcmtk

pytestmark = pytest.mark.slow

KEY = "metrics-test-key"
SCU = "METRICS_SCU"


def scrape(node: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: (name, sorted labels) -> value."""
    answer = node.client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum over the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, sample_labels), v in samples.items()
        if n == name and labels.items() <= dict(sample_labels).items()
    )


@pytest.fixture(scope="module")
def traffic(
    tmp_path_factory: pytest.TempPathFactory, make_full_node: Callable[..., Any]
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("metrics")
    pacs_port = free_port()
    node = make_full_node(tmp, pacs_port, api_key=KEY).start()
    try:
        with storescp(tmp / "pacs", port=pacs_port):
            before = scrape(node)
            files = write_dicom_series(make_phantom(5, shape=(32, 32, 32)), tmp / "ct")
            sent = dcmtk(
                "storescu", "-aet", SCU, "-aec", "NNUNET_NODE", "127.0.0.1",
                str(node.dicom_port), *map(str, files),
            )  # fmt: skip
            assert sent.returncode == 0, sent.stdout

            def finished_job() -> Any:
                with node.context.session_factory() as session:
                    job = session.scalars(select(Job)).first()
                    if job is None or job.status not in (JobStatus.DONE, JobStatus.FAILED):
                        return None
                    if any(d.status.value == "pending" for d in job.dispatches):
                        return None
                    return job

            job = node.wait_for(finished_job)
            assert job.status == JobStatus.DONE, job.error
            found = dcmtk(
                "findscu", "-S", "-aet", SCU, "-aec", "NNUNET_NODE",
                "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                "127.0.0.1", str(node.dicom_port),
            )  # fmt: skip
            assert found.returncode == 0, found.stdout
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
            study, series = header.StudyInstanceUID, header.SeriesInstanceUID
            assert node.client.get("/dicom-web/studies").status_code == 200
            assert node.client.get(f"/dicom-web/studies/{study}/series").status_code == 200
            metadata = node.client.get(f"/dicom-web/studies/{study}/series/{series}/metadata")
            assert metadata.status_code == 200
            # STOW-RS of one instance of another (unrouted) series
            other = write_dicom_series(
                make_phantom(6, shape=(32, 32, 32)), tmp / "other", series_description="Other"
            )
            boundary = "metricsboundary"
            body = (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + other[0].read_bytes()
                + f"\r\n--{boundary}--\r\n".encode()
            )
            stored = node.client.post(
                "/dicom-web/studies",
                content=body,
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; '
                    f"boundary={boundary}"
                },
            )
            assert stored.status_code == 200, stored.text
            after = scrape(node)
        with node.context.session_factory() as session:
            scu_bytes = session.scalar(
                select(func.sum(Instance.size_bytes)).where(Instance.calling_ae == SCU)
            )
        yield {
            "node": node,
            "before": before,
            "after": after,
            "files": files,
            "job": job,
            "scu_bytes": scu_bytes,
            "transfer_syntax": str(header.file_meta.TransferSyntaxUID),
        }
    finally:
        node.stop()


def delta(traffic: dict[str, Any], name: str, **labels: str) -> float:
    return value(traffic["after"], name, **labels) - value(traffic["before"], name, **labels)


def test_metrics_need_the_key_unless_public(traffic: dict[str, Any]) -> None:
    node = traffic["node"]
    bare = node.client.get("/metrics", headers={"X-API-Key": ""})
    assert bare.status_code == 401
    assert "Bearer" in bare.headers["www-authenticate"]
    bearer = node.client.get(
        "/metrics", headers={"X-API-Key": "", "Authorization": f"Bearer {KEY}"}
    )
    assert bearer.status_code == 200


def test_instances_received_by_calling_ae_and_transfer_syntax(traffic: dict[str, Any]) -> None:
    n = len(traffic["files"])
    assert n == 32
    name = "nnunet_node_instances_received_total"
    labels = {"source": "dimse", "calling_ae": SCU}
    assert value(traffic["after"], name, **labels, transfer_syntax=traffic["transfer_syntax"]) == n
    assert total(traffic["after"], name, **labels) == n
    assert (
        value(traffic["after"], "nnunet_node_received_bytes_total", **labels)
        == (traffic["scu_bytes"])
    )
    # the job's SEG and RTSTRUCT were filed too
    assert (
        total(traffic["after"], name, source="job") - total(traffic["before"], name, source="job")
        == 2
    )
    assert (
        total(traffic["after"], name, source="stow") - total(traffic["before"], name, source="stow")
        == 1
    )


def test_dimse_counts_and_latency_histograms(traffic: dict[str, Any]) -> None:
    n = len(traffic["files"])
    assert (
        delta(traffic, "nnunet_node_dimse_requests_total", service="C-STORE", outcome="success")
        == n
    )
    assert delta(traffic, "nnunet_node_dimse_request_seconds_count", service="C-STORE") == n
    assert delta(traffic, "nnunet_node_dimse_request_seconds_sum", service="C-STORE") > 0
    assert (
        delta(traffic, "nnunet_node_dimse_requests_total", service="C-FIND", outcome="success") == 1
    )
    assert delta(traffic, "nnunet_node_dimse_request_seconds_count", service="C-FIND") == 1
    le_inf = delta(
        traffic, "nnunet_node_dimse_request_seconds_bucket", service="C-STORE", le="+Inf"
    )
    assert le_inf == n


def test_dicomweb_counts_and_latency(traffic: dict[str, Any]) -> None:
    assert delta(traffic, "nnunet_node_dicomweb_requests_total", service="qido", status="200") == 2
    assert delta(traffic, "nnunet_node_dicomweb_requests_total", service="wado", status="200") == 1
    assert delta(traffic, "nnunet_node_dicomweb_requests_total", service="stow", status="200") == 1
    for service, n in (("qido", 2), ("wado", 1), ("stow", 1)):
        assert delta(traffic, "nnunet_node_dicomweb_request_seconds_count", service=service) == n


def test_job_stage_and_dispatch_metrics(traffic: dict[str, Any]) -> None:
    assert (
        delta(traffic, "nnunet_node_job_duration_seconds_count", model="phantom", outcome="done")
        == 1
    )
    for step in ("load", "model", "predict", "write", "dicom_export"):
        assert (
            delta(traffic, "nnunet_node_stage_step_seconds_count", model="phantom", step=step) == 1
        ), step
    assert (
        delta(traffic, "nnunet_node_dispatch_attempts_total", destination="PACS", outcome="sent")
        == 1
    )
    after = traffic["after"]
    assert value(after, "nnunet_node_jobs", status="done") == 1
    assert value(after, "nnunet_node_job_queue_depth") == 0
    assert value(after, "nnunet_node_jobs_running") == 0


def test_state_read_at_scrape_time(traffic: dict[str, Any]) -> None:
    after = traffic["after"]
    # 32 CT slices, the job's SEG and RTSTRUCT, the STOW instance
    assert value(after, "nnunet_node_index_entries", level="instances") == 32 + 2 + 1
    assert value(after, "nnunet_node_index_entries", level="studies") == 2
    # one unit per metric: the archive's bytes are their own gauge, not an "index entries" level
    assert value(after, "nnunet_node_archive_bytes") > 32 * 1000
    text = traffic["node"].client.get("/metrics").text
    assert 'nnunet_node_index_entries{level="bytes"}' not in text
    assert value(after, "nnunet_node_model_cache_loads_total") == 1
    assert value(after, "nnunet_node_model_cache_entries") == 1
    assert value(after, "nnunet_node_data_free_bytes") > 0
    # the GPU gauges exist even where there is no GPU (no samples then)
    assert "# TYPE nnunet_node_gpu_memory_used_bytes gauge" in text
