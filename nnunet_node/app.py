"""The composition root: the node's whole app, HTTP API and DICOM node wired together.

:func:`nnunet_node.api.app.create_app` builds the HTTP side and starts whatever services it is
given; ``api`` never imports ``node`` (docs/architecture.md, "Layers"), so this module, which may
import every sub-package, hands it the DIMSE service. ``nnunet-node serve`` and
``uvicorn nnunet_node.app:create_app --factory`` both start the app built here.
"""

from __future__ import annotations

from fastapi import FastAPI

from nnunet_node.api.app import create_app as create_http_app
from nnunet_node.core.settings import Settings
from nnunet_node.node.service import build_service


def create_app(settings: Settings | None = None) -> FastAPI:
    """The node's app: the HTTP API, the job workers and the DIMSE node (``dimse`` service).

    ``settings`` default to the environment. The DIMSE service honours its own settings: with
    ``NNUNET_NODE_DICOM_ENABLED`` false it opens no port but still routes STOW-RS series and
    dispatches results.
    """
    return create_http_app(settings, services=[("dimse", build_service)])
