"""The request contract and the one function that runs a method on a Volume.

The CLI, the server, the client and the Slicer module all speak ``InterpolationRequest``: in
process it goes to ``interpolate``; over HTTP it travels as ``to_params()`` JSON and the server
reads it back with ``from_params()``. ``METHODS`` says which methods exist, which is the default
and which are classical. This module imports neither torch nor scipy (a learned method's
pipeline is imported only when that method runs), so any Python with numpy can use it.
"""

from __future__ import annotations

import importlib
import re
import threading
from pathlib import Path
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .core.errors import InputError
from .core.grid import DEFAULT_SPACING_MM, like_grid, thin_grid
from .core.progress import ProgressCallback, as_reporter
from .core.volume import Geometry, Volume
from .models import WEIGHTS_DIR


# --- the method registry ---------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One interpolation method.

    A classical method has no ``pipeline``. A learned method names its pipeline class as
    ``"module:Class"``: ``Class.load(model, device=..., **request.extra)`` returns a loaded model
    whose ``run(volume, target, reporter=..., **options)`` returns the output Volume, or
    ``(output, uncertainty)``. ``options`` are the request fields the method takes;
    ``default_model`` is the shipped model used when the request names none (None: the method
    ships no model, so a request must name a folder); ``checkpoint_file`` is the file that marks a
    model folder of this method."""

    name: str
    description: str
    pipeline: Optional[str] = None
    default_model: Optional[str] = None
    options: tuple[str, ...] = ()
    checkpoint_file: Optional[str] = None

    @property
    def classical(self) -> bool:
        return self.pipeline is None

    def takes(self, option: str) -> bool:
        """Whether a request for this method may set ``option`` (one of ``OPTION_FIELDS``): those in
        its ``options``; ``consistency`` for every method (on by default for the learned ones, on
        request for the classical ones); ``model`` for every learned one."""
        return option in self.options or option == "consistency" or (option == "model" and not self.classical)


REGRESSION_METHOD = "regression"
REGRESSION_MODEL = "regression"  # the network shipped in ctsliceinterp/models/weights/regression
DIFFUSION_METHOD = "diffusion"  # latent diffusion v1: no shipped model since v2 superseded it; train your own
RESIDUAL_DIFFUSION_METHOD = "residual_diffusion"
RESIDUAL_DIFFUSION_MODEL = "residual_diffusion"  # ctsliceinterp/models/weights/residual_diffusion
CLASSICAL_FALLBACK = "bspline"  # the default when no learned default model ships
# The default when its shipped model is installed: the best method on held-out CT (docs/quality.md).
DEFAULT_LEARNED_METHOD = REGRESSION_METHOD

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("linear", "linear interpolation along the slice axis (classical baseline)"),
        Method("bspline", "cubic B-spline interpolation along the slice axis (classical baseline)"),
        Method("lanczos", "Lanczos-3 windowed-sinc interpolation along the slice axis (classical baseline)"),
        Method(
            REGRESSION_METHOD,
            "through-plane network: B-spline plus a learned correction, consistent with the thick slices",
            pipeline="ctsliceinterp.pipelines.regression:RegressionInterpolator",
            default_model=REGRESSION_MODEL,
            options=("consistency",),
            checkpoint_file="regression.json",
        ),
        Method(
            DIFFUSION_METHOD,
            "latent diffusion v1: slice VAE + 3-D latent U-Net, consistent with the thick slices "
            "(no shipped model: a folder trained with Training/train_vae.py and train_diffusion.py)",
            pipeline="ctsliceinterp.pipelines.diffusion:Interpolator",
            options=("steps", "sampler", "samples", "consistency", "seed"),
            checkpoint_file="model.json",
        ),
        Method(
            RESIDUAL_DIFFUSION_METHOD,
            "residual latent diffusion around the regression estimate (guided VAE + 3-D latent U-Net), "
            "consistent with the thick slices; by default the posterior-mean estimate, with samples 1 "
            "one realistic sample, with samples N > 1 the mean of N samples and their standard deviation",
            pipeline="ctsliceinterp.pipelines.residual_diffusion:ResidualDiffusionInterpolator",
            default_model=RESIDUAL_DIFFUSION_MODEL,
            options=("steps", "sampler", "samples", "consistency", "seed"),
            checkpoint_file="residual_diffusion.json",
        ),
    )
}
CLASSICAL_METHODS = tuple(name for name, method in METHODS.items() if method.classical)
SHIPPED_MODELS = tuple(method.default_model for method in METHODS.values() if method.default_model)

# ``InterpolationRequest.method`` on a client: let the server choose (its default model, else B-spline).
SERVER_DEFAULT = ""


def available_methods() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The registry entry for ``name``; an ``InputError`` listing the choices when unknown."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise InputError(f"unknown method {str(name)[:40]!r}; choose one of {', '.join(available_methods())}")
    return method


def model_folder(model: str) -> Path:
    """Where a model's files are: the checkpoint folder it names, else the shipped model's."""
    path = Path(model).expanduser()
    return path if path.is_dir() else WEIGHTS_DIR / str(model)


def model_method(model: str) -> str:
    """The learned method a model belongs to: a shipped model's name or a checkpoint folder,
    recognised by its method's ``checkpoint_file`` (no torch)."""
    folder = model_folder(model)
    for method in METHODS.values():
        if method.checkpoint_file and (folder / method.checkpoint_file).is_file():
            return method.name
    if str(model) in SHIPPED_MODELS:
        raise InputError(_not_installed(str(model)))
    markers = " or ".join(m.checkpoint_file for m in METHODS.values() if m.checkpoint_file)
    raise InputError(f"model {str(model)[:80]!r}: not a shipped model nor a folder holding {markers} "
                     f"(shipped: {', '.join(SHIPPED_MODELS)})")


def _not_installed(name: str) -> str:
    return (f"the shipped model {name!r} is not installed (no weights in {WEIGHTS_DIR / name}); "
            f"give a checkpoint folder with --model, or another method")


def _no_shipped_model(method: Method) -> str:
    """For a learned method that ships no model: name a folder, or a method with a shipped model
    that takes the same options (diffusion v1 -> residual_diffusion)."""
    successors = [m.name for m in METHODS.values() if m.default_model and set(method.options) <= set(m.options)]
    instead = f", or use --method {' or '.join(successors)}" if successors else ", or another method"
    return (f"{method.name} has no shipped model: give --model FOLDER of a trained {method.name} model "
            f"(a folder holding {method.checkpoint_file}){instead}")


def shipped_model_available(name: str) -> bool:
    """True when the package carries the named model's weights (checked without importing torch)."""
    try:
        return (WEIGHTS_DIR / name).is_dir() and model_method(name) is not None
    except InputError:
        return False


def default_method() -> str:
    """The default learned method when its shipped model is installed, else B-spline."""
    default_model = METHODS[DEFAULT_LEARNED_METHOD].default_model
    return DEFAULT_LEARNED_METHOD if shipped_model_available(default_model) else CLASSICAL_FALLBACK


DEFAULT_METHOD = default_method()


# --- the request -----------------------------------------------------------------------------
# Fields a job's parameters may carry (device and extra are the runner's business, never sent).
PARAM_FIELDS = ("method", "spacing", "target", "model", "steps", "sampler", "samples", "consistency", "seed")
# The fields a method may or may not take (``Method.takes``); None means not given.
OPTION_FIELDS = ("model", "steps", "sampler", "samples", "consistency", "seed")
MAX_STEPS = 1000
MAX_SAMPLES = 16
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")


@dataclass
class InterpolationRequest:
    """What to do. ``target`` (a full geometry, e.g. a reference's) overrides ``spacing``.

    ``method`` is a name from ``METHODS``, or ``SERVER_DEFAULT`` for a request sent to a server."""

    method: str = DEFAULT_METHOD
    spacing: float = DEFAULT_SPACING_MM
    target: Optional[Geometry] = None
    # Learned-method options (each method takes those in its ``Method.options``).
    model: Optional[str] = None
    steps: Optional[int] = None
    sampler: Optional[str] = None
    # None: the method's default output (residual_diffusion: the posterior mean; diffusion: one
    # sample); 1: one realistic sample; N > 1: the mean of N samples and their standard deviation.
    samples: Optional[int] = None
    # Thick-slice consistency correction; None: the method's default (on for learned methods, off
    # for the classical ones, so that their names keep meaning the textbook operators).
    consistency: Optional[bool] = None
    seed: Optional[int] = None
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # keyword options for the model's load (compile=True)

    def __post_init__(self) -> None:
        # The one check that a request's options are its method's: the Python API, the command
        # line, a server's from_params and the Slicer Lib's job_request all build one, so none of them
        # drops an option. (The widget sends only its enabled boxes: the disabled ones keep values.)
        method = METHODS.get(self.method) if isinstance(self.method, str) else None
        if method is None:  # SERVER_DEFAULT: the server checks once it has chosen; unknown: interpolate says so
            return
        refused = [key for key in OPTION_FIELDS if getattr(self, key) is not None and not method.takes(key)]
        if refused:
            raise InputError(_not_taken(method, refused))

    def to_params(self) -> dict[str, Any]:
        """The job parameters a server reads back with ``from_params`` (JSON-ready)."""
        params: dict[str, Any] = {"spacing": self.spacing}
        if self.method != SERVER_DEFAULT:
            params["method"] = self.method
        if self.target is not None:
            params["target"] = self.target.to_dict()
        for key in ("model", "steps", "sampler", "samples", "seed"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.consistency is not None:
            params["consistency"] = bool(self.consistency)
        return params

    def wants_consistency(self, method: "Method") -> bool:
        return (not method.classical) if self.consistency is None else bool(self.consistency)

    @classmethod
    def from_params(cls, params: dict[str, Any], device: str = "auto", default_method: str = DEFAULT_METHOD) -> "InterpolationRequest":
        """A request from job parameters, checked field by field: an unknown field or a wrong
        type is an ``InputError`` naming it. ``default_method``: used when the parameters name
        none (a server's default model, or B-spline on a server that serves no model)."""
        unknown = sorted(set(params) - set(PARAM_FIELDS))
        if unknown:
            raise InputError(f"unknown job parameter(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(PARAM_FIELDS)}")
        method = get_method(params.get("method") or default_method).name
        spacing = params.get("spacing", DEFAULT_SPACING_MM)
        if spacing is None:
            spacing = DEFAULT_SPACING_MM
        # A comparison, not math.isfinite: an integer like 10**400 would overflow the float conversion.
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 0 < spacing < 1e6:
            raise InputError(f"spacing must be a positive number of mm, got {str(spacing)[:24]}")
        target = params.get("target")
        consistency = params.get("consistency")
        if consistency is not None and not isinstance(consistency, bool):
            raise InputError(f"consistency must be true or false, got {consistency!r}")
        return cls(
            method=method,
            spacing=float(spacing),
            target=None if target is None else Geometry.from_dict(target, "target"),
            model=_identifier(params, "model"),
            steps=_integer(params, "steps", 1, MAX_STEPS),
            sampler=_identifier(params, "sampler"),
            samples=_integer(params, "samples", 1, MAX_SAMPLES),
            consistency=consistency,
            seed=_integer(params, "seed", 0, 2**63 - 1),
            device=device,
        )


def _not_taken(method: Method, refused: list[str]) -> str:
    """``regression takes no steps, samples: they apply to residual_diffusion, diffusion`` (the
    methods that take all of them, those with a shipped model first)."""
    takers = sorted((m for m in METHODS.values() if all(m.takes(key) for key in refused)),
                    key=lambda m: m.default_model is None)
    where = f"{'they apply' if len(refused) > 1 else 'it applies'} to {', '.join(m.name for m in takers)}" if takers \
        else "no method takes them together"
    return f"{method.name} takes no {', '.join(refused)}: {where}"


def sampling_refused(mean_estimator: Optional[str], samples: Optional[int], steps: Optional[int],
                     sampler: Optional[str]) -> Optional[str]:
    """Why a request may not set ``steps``/``sampler``: a model whose default output is the posterior
    mean by the x0 head runs no sampler unless samples are asked for (None: allowed). One rule for
    the pipeline and the server's intake."""
    if samples is None and mean_estimator == "x0_head" and (steps or sampler):
        return ("the default output (the posterior mean by the x0 head) takes no steps or sampler: "
                "ask for samples (1 for one sample, N for the mean of N) to sample")
    return None


def shared_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Of request fields meant for several methods at once (evaluate's ``--model``, ``--seed``),
    those ``method`` takes; the other fields pass unchanged."""
    entry = get_method(method)
    return {key: value for key, value in options.items() if key not in OPTION_FIELDS or entry.takes(key)}


def _integer(params: dict, key: str, low: int, high: int) -> Optional[int]:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{key} must be an integer from {low} to {high}, got {value!r}")
    return value


def _identifier(params: dict, key: str) -> Optional[str]:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise InputError(f"{key} must be a name of letters, digits and _.+- (at most 128), got {str(value)[:40]!r}")
    return value


@dataclass
class InterpolationResult:
    volume: Volume
    uncertainty: Optional[Volume] = None
    seconds: float = 0.0
    method: str = ""


# --- running ---------------------------------------------------------------------------------
def target_geometry(volume: Volume, request: InterpolationRequest) -> Geometry:
    if request.target is not None:
        return like_grid(volume.geometry, request.target)
    return thin_grid(volume.geometry, request.spacing)


def load_model(method: str, model: Optional[str] = None, device: str = "auto", **options) -> Any:
    """Load a learned method's model (``model``: a name or a checkpoint folder, default the
    method's shipped model). Imports the method's pipeline, hence torch."""
    entry = get_method(method)
    if entry.classical:
        raise InputError(f"{method} is a classical method: it has no model to load")
    model = model or entry.default_model
    if model is None:
        raise InputError(_no_shipped_model(entry))
    # A shipped name (not a folder of that name here) whose weights are absent: say so, before torch.
    if str(model) in SHIPPED_MODELS and not Path(model).expanduser().is_dir() and not shipped_model_available(model):
        raise InputError(_not_installed(str(model)))
    module, _, name = entry.pipeline.partition(":")
    pipeline = getattr(importlib.import_module(module), name)
    return pipeline.load(model, device=device, **options)


def interpolate(
    volume: Volume,
    request: InterpolationRequest | None = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    interpolator: Any = None,
) -> InterpolationResult:
    """Interpolate a thick ``volume`` (HU, LPS geometry) onto the requested thin grid.

    ``interpolator``: an already-loaded model of the request's learned method (the server keeps
    one warm); when absent, the model named in the request is loaded."""
    request = request or InterpolationRequest()
    method = get_method(request.method)
    reporter = as_reporter(progress, cancel)
    volume.check_finite()
    target = target_geometry(volume, request)
    start = time.perf_counter()
    if method.classical:
        from .core.classical import interpolate_classical  # scipy loads only when needed

        output = interpolate_classical(volume, target, method.name, reporter)
        if request.wants_consistency(method):
            from .core.acquisition import consistency_correction

            corrected, _ = consistency_correction(output.array, target, volume.array, volume.geometry,
                                                  volume.slice_thickness, reporter=reporter)
            output = output.replace(corrected, consistency=True)
        result = InterpolationResult(output)
    else:
        model = interpolator or load_model(method.name, request.model, request.device, **request.extra)
        options = {key: getattr(request, key) for key in method.options}
        if "consistency" in options:
            options["consistency"] = request.wants_consistency(method)
        output = model.run(volume, target, reporter=reporter, **options)
        result = InterpolationResult(*output) if isinstance(output, tuple) else InterpolationResult(output)
    result.seconds = time.perf_counter() - start
    result.method = method.name
    return result
