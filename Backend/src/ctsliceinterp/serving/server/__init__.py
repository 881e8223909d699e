"""The CTSliceInterp inference server (FastAPI + uvicorn): async jobs, auth, progress, cancel.

``create_app(ServerConfig(...))`` builds the application; ``ctsliceinterp serve`` runs it.
Imports FastAPI, so only the server process needs it (the client does not)."""

from .app import create_app
from .config import ServerConfig

__all__ = ["create_app", "ServerConfig"]
