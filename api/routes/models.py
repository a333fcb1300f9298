"""The model registry and the predictor cache: ``/model_info``, ``/request-params``, ``/expire``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from nnunet_node.api.deps import ContextDep
from nnunet_node.inference.request import InferenceRequest

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["models"])


@router.get("/model_info")
def model_info(context: ContextDep) -> dict[str, Any]:
    """The models of the spec, with the folds, checkpoints and labels found on disk."""
    return context.spec.registry.info()


@router.get("/request-params")
def request_params() -> dict[str, Any]:
    """The JSON schema of the /infer request body (InferenceRequest)."""
    return InferenceRequest.model_json_schema()


@router.get("/expire")
def expire(context: ContextDep) -> dict[str, Any]:
    """Empty the model cache now (every loaded predictor, not only expired ones)."""
    dropped = context.inference_engine.cache.clear()
    LOGGER.info("model cache emptied: %d predictor(s) dropped", dropped)
    return {"status": "ok", "message": f"model cache emptied ({dropped} predictor(s) dropped)"}
