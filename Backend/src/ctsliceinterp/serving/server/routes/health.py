"""/v1/health (open, for load-balancer probes) and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .... import __version__
from ..auth import require_token
from ..state import ServerState, server_state

router = APIRouter(prefix="/v1")


@router.get("/health")
async def health(state: ServerState = Depends(server_state)):
    config = state.config
    return {
        "status": "ok",
        "version": __version__,
        "device": state.registry.device,
        "queue": state.manager.counts(),
        "max_upload_bytes": config.max_upload_bytes,
        "max_input_voxels": config.max_input_voxels,
        "auth": config.token is not None,
    }


@router.get("/models", dependencies=[Depends(require_token)])
async def models(state: ServerState = Depends(server_state)):
    return {"models": state.registry.describe()}
