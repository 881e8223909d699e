"""The single function that runs a method on a Volume. CLI, server and Slicer all call it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .core.classical import CLASSICAL_METHODS, interpolate_classical
from .core.errors import InputError
from .core.grid import DEFAULT_SPACING_MM, like_grid, thin_grid
from .core.progress import ProgressCallback, as_reporter
from .core.volume import Geometry, Volume

DIFFUSION_METHOD = "diffusion"
DEFAULT_MODEL = "default"  # the model shipped in ctsliceinterp/models/weights/default
CLASSICAL_FALLBACK = "bspline"


def shipped_model_available(name: str = DEFAULT_MODEL) -> bool:
    """True when the package carries the named model's weights (checked without importing torch)."""
    from pathlib import Path

    return (Path(__file__).resolve().parent / "models" / "weights" / name / "model.json").is_file()


def default_method() -> str:
    """The shipped diffusion model when its weights are installed, else B-spline."""
    return DIFFUSION_METHOD if shipped_model_available() else CLASSICAL_FALLBACK


DEFAULT_METHOD = default_method()


@dataclass
class InterpolationRequest:
    """What to do. ``target`` (a full geometry, e.g. a reference's) overrides ``spacing``."""

    method: str = DEFAULT_METHOD
    spacing: float = DEFAULT_SPACING_MM
    target: Optional[Geometry] = None
    # Diffusion options (ignored by classical methods).
    model: Optional[str] = None
    steps: Optional[int] = None
    sampler: Optional[str] = None
    samples: int = 1
    consistency: bool = True
    seed: Optional[int] = None
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class InterpolationResult:
    volume: Volume
    uncertainty: Optional[Volume] = None
    seconds: float = 0.0
    method: str = ""


def available_methods() -> tuple[str, ...]:
    return CLASSICAL_METHODS + (DIFFUSION_METHOD,)


def target_geometry(volume: Volume, request: InterpolationRequest) -> Geometry:
    if request.target is not None:
        return like_grid(volume.geometry, request.target)
    return thin_grid(volume.geometry, request.spacing)


def interpolate(
    volume: Volume,
    request: InterpolationRequest | None = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    interpolator: Any = None,
) -> InterpolationResult:
    """Interpolate a thick ``volume`` (HU, LPS geometry) onto the requested thin grid.

    ``interpolator``: an already-loaded diffusion ``Interpolator`` (the server keeps one warm);
    when absent and the method is ``diffusion``, the model named in the request is loaded."""
    request = request or InterpolationRequest()
    reporter = as_reporter(progress, cancel)
    volume.check_finite()
    target = target_geometry(volume, request)
    start = time.perf_counter()
    if request.method in CLASSICAL_METHODS:
        result = InterpolationResult(interpolate_classical(volume, target, request.method, reporter))
    elif request.method == DIFFUSION_METHOD:
        from .pipelines.diffusion import run_diffusion  # torch and the model load only when needed

        result = run_diffusion(volume, target, request, reporter, interpolator)
    else:
        raise InputError(f"unknown method {request.method!r}; choose one of {', '.join(available_methods())}")
    result.seconds = time.perf_counter() - start
    result.method = request.method
    return result
