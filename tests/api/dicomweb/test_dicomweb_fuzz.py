"""schemathesis (a third-party API fuzzer) on the /dicom-web operations: no 500, whatever comes.

The generated path parameters are rarely UIDs of stored objects, so most answers are 400 or 404;
what matters is that none is a server error (PS3.18 answers stay 4xx for bad input).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from nnunet_node.app import create_app
from nnunet_node.core.settings import load_settings
from tests.support.dicomweb import API_KEY, Node, PhantomStudy

with tempfile.TemporaryDirectory() as _unused:
    _schema_app = create_app(load_settings(data_dir=Path(_unused), api_key=API_KEY))
    schema = schemathesis.openapi.from_dict(_schema_app.openapi()).include(path_regex="^/dicom-web")


@schema.parametrize()
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, node: Node, stored: PhantomStudy) -> None:
    response = case.call(base_url=node.url, headers={"X-API-Key": API_KEY})
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
