"""A node's context in this process on the committed demo models (``model-serve-spec.yaml``,
``models/``), for the tests that run real jobs without the HTTP API: CPU, one job worker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nnunet_node.core.settings import Settings
from nnunet_node.pipeline.context import NodeContext, build_context

REPO = Path(__file__).resolve().parents[2]
DEMO_SPEC = REPO / "model-serve-spec.yaml"


@contextmanager
def demo_node(root: Path) -> Iterator[NodeContext]:
    """A started node context with its data in ``root/data``; requests may name paths under
    ``root/studies`` (``settings.allowed_roots[0]``, made here) and the data folder. Skips the
    test when the demo models are not built. Closed afterwards."""
    if not (REPO / "models").is_dir():
        pytest.skip("the demo models are not built (make demo-model)")
    (root / "studies").mkdir(parents=True, exist_ok=True)
    settings = Settings(
        data_dir=root / "data",
        model_serve_spec=DEMO_SPEC,
        allowed_roots=[root / "studies", root / "data"],
        device="cpu",
        workers=1,
        min_free_disk_mb=0,
    )
    context = build_context(settings)
    try:
        context.job_service.start()
        yield context
    finally:
        context.close()
