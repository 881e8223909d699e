"""Models of the learned methods (regression, diffusion), kept loaded between jobs.

The registry knows the models the operator named with ``--model`` (a name or a checkpoint
folder); each model's method is read from its folder (``model_method``). Clients choose among
those by method and name only, so a request can never make the server load an arbitrary path. A
model loads on first use (or at start-up with ``preload``) through ``api.load_model`` and then stays
in memory. When a method's pipeline module (or torch) is not there, the server still starts and
serves the classical methods; requests for that method get a clear 4xx instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path
from typing import Any, Optional

from ...api import CLASSICAL_METHODS, DEFAULT_METHOD, MAX_SAMPLES, METHODS, InterpolationRequest, get_method, load_model, \
    model_folder, model_method, sampling_refused
from ...core.errors import InputError

log = logging.getLogger("ctsliceinterp.serving.server")

def model_name(spec: str) -> str:
    """A checkpoint folder is known by its folder name; a plain name by itself."""
    path = Path(spec).expanduser()
    return path.name if (path.exists() or "/" in spec or "\\" in spec) else spec


def inference_settings(spec: str, method: str) -> dict:
    """The ``inference`` section of a model's checkpoint config (JSON, no torch); empty when it has
    none or it cannot be read (such a model will not load either, so its jobs never hold a result)."""
    try:
        inference = json.loads((model_folder(spec) / METHODS[method].checkpoint_file).read_text())["config"]["inference"]
        return inference if isinstance(inference, dict) else {}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def default_samples(inference: dict) -> int:
    """The samples a request without ``samples`` runs on a model with these ``inference_settings``:
    one whose ``mean_estimator`` is "samples" (latent diffusion v2 trained so) averages
    ``mean_samples`` of them and returns their spread too; the others (the x0 head, v1's one
    sample, regression) run one."""
    if inference.get("mean_estimator") != "samples":
        return 1
    try:
        return max(1, int(inference.get("mean_samples", MAX_SAMPLES)))  # not said: count the most a job may run
    except (TypeError, ValueError):
        return MAX_SAMPLES


def pipeline_available(method: str) -> bool:
    try:
        return importlib.util.find_spec(METHODS[method].pipeline.partition(":")[0]) is not None
    except (ImportError, ValueError):
        return False


class ModelRegistry:
    def __init__(self, specs: list[str], device: str = "auto"):
        self.specs = {model_name(spec): spec for spec in specs}
        if len(self.specs) != len(specs):
            raise InputError("two --model arguments have the same name; give checkpoint folders distinct names")
        self.methods = {name: model_method(spec) for name, spec in self.specs.items()}
        self._inference = {name: inference_settings(self.specs[name], method) for name, method in self.methods.items()}
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

    def default_name(self, method: str) -> Optional[str]:
        """The first model served for ``method``."""
        return next((name for name, m in self.methods.items() if m == method), None)

    def default_method(self) -> Optional[str]:
        """The learned method a request without one gets: the package's default when served, else
        the first served; None when no model is served."""
        served = list(dict.fromkeys(self.methods.values()))
        return DEFAULT_METHOD if DEFAULT_METHOD in served else next(iter(served), None)

    def method_of(self, name: str) -> str:
        """The method of the served model ``name``; ``InputError`` naming the served ones when none is."""
        method = self.methods.get(name)
        if method is None:
            served = ", ".join(self.methods) or "none (it was started without --model)"
            raise InputError(f"this server serves no model {name[:80]!r}; it serves {served}")
        return method

    def samples(self, request: InterpolationRequest) -> int:
        """The samples a checked request (its ``model`` resolved by ``check``) runs: its own, else
        its model's default output's, which the server's size and memory limits count. A request
        its model would refuse after loading (``api.sampling_refused``) is refused here, before queueing."""
        inference = self._inference.get(request.model, {}) if request.model else {}
        refused = sampling_refused(inference.get("mean_estimator"), request.samples, request.steps, request.sampler)
        if refused:
            raise InputError(f"model {request.model}: {refused}")
        return request.samples if request.samples is not None else default_samples(inference)

    # --- lookup and loading ---------------------------------------------------------------
    def check(self, method: str, name: Optional[str]) -> str:
        """The model a request for the learned ``method`` will use; ``InputError`` when this server cannot."""
        if not pipeline_available(method):
            raise InputError(f"{method} is not available on this server (its pipeline is not installed); use a classical method")
        name = name or self.default_name(method)
        if name is None:
            raise InputError(f"this server serves no {method} model; start it with --model NAME|PATH, or use a classical method")
        if self.methods.get(name) != method:
            served = [n for n, m in self.methods.items() if m == method]
            raise InputError(f"unknown {method} model {name!r}; this server serves {', '.join(served) or 'none'}")
        if name in self._errors:
            raise InputError(f"model {name!r} failed to load on this server: {self._errors[name]}")
        return name

    def get(self, method: str, name: Optional[str]) -> Any:
        name = self.check(method, name)
        with self._lock:  # one load at a time; later jobs reuse the loaded model
            if name not in self._loaded:
                log.info("loading model %s on %s", name, self.device)
                try:
                    self._loaded[name] = load_model(method, self.specs[name], self.device)
                except Exception as exc:  # noqa: BLE001 - reported to clients, server keeps serving
                    self._errors[name] = f"{type(exc).__name__}: {exc}"
                    log.error("model %s failed to load: %s", name, self._errors[name])
                    raise InputError(f"model {name!r} failed to load on this server: {self._errors[name]}") from None
            return self._loaded[name]

    def preload(self) -> None:
        """Load every configured model now (the worker thread calls this at start-up)."""
        for name, method in self.methods.items():
            if not pipeline_available(method):
                log.error("--model %s: the %s pipeline is not installed; not served", name, method)
                continue
            try:
                self.get(method, name)
            except InputError:
                pass  # recorded in _errors and shown by /v1/models

    # --- listing --------------------------------------------------------------------------
    def describe(self) -> list[dict]:
        entries = [
            {"name": method, "description": METHODS[method].description, "default_steps": None,
             "device": "cpu", "kind": "classical", "method": method, "loaded": True}
            for method in CLASSICAL_METHODS
        ]
        for name, method in self.methods.items():
            model = self._loaded.get(name)
            inference = getattr(getattr(model, "config", None), "inference", None)  # diffusion models only
            entry = {
                "name": name,
                "description": f"{get_method(method).description} (model {name})",
                "default_steps": inference.steps if inference is not None else None,
                "device": self.device if pipeline_available(method) else None,
                "kind": method,
                "method": method,
                "loaded": model is not None,
            }
            if name in self._errors:
                entry["error"] = self._errors[name]
            elif not pipeline_available(method):
                entry["error"] = f"the {method} pipeline is not installed on this server"
            entries.append(entry)
        return entries
