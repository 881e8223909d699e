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
    max_concurrent_uploads: int = 4  # bounds memory held by bodies still arriving
    # Test hook: sleep this long at every progress step (to hold a real job "running"). Never set
    # by the command line.
    step_delay_seconds: float = 0.0
