"""The FastAPI application: endpoints under /v1, JSON errors everywhere.

Every error a client can cause is a 4xx with ``{"error": "<what is wrong>"}``; a 500 means a bug
(and is logged without any voxel data). Nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import zlib
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from ... import __version__
from ...core.errors import CTSliceInterpError
from ..nrrd_bytes import little_endian_array, nrrd_header, volume_from_nrrd_bytes
from ...api import CLASSICAL_FALLBACK, DIFFUSION_METHOD, target_geometry
from .auth import token_matches
from .config import ServerConfig
from .jobs import DONE, FINISHED, Job, JobManager, QueueFull
from .models import ModelRegistry
from .params import parse_params, request_from_params
from .upload import UploadStalled, UploadTooLarge, content_length, read_body, split_multipart

log = logging.getLogger("ctsliceinterp.serving.server")

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
PARAMS_HEADER = "x-ctsliceinterp-params"
NRRD_TYPES = ("application/x-nrrd", "application/octet-stream", "application/nrrd")
STREAM_CHUNK = 256 * 1024  # fastest of 64 KiB..8 MiB on loopback: each chunk fits the socket buffer, so asyncio sends it without buffering a copy
GZIP_SLICE = 4 * 1024 * 1024  # compressed in a worker thread slice by slice, and sent as it comes
MAX_STATUS_WAIT = 10.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(config: ServerConfig, registry: Optional[ModelRegistry] = None) -> FastAPI:
    registry = registry or ModelRegistry(config.models, config.device)
    manager = JobManager(config, registry)
    uploads = asyncio.Semaphore(max(1, config.max_concurrent_uploads))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        try:
            yield
        finally:
            manager.stop()

    app = FastAPI(title="CTSliceInterp", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.manager, app.state.registry = config, manager, registry

    # --- errors as JSON ---------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, "invalid request: " + "; ".join(str(e.get("msg")) for e in exc.errors())[:300])

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return error_response(500, "internal server error")

    # --- helpers ----------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        if not token_matches(config.token, request.headers.get("authorization")):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    def find_job(job_id: str) -> Job:
        if not JOB_ID.match(job_id):
            raise ApiError(400, "malformed job id")
        job = manager.get(job_id)
        if job is None:
            raise ApiError(404, "no such job: it finished and was downloaded, expired, was deleted, or the server restarted")
        return job

    # --- endpoints --------------------------------------------------------------------------
    @app.get("/v1/health")
    async def health():
        return {
            "status": "ok",
            "version": __version__,
            "device": registry.device,
            "queue": manager.counts(),
            "max_upload_bytes": config.max_upload_bytes,
            "max_input_voxels": config.max_input_voxels,
            "auth": config.token is not None,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"models": registry.describe()}

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request):
        authorize(request)  # before reading a byte of the body
        try:
            declared = content_length(request)
        except CTSliceInterpError as exc:
            raise ApiError(400, str(exc)) from None
        if declared is not None and declared > config.max_upload_bytes:
            raise ApiError(413, too_large_message(), {"Connection": "close"})
        retry_after = manager.queue_full()
        if retry_after is not None:
            raise ApiError(503, "the job queue is full; retry later", {"Retry-After": str(retry_after), "Connection": "close"})
        content_type = request.headers.get("content-type", "application/octet-stream")  # the boundary is case-sensitive
        multipart = content_type.lower().startswith("multipart/form-data")
        if not multipart and content_type.split(";")[0].strip().lower() not in NRRD_TYPES:
            raise ApiError(415, f"unsupported Content-Type {content_type[:60]!r}: send NRRD bytes (application/x-nrrd) or multipart/form-data")
        async with uploads:
            try:
                body = await read_body(request, config.max_upload_bytes, config.upload_idle_timeout_seconds)
            except UploadTooLarge:
                raise ApiError(413, too_large_message(), {"Connection": "close"}) from None
            except UploadStalled:
                raise ApiError(408, f"the upload stalled for {config.upload_idle_timeout_seconds:g} s", {"Connection": "close"}) from None
            except ClientDisconnect:
                log.info("client disconnected during an upload; nothing was kept")
                return Response(status_code=400)  # nobody is listening
        try:
            if multipart:
                parts = split_multipart(body, content_type)
                if "volume" not in parts:
                    raise ApiError(400, "multipart upload without a 'volume' part (the NRRD file)")
                data, params_text = parts["volume"], parts.get("params")
            else:
                data, params_text = body, request.headers.get(PARAMS_HEADER) or request.query_params.get("params")
            del body
            default_method = DIFFUSION_METHOD if registry.default_name() else CLASSICAL_FALLBACK
            job_request = request_from_params(parse_params(params_text), registry.device, default_method)
            volume = await run_in_threadpool(volume_from_nrrd_bytes, data, config.max_input_voxels)
            del data
            if volume.shape[0] < 2:
                raise ApiError(400, "the volume has a single slice: at least 2 slices are needed")
            target = target_geometry(volume, job_request)
            output_voxels = target.shape[0] * target.shape[1] * target.shape[2] * job_request.samples
            if output_voxels > config.max_output_voxels:
                raise ApiError(413, f"the result would have {output_voxels} voxels, more than this server's limit of {config.max_output_voxels}")
            if job_request.method == DIFFUSION_METHOD:
                job_request.model = registry.check(job_request.model)
        except CTSliceInterpError as exc:
            raise ApiError(400, str(exc)) from None
        try:
            job = manager.submit(volume, job_request, target)
        except QueueFull as exc:
            raise ApiError(503, f"{exc}; retry later", {"Retry-After": str(exc.retry_after)}) from None
        return JSONResponse(
            {"id": job.id, "state": job.state, "status_url": f"/v1/jobs/{job.id}", "result_url": f"/v1/jobs/{job.id}/result"},
            status_code=202,
            headers={"Location": f"/v1/jobs/{job.id}"},
        )

    def too_large_message() -> str:
        return f"the upload is larger than this server's limit of {config.max_upload_bytes // (1024 * 1024)} MiB"

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str, request: Request, wait: float = 0.0):
        """``wait`` (s, at most 10): hold the answer until the job's state or progress changes."""
        authorize(request)
        job = find_job(job_id)
        if wait > 0 and job.state not in FINISHED:
            snapshot = (job.state, job.stage, job.done)
            loop, changed = asyncio.get_running_loop(), asyncio.Event()

            def wake() -> None:  # called from the worker thread: no polling, no lag
                try:
                    loop.call_soon_threadsafe(changed.set)
                except RuntimeError:  # the event loop is closing
                    pass

            manager.watch(job, wake)
            try:
                if (job.state, job.stage, job.done) == snapshot:  # nothing changed before we listened
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), min(wait, MAX_STATUS_WAIT))
            finally:
                manager.unwatch(job, wake)
        return manager.status(job)

    @app.get("/v1/jobs/{job_id}/result")
    async def job_result(job_id: str, request: Request, part: str = "volume", encoding: str = "gzip"):
        authorize(request)
        job = find_job(job_id)
        if part not in ("volume", "uncertainty"):
            raise ApiError(400, "part must be 'volume' or 'uncertainty'")
        if encoding not in ("gzip", "raw"):
            raise ApiError(400, "encoding must be 'gzip' or 'raw'")
        if job.state != DONE:
            detail = f": {job.error}" if job.error else ""
            raise ApiError(409, f"the job is {job.state}{detail}; no result to download")
        volume = manager.result_part(job, part)
        if volume is None:
            if part == "uncertainty":
                raise ApiError(404, "this job has no uncertainty volume (ask for samples > 1 with a diffusion model)")
            raise ApiError(404, "the result is no longer available")
        headers = {"Cache-Control": "no-store", "Content-Disposition": f'attachment; filename="{part}.nrrd"'}
        done = BackgroundTask(manager.mark_downloaded, job, part)
        header = nrrd_header(volume, encoding)
        data = memoryview(little_endian_array(volume)).cast("B")
        if encoding == "gzip":
            # Streamed (chunked encoding): the first bytes leave at once, however large the
            # result, so no client read times out while the whole volume is compressed.
            async def gzip_chunks():
                compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # level 1, gzip container
                yield header
                for start in range(0, len(data), GZIP_SLICE):
                    piece = await run_in_threadpool(compressor.compress, data[start:start + GZIP_SLICE])
                    if piece:
                        yield piece
                yield compressor.flush()

            return StreamingResponse(gzip_chunks(), media_type="application/x-nrrd", headers=headers, background=done)
        headers["Content-Length"] = str(len(header) + len(data))

        async def chunks():  # no copy of the voxels: slices of the array's own memory
            yield header
            for start in range(0, len(data), STREAM_CHUNK):
                yield data[start:start + STREAM_CHUNK]

        return StreamingResponse(chunks(), media_type="application/x-nrrd", headers=headers, background=done)

    @app.delete("/v1/jobs/{job_id}")
    async def job_delete(job_id: str, request: Request):
        authorize(request)
        job = find_job(job_id)
        manager.cancel(job)
        return {"id": job.id, "state": job.state}

    return app

