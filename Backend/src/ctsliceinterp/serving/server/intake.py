"""An upload becomes a job: the body read within the limits, the parameters and the volume
checked, the target grid and the result's size known, all before anything is queued.

Order matters for a hostile client: the cheap checks (length, queue, content type) come before
a byte of the body is read; the body is read and parsed inside one of the few upload slots (so
memory is bounded by the slots); a declared size is checked before anything is inflated or
allocated. Every refusal is an ``ApiError`` with the status and a message naming the problem."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from ...api import CLASSICAL_FALLBACK, InterpolationRequest, get_method, target_geometry
from ...core.errors import CTSliceInterpError, InputError
from ...core.grid import check_slices
from ...core.volume import Geometry, Volume
from ...io.validate import label_map_reason
from ..nrrd_bytes import VolumeTooLarge, volume_from_nrrd_bytes
from .errors import ApiError
from .params import parse_params
from .state import ServerState
from .upload import UploadPace, UploadStalled, UploadTooLarge, content_length, read_body, split_multipart

PARAMS_HEADER = "x-ctsliceinterp-params"
NRRD_TYPES = ("application/x-nrrd", "application/octet-stream", "application/nrrd")


class ClientGone(Exception):
    """The client disconnected mid-upload: nothing was kept, and nobody listens for an answer."""


@dataclass
class Intake:
    volume: Volume
    request: InterpolationRequest
    target: Geometry
    samples: int  # what the job runs: the request's, or its model's default (``ModelRegistry.samples``)


async def receive_job(request: Request, state: ServerState) -> Intake:
    config = state.config
    try:
        declared = content_length(request)
    except CTSliceInterpError as exc:
        raise ApiError(400, str(exc)) from None
    if declared is not None and declared > config.max_upload_bytes:
        raise ApiError(413, _too_large(config.max_upload_bytes), {"Connection": "close"})
    retry_after = state.manager.queue_full()
    if retry_after is not None:
        # No "Connection: close": uvicorn then reads and drops the rest of the body, so the answer
        # reaches a client still sending it (one that asked Expect: 100-continue sends none).
        raise ApiError(503, "the job queue is full; retry later", {"Retry-After": str(retry_after)})
    content_type = request.headers.get("content-type", "application/octet-stream")  # the boundary is case-sensitive
    multipart = content_type.lower().startswith("multipart/form-data")
    if not multipart and content_type.split(";")[0].strip().lower() not in NRRD_TYPES:
        raise ApiError(415, f"unsupported Content-Type {content_type[:60]!r}: send NRRD bytes (application/x-nrrd) or multipart/form-data")
    async with state.upload_slot():  # reading and parsing: the memory of an upload is held only here
        body = await _read(request, state)
        try:
            data, params_text = _split(body, content_type, multipart, request)
            del body
            job_request, samples = _job_request(params_text, state)
            volume = await run_in_threadpool(_parse_volume, data, state)
            del data
            target = _target(volume, job_request, samples, config.max_output_voxels)
        except VolumeTooLarge as exc:
            raise ApiError(413, str(exc)) from None
        except CTSliceInterpError as exc:
            raise ApiError(400, str(exc)) from None
    return Intake(volume, job_request, target, samples)


async def _read(request: Request, state: ServerState) -> bytearray:
    config = state.config
    pace = UploadPace(config.upload_idle_timeout_seconds, config.upload_min_rate_bytes, config.upload_rate_grace_seconds,
                      asyncio.get_running_loop().time(), config.upload_busy_grace_seconds, lambda: state.waiting_uploads > 0)
    try:
        return await read_body(request, config.max_upload_bytes, pace)
    except UploadTooLarge:
        raise ApiError(413, _too_large(config.max_upload_bytes), {"Connection": "close"}) from None
    except UploadStalled as exc:
        raise ApiError(408, str(exc), {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None


def _split(body, content_type: str, multipart: bool, request: Request):
    if not multipart:
        return body, request.headers.get(PARAMS_HEADER) or request.query_params.get("params")
    parts = split_multipart(body, content_type)
    if "volume" not in parts:
        raise InputError("multipart upload without a 'volume' part (the NRRD file)")
    return parts["volume"], parts.get("params")


def _job_request(params_text, state: ServerState) -> tuple[InterpolationRequest, int]:
    """The checked request (its options are its method's: ``InterpolationRequest``) and the
    samples it runs."""
    params = parse_params(params_text)
    # A model named without a method runs its own method (a client cannot know a served folder's).
    by_model = not params.get("method") and isinstance(params.get("model"), str)
    if by_model:
        default_method = state.registry.method_of(params["model"])
    else:
        default_method = state.registry.default_method() or CLASSICAL_FALLBACK
    job_request = InterpolationRequest.from_params(params, state.registry.device, default_method)
    if not get_method(job_request.method).classical:
        job_request.model = state.registry.check(job_request.method, job_request.model)
    samples = state.registry.samples(job_request)
    if job_request.target is not None:  # before the grid is built: its size alone may be refused
        _check_output_size(job_request.target.shape, samples, state.config.max_output_voxels)
    return job_request, samples


def _parse_volume(data, state: ServerState) -> Volume:
    config = state.config
    volume = volume_from_nrrd_bytes(data, config.max_input_voxels, config.max_input_bytes, config.max_gzip_ratio)
    check_slices(volume.geometry)
    # As the command line's readers do. 8-bit voxels cannot hold HU at all; a constant volume (a
    # blank test phantom) holds no labels and goes through.
    reason = "8-bit voxels cannot hold HU" if volume.array.dtype.itemsize == 1 else None
    if reason is None and volume.array.min() != volume.array.max():
        reason = label_map_reason(volume)
    if reason:
        raise InputError(f"the volume looks like a label map ({reason}): a CT in HU is needed")
    return volume


def _target(volume: Volume, job_request: InterpolationRequest, samples: int, max_output_voxels: int) -> Geometry:
    target = target_geometry(volume, job_request)  # a target outside the input is refused there (core.grid)
    _check_output_size(target.shape, samples, max_output_voxels)
    return target


def _check_output_size(shape, samples: int, limit: int) -> None:
    voxels = shape[0] * shape[1] * shape[2] * samples  # the samples the job runs (ModelRegistry.samples)
    if voxels > limit:
        raise VolumeTooLarge(f"the result would have {voxels} voxels, more than this server's limit of {limit}")


def _too_large(limit: int) -> str:
    return f"the upload is larger than this server's limit of {limit // (1024 * 1024)} MiB"
