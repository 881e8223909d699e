"""What every endpoint shares: the settings, the model registry, the job manager and the upload
slots. One ``ServerState`` per app, reached through the ``server_state`` dependency."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from fastapi import Request

from .config import ServerConfig
from .jobs import JobManager
from .models import ModelRegistry


@dataclass
class ServerState:
    config: ServerConfig
    registry: ModelRegistry
    manager: JobManager
    uploads: asyncio.Semaphore  # bodies being received and parsed at once (memory)
    waiting_uploads: int = 0  # uploads waiting for one of those slots

    @contextlib.asynccontextmanager
    async def upload_slot(self):
        self.waiting_uploads += 1
        try:
            await self.uploads.acquire()
        finally:
            self.waiting_uploads -= 1
        try:
            yield
        finally:
            self.uploads.release()

    @classmethod
    def create(cls, config: ServerConfig, registry: ModelRegistry) -> "ServerState":
        return cls(config, registry, JobManager(config, registry), asyncio.Semaphore(max(1, config.max_concurrent_uploads)))


def server_state(request: Request) -> ServerState:
    return request.app.state.server
