"""Server settings, with the limits that keep one server healthy under any client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

MiB = 1024 * 1024


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None  # bearer token; required for non-loopback binds
    models: list[str] = field(default_factory=list)  # diffusion model names or checkpoint folders
    device: str = "auto"
    max_upload_bytes: int = 512 * MiB  # enforced while the body streams in
    max_input_voxels: int = 1024 * 1024 * 1024 // 2  # 512 Mi voxels (e.g. 2000 slices of 512x512)
    # The voxel data an upload may declare (a gzip body is inflated to this at most, and its
    # declared size is checked before anything is inflated or allocated): 2000 slices of
    # 512x512 int16.
    max_input_bytes: int = 1024 * MiB
    # A gzip body may inflate to at most this many times its size (CT compresses 2-5 times;
    # a decompression bomb about 1000 times). Not applied below 16 MiB of voxel data.
    max_gzip_ratio: float = 100.0
    max_output_voxels: int = 2 * 1024 * 1024 * 1024 // 2  # 1 Gi voxels = 4 GiB of float32 result
    queue_size: int = 16  # jobs waiting (not counting the running one); more -> 503
    result_ttl_seconds: float = 15 * 60  # results not downloaded are deleted after this
    # A sent result is kept this long in case the transfer broke (the client DELETEs it once it
    # has read it): a dropped download is retried, not lost.
    download_grace_seconds: float = 60.0
    # Results held in memory (waiting, running and not yet downloaded jobs, by their result
    # size); a job that would go above gets 503 + Retry-After instead of exhausting memory.
    max_held_result_bytes: int = 8 * 1024 * MiB
    upload_idle_timeout_seconds: float = 60.0  # a stalled upload is dropped (slow-loris)
    # Slow-loris: once an upload has run for the grace time, it must keep this average rate
    # (bytes/s since it began), or it is dropped (408) and its slot goes to the next upload.
    upload_min_rate_bytes: float = 32 * 1024
    upload_rate_grace_seconds: float = 10.0
    # While another upload waits for a slot, the grace shrinks to this: slow clients cannot
    # hold every slot for long.
    upload_busy_grace_seconds: float = 2.0
    # A request's head (request line and headers) must arrive within this, or the connection
    # is closed; the same bounds an idle kept-alive connection.
    header_timeout_seconds: float = 10.0
    max_concurrent_uploads: int = 4  # bounds memory held by bodies arriving and being parsed
    # Test hook: sleep this long at every progress step (to hold a real job "running"). Never set
    # by the command line.
    step_delay_seconds: float = 0.0
