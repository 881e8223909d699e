"""Diffusion models kept loaded between jobs.

The registry knows the models the operator named with ``--model`` (a name or a checkpoint
folder). Clients choose among those by name only, so a request can never make the server load
an arbitrary path. A model loads on first use (or at start-up with ``preload``) through
``api.load_model`` (the diffusion pipeline's ``Interpolator.load``) and then stays in memory.
When the pipeline module (or torch) is not there, the server still starts and serves the
classical methods; diffusion requests get a clear 4xx instead.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, Optional

from ...api import CLASSICAL_METHODS, DIFFUSION_METHOD, METHODS, load_model
from ...core.errors import InputError

log = logging.getLogger("ctsliceinterp.serving.server")


def model_name(spec: str) -> str:
    """A checkpoint folder is known by its folder name; a plain name by itself."""
    path = Path(spec).expanduser()
    return path.name if (path.exists() or "/" in spec or "\\" in spec) else spec


def pipeline_available() -> bool:
    try:
        return importlib.util.find_spec(METHODS[DIFFUSION_METHOD].pipeline.partition(":")[0]) is not None
    except (ImportError, ValueError):
        return False


class ModelRegistry:
    def __init__(self, specs: list[str], device: str = "auto"):
        self.specs = {model_name(spec): spec for spec in specs}
        if len(self.specs) != len(specs):
            raise InputError("two --model arguments have the same name; give checkpoint folders distinct names")
        self.requested_device = device
        self._device: Optional[str] = None
        self._loaded: dict[str, Any] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    # --- device ---------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """The device diffusion jobs run on. Resolved without importing torch unless a model is
        configured, so a classical-only server starts fast."""
        if self._device is None:
            if self.requested_device != "auto":
                self._device = self.requested_device
            elif not self.specs:
                self._device = "cpu"
            else:
                try:
                    import torch

                    self._device = "cuda" if torch.cuda.is_available() else "cpu"
                except ImportError:
                    self._device = "cpu"
        return self._device

    def default_name(self) -> Optional[str]:
        return next(iter(self.specs), None)

    # --- lookup and loading ---------------------------------------------------------------
    def check(self, name: Optional[str]) -> str:
        """The model a diffusion request will use; ``InputError`` when this server cannot."""
        if not pipeline_available():
            raise InputError("diffusion is not available on this server (the model pipeline is not installed); use a classical method")
        if not self.specs:
            raise InputError("this server serves no diffusion model; start it with --model NAME|PATH, or use a classical method")
        name = name or self.default_name()
        if name not in self.specs:
            raise InputError(f"unknown model {name!r}; this server serves {', '.join(self.specs)}")
        if name in self._errors:
            raise InputError(f"model {name!r} failed to load on this server: {self._errors[name]}")
        return name

    def get(self, name: Optional[str]) -> Any:
        name = self.check(name)
        with self._lock:  # one load at a time; later jobs reuse the loaded model
            if name not in self._loaded:
                log.info("loading model %s on %s", name, self.device)
                try:
                    self._loaded[name] = load_model(DIFFUSION_METHOD, self.specs[name], self.device)
                except Exception as exc:  # noqa: BLE001 - reported to clients, server keeps serving
                    self._errors[name] = f"{type(exc).__name__}: {exc}"
                    log.error("model %s failed to load: %s", name, self._errors[name])
                    raise InputError(f"model {name!r} failed to load on this server: {self._errors[name]}") from None
            return self._loaded[name]

    def preload(self) -> None:
        """Load every configured model now (the worker thread calls this at start-up)."""
        if not pipeline_available():
            if self.specs:
                log.error("--model given but the diffusion pipeline is not installed; serving classical methods only")
            return
        for name in self.specs:
            try:
                self.get(name)
            except InputError:
                pass  # recorded in _errors and shown by /v1/models

    # --- listing --------------------------------------------------------------------------
    def describe(self) -> list[dict]:
        entries = [
            {"name": method, "description": METHODS[method].description, "default_steps": None,
             "device": "cpu", "kind": "classical", "method": method, "loaded": True}
            for method in CLASSICAL_METHODS
        ]
        for name in self.specs:
            model = self._loaded.get(name)
            entry = {
                "name": name,
                "description": f"{METHODS[DIFFUSION_METHOD].description} (model {name})",
                "default_steps": model.config.inference.steps if model is not None else None,
                "device": self.device if pipeline_available() else None,
                "kind": "diffusion",
                "method": DIFFUSION_METHOD,
                "loaded": model is not None,
            }
            if name in self._errors:
                entry["error"] = self._errors[name]
            elif not pipeline_available():
                entry["error"] = "the diffusion pipeline is not installed on this server"
            entries.append(entry)
        return entries
