"""A job's result as an NRRD response, streamed without copying the voxels."""

from __future__ import annotations

import zlib

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from ...core.volume import Volume
from ..nrrd_bytes import little_endian_array, nrrd_header

STREAM_CHUNK = 256 * 1024  # fastest of 64 KiB..8 MiB on loopback: each chunk fits the socket buffer, so asyncio sends it without buffering a copy
GZIP_SLICE = 4 * 1024 * 1024  # compressed in a worker thread slice by slice, and sent as it comes


def result_response(volume: Volume, part: str, encoding: str, sent: BackgroundTask) -> StreamingResponse:
    """``encoding`` "raw" (with a Content-Length) or "gzip" (chunked: the first bytes leave at
    once, however large the result, so no client read times out while it is compressed).
    ``sent`` runs once the last byte was handed to the transport."""
    headers = {"Cache-Control": "no-store", "Content-Disposition": f'attachment; filename="{part}.nrrd"'}
    header = nrrd_header(volume, encoding)
    data = memoryview(little_endian_array(volume)).cast("B")
    if encoding == "gzip":
        async def gzip_chunks():
            compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # level 1, gzip container
            yield header
            for start in range(0, len(data), GZIP_SLICE):
                piece = await run_in_threadpool(compressor.compress, data[start:start + GZIP_SLICE])
                if piece:
                    yield piece
            yield compressor.flush()

        return StreamingResponse(gzip_chunks(), media_type="application/x-nrrd", headers=headers, background=sent)
    headers["Content-Length"] = str(len(header) + len(data))

    async def chunks():  # no copy of the voxels: slices of the array's own memory
        yield header
        for start in range(0, len(data), STREAM_CHUNK):
            yield data[start:start + STREAM_CHUNK]

    return StreamingResponse(chunks(), media_type="application/x-nrrd", headers=headers, background=sent)
