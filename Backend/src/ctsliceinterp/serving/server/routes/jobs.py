"""/v1/jobs: submit (POST), status with long-poll (GET /{id}), result (GET /{id}/result) and
cancel/delete (DELETE /{id}). The router's token check runs before any of them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from fastapi import APIRouter, Depends, Request
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response

from ..auth import require_token
from ..errors import ApiError
from ..intake import ClientGone, receive_job
from ..jobs import DONE, FINISHED, Job, QueueFull
from ..results import result_response
from ..state import ServerState, server_state

log = logging.getLogger("ctsliceinterp.serving.server")

router = APIRouter(prefix="/v1/jobs", dependencies=[Depends(require_token)])

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MAX_STATUS_WAIT = 10.0


def find_job(job_id: str, state: ServerState) -> Job:
    if not JOB_ID.match(job_id):
        raise ApiError(400, "malformed job id")
    job = state.manager.get(job_id)
    if job is None:
        raise ApiError(404, "no such job: it finished and was downloaded, expired, was deleted, or the server restarted")
    return job


@router.post("", status_code=202)
async def submit(request: Request, state: ServerState = Depends(server_state)):
    try:
        intake = await receive_job(request, state)
    except ClientGone:
        log.info("client disconnected during an upload; nothing was kept")
        return Response(status_code=400)  # nobody is listening
    try:
        job = state.manager.submit(intake.volume, intake.request, intake.target, intake.samples)
    except QueueFull as exc:
        raise ApiError(503, f"{exc}; retry later", {"Retry-After": str(exc.retry_after)}) from None
    return JSONResponse(
        {"id": job.id, "state": job.state, "status_url": f"/v1/jobs/{job.id}", "result_url": f"/v1/jobs/{job.id}/result"},
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.get("/{job_id}")
async def job_status(job_id: str, wait: float = 0.0, state: ServerState = Depends(server_state)):
    """``wait`` (s, at most 10): hold the answer until the job's state or progress changes."""
    job = find_job(job_id, state)
    if wait > 0 and job.state not in FINISHED:
        await _wait_for_change(job, state, min(wait, MAX_STATUS_WAIT))
    return state.manager.status(job)


async def _wait_for_change(job: Job, state: ServerState, seconds: float) -> None:
    snapshot = (job.state, job.stage, job.done)
    loop, changed = asyncio.get_running_loop(), asyncio.Event()

    def wake() -> None:  # called from the worker thread: no polling, no lag
        try:
            loop.call_soon_threadsafe(changed.set)
        except RuntimeError:  # the event loop is closing
            pass

    state.manager.watch(job, wake)
    try:
        if (job.state, job.stage, job.done) == snapshot:  # nothing changed before we listened
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), seconds)
    finally:
        state.manager.unwatch(job, wake)


@router.get("/{job_id}/result")
async def job_result(job_id: str, part: str = "volume", encoding: str = "gzip", state: ServerState = Depends(server_state)):
    job = find_job(job_id, state)
    if part not in ("volume", "uncertainty"):
        raise ApiError(400, "part must be 'volume' or 'uncertainty'")
    if encoding not in ("gzip", "raw"):
        raise ApiError(400, "encoding must be 'gzip' or 'raw'")
    if job.state != DONE:
        detail = f": {job.error}" if job.error else ""
        raise ApiError(409, f"the job is {job.state}{detail}; no result to download")
    volume = state.manager.result_part(job, part)
    if volume is None:
        if part == "uncertainty":
            raise ApiError(404, "this job has no uncertainty volume (ask for samples 2 or more with a diffusion method)")
        raise ApiError(404, "the result is no longer available")
    return result_response(volume, part, encoding, BackgroundTask(state.manager.mark_downloaded, job, part))


@router.delete("/{job_id}")
async def job_delete(job_id: str, state: ServerState = Depends(server_state)):
    job = find_job(job_id, state)
    state.manager.cancel(job)
    return {"id": job.id, "state": job.state}
