"""DICOMweb (PS3.18) over the node's archive: STOW-RS, QIDO-RS and WADO-RS under ``/dicom-web``.

``router`` carries the ``/dicom-web`` prefix; the app factory includes it behind the API key
dependency (``api.deps.require_api_key``), which also takes ``Authorization: Bearer <key>`` as
OHIF sends it.
"""

from __future__ import annotations

from fastapi import APIRouter

from nnunet_node.api.dicomweb import qido, stow, wado
from nnunet_node.api.dicomweb.common import PREFIX

router = APIRouter(prefix=PREFIX, tags=["dicomweb"])
router.include_router(qido.router)
router.include_router(stow.router)
router.include_router(wado.router)

__all__ = ["router"]
