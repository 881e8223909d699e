"""The FastAPI application: the routers under /v1, JSON errors everywhere, one job manager.

Nothing is written to disk. ``runner.serve`` runs it behind uvicorn."""

from __future__ import annotations

import contextlib
from typing import Optional

from fastapi import FastAPI

from ... import __version__
from .config import ServerConfig
from .errors import install_error_handlers
from .models import ModelRegistry
from .routes import health, jobs
from .state import ServerState


def create_app(config: ServerConfig, registry: Optional[ModelRegistry] = None) -> FastAPI:
    state = ServerState.create(config, registry or ModelRegistry(config.models, config.device))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.manager.start()
        try:
            yield
        finally:
            state.manager.stop()

    # redirect_slashes off: Starlette's redirect would echo the request's Host header back.
    app = FastAPI(title="CTSliceInterp", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False)
    app.state.server = state
    app.state.config, app.state.manager, app.state.registry = config, state.manager, state.registry
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    return app
