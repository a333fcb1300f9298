"""schemathesis (a third-party API fuzzer) against the app's own OpenAPI schema: no 500, ever.

It generates requests for every operation from the schema the app publishes and sends them to a
live node, checking each answer against the schema (status codes, content types, bodies) and that
none is a server error. The examples per operation are few so the suite stays quick; inference
requests it generates name models and paths that do not exist, so they are refused (400) before
any job runs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from nnunet_node.app import create_app
from nnunet_node.core.settings import load_settings

KEY = "fuzz-key"

# The schema is taken from an app that is built but not started (building starts nothing), so
# that operations become test cases at collection time; requests go to the live node below.
with tempfile.TemporaryDirectory() as _unused:
    _schema_app = create_app(load_settings(data_dir=Path(_unused), api_key=KEY))
    # DICOMweb (/dicom-web) has its own tests (tests/api/dicomweb/).
    schema = schemathesis.openapi.from_dict(_schema_app.openapi()).exclude(path_regex="^/dicom-web")


@pytest.fixture(scope="module")
def fuzzed_node(tmp_path_factory: pytest.TempPathFactory, make_node: Any) -> Iterator[Any]:
    data: Path = tmp_path_factory.mktemp("fuzz")
    with make_node(data, api_key=KEY, max_upload_mb=1, max_extract_mb=1) as live:
        yield live


@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_answers_match_the_schema(case: Any, fuzzed_node: Any) -> None:
    # Every other check runs; a schema-valid body may still name a model or folder that does not
    # exist, so "schema-valid requests are accepted" cannot hold for /infer, /jobs, /infer_file.
    case.call_and_validate(
        base_url=fuzzed_node.url,
        headers={"X-API-Key": KEY},
        excluded_checks=[positive_data_acceptance],
    )
