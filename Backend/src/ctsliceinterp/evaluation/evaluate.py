"""Compare interpolation methods against a thin reference: metrics, a table, JSON and figures.

Two kinds of case, both paired by physical slice position (never by index):

- a **real pair** (``real_pair_case``): thick and thin reconstructions of one scan. Each method
  interpolates the real thick series onto the reference's slice positions.
- a **simulated pair** (``simulated_case``): thick slices simulated from the reference as slab
  means (``acquisition.simulate_thick``); the methods recover the reference's slices.

In both, the reference is restricted to the slices between the first and the last thick-slice
centre (where interpolation is defined; beyond them every method only extrapolates), and the
metrics then drop the first and last ``metrics.EDGE_SLICES`` of those, as RPLHR-CT does.

Every method runs through ``api.interpolate``, the same entry the CLI, the server and Slicer use.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from . import metrics
from ..core.acquisition import consistency_mae, simulate_thick
from ..core.errors import InputError
from ..io.atomic import atomic_file
from ..api import InterpolationRequest, interpolate, shared_options
from ..core.volume import Volume

POSITION_TOLERANCE_MM = 1e-3


@dataclass
class EvaluationCase:
    thick: Volume  # what the methods get
    reference: Volume  # thin truth, on the slice positions the methods are asked for
    thickness: float  # slab width (mm) of the thick slices, for the consistency residual
    kind: str  # "real pair" or "simulated"
    name: str = ""

    def describe(self) -> dict[str, Any]:
        t, r = self.thick.geometry, self.reference.geometry
        return {
            "name": self.name,
            "kind": self.kind,
            "thick": {"slices": t.shape[0], "spacing_mm": t.slice_spacing, "thickness_mm": self.thickness,
                      "first_position_mm": float(t.slice_positions()[0])},
            "reference": {"slices": r.shape[0], "spacing_mm": r.slice_spacing,
                          "first_position_mm": float(r.slice_positions()[0]),
                          "size_xyz": [r.shape[2], r.shape[1], r.shape[0]],
                          "pixel_spacing_mm": list(r.spacing[:2])},
            "evaluated_slices": max(0, r.shape[0] - 2 * metrics.EDGE_SLICES),
        }


@dataclass
class MethodResult:
    method: str
    scores: metrics.Scores
    seconds: float
    output: Optional[Volume] = None  # kept for figures
    reliability: Optional[dict[str, Any]] = None  # metrics.uncertainty_reliability, when there is an uncertainty

    def as_dict(self) -> dict[str, Any]:
        extra = {} if self.reliability is None else {"uncertainty": self.reliability}
        return {**self.scores.as_dict(), "seconds": self.seconds, **extra}


@dataclass
class Evaluation:
    case: EvaluationCase
    results: dict[str, MethodResult] = field(default_factory=dict)
    # Real pairs: how well the true thin series, re-averaged by the slab model, matches the
    # scanner's thick slices. A method's residual far below it is not by itself a virtue.
    reference_consistency_mae_hu: Optional[float] = None

    def as_dict(self, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        return {
            "methods": {name: r.as_dict() for name, r in self.results.items()},
            "case": {**self.case.describe(), "reference_consistency_mae_hu": self.reference_consistency_mae_hu},
            "protocol": {
                "hu_range": list(metrics.PROTOCOL_HU_RANGE),
                "edge_slices_dropped": metrics.EDGE_SLICES,
                "ssim": "2-D per axial slice, 11x11 Gaussian sigma 1.5, zero padding, mean over slices",
                "soft_tissue_window": list(metrics.SOFT_TISSUE_WINDOW),
                "body_mask": f"reference > {metrics.BODY_THRESHOLD_HU:g} HU, largest component, 2-D holes filled, not eroded",
            },
            "machine": machine_description(),
            **dict(extra or {}),
        }


def machine_description() -> dict[str, Any]:
    import numpy

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
    }
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if "torch" in sys.modules:  # only when a diffusion run loaded it: say whether a GPU was used
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # AVX2 / AVX512: speed differs 2x
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def cpu_model() -> str | None:
    """The CPU's model name (Linux), which times depend on more than on the core count."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# --- cases -----------------------------------------------------------------------------------
def covered_reference(thick: Volume, reference: Volume) -> Volume:
    """The reference's slices lying between the first and last thick-slice centre."""
    positions = reference.geometry.slice_positions()
    centres = thick.geometry.slice_positions()
    sign = 1.0 if np.dot(thick.geometry.normal, reference.geometry.normal) > 0 else -1.0
    lo, hi = sorted((centres[0] * sign, centres[-1] * sign))
    inside = np.flatnonzero((positions >= lo - POSITION_TOLERANCE_MM) & (positions <= hi + POSITION_TOLERANCE_MM))
    if inside.size < 2:
        raise InputError(
            f"the reference slices ({positions[0]:.2f} .. {positions[-1]:.2f} mm) do not overlap the thick "
            f"slices ({centres[0]:.2f} .. {centres[-1]:.2f} mm along the normal): is it the same scan?"
        )
    first, last = int(inside[0]), int(inside[-1])
    geometry = reference.geometry.with_slices(float(positions[first]), last - first + 1, reference.geometry.slice_spacing)
    return Volume(reference.array[first : last + 1], geometry, dict(reference.metadata))


def real_pair_case(thick: Volume, reference: Volume, name: str = "") -> EvaluationCase:
    """A real thick series and the thin series of the same scan."""
    from ..core.grid import like_grid

    like_grid(thick.geometry, reference.geometry)  # same in-plane grid and parallel slices, else a clear error
    if reference.geometry.slice_spacing >= thick.geometry.slice_spacing:
        raise InputError(
            f"the reference spacing ({reference.geometry.slice_spacing:g} mm) is not finer than the thick "
            f"spacing ({thick.geometry.slice_spacing:g} mm): swap --thin and --thick?"
        )
    return EvaluationCase(thick, covered_reference(thick, reference), thick.slice_thickness, "real pair", name)


def simulated_case(reference: Volume, thickness: float, spacing: Optional[float] = None, name: str = "") -> EvaluationCase:
    """Thick slices of ``thickness`` mm simulated from ``reference`` as slab means, every
    ``spacing`` mm (default: contiguous slabs)."""
    thick = simulate_thick(reference, thickness, spacing)
    return EvaluationCase(thick, covered_reference(thick, reference), float(thickness), "simulated", name)


# --- running ---------------------------------------------------------------------------------
CONSISTENCY_SUFFIXES = {"+consistency": True, "-consistency": False}


INTEGER_OPTIONS = ("samples", "steps")


def parse_method_label(label: str) -> tuple[str, dict[str, Any]]:
    """``bspline+consistency`` -> ("bspline", {"consistency": True});
    ``residual_diffusion:samples=1`` -> ("residual_diffusion", {"samples": 1}) (``samples`` and
    ``steps``, each ``:key=value``); a plain name has no variant."""
    name, *settings = label.split(":")
    variant: dict[str, Any] = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        if key not in INTEGER_OPTIONS or not value.isdigit():
            raise InputError(f"method {label!r}: expected :samples=N or :steps=N after the name, got {setting!r}")
        variant[key] = int(value)
    for suffix, value in CONSISTENCY_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], {"consistency": value, **variant}
    return name, variant


def evaluate_methods(
    case: EvaluationCase,
    methods: Iterable[str],
    options: Optional[Mapping[str, Any]] = None,
    progress=None,
    keep_outputs: bool = True,
    on_result=None,
    interpolator=None,
) -> Evaluation:
    """Run each method on ``case.thick`` onto the reference's slice positions and score it.

    ``options``: extra ``InterpolationRequest`` fields (model, steps, sampler, device, seed...),
    shared by the methods: each gets those it takes (a label's own ``:samples=N`` is checked).
    ``interpolator``: an already-loaded diffusion model, so that evaluating many cases loads it
    once (and its time is the interpolation only)."""
    evaluation = Evaluation(case)
    if case.kind == "real pair":
        evaluation.reference_consistency_mae_hu = consistency_mae(case.thick, case.reference, case.thickness)
    for method in methods:
        name, variant = parse_method_label(method)
        request = InterpolationRequest(method=name, target=case.reference.geometry, **{**shared_options(name, dict(options or {})), **variant})
        result = interpolate(case.thick, request, progress=progress, interpolator=interpolator)
        output = result.volume
        if output.shape != case.reference.shape or not np.allclose(
            output.geometry.slice_positions(), case.reference.geometry.slice_positions(), atol=POSITION_TOLERANCE_MM
        ):
            raise InputError(f"method {method} did not return the requested slice positions")
        scores = metrics.score(output.array, case.reference.array)
        scores.consistency_mae_hu = consistency_mae(case.thick, output, case.thickness)
        reliability = None
        if result.uncertainty is not None:
            reliability = metrics.uncertainty_reliability(result.uncertainty.array, output.array, case.reference.array)
        evaluation.results[method] = MethodResult(method, scores, result.seconds, output if keep_outputs else None,
                                                  reliability)
        if on_result is not None:
            on_result(evaluation.results[method])
    return evaluation


# --- reporting -------------------------------------------------------------------------------
COLUMNS = [
    ("psnr", "PSNR (dB)", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("psnr_soft_tissue", "PSNR 40/400 (dB)", "{:.2f}"),
    ("psnr_body", "PSNR body (dB)", "{:.2f}"),
    ("consistency_mae_hu", "thick MAE (HU)", "{:.2f}"),
    ("flat_texture_ratio", "flat texture", "{:.2f}"),
    ("through_plane_gradient_ratio", "z-gradient", "{:.2f}"),
    ("seconds", "time (s)", "{:.2f}"),
]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def table_rows(evaluation: Evaluation) -> list[list[str]]:
    rows = [["method"] + [title for _, title, _ in COLUMNS]]
    for name, result in evaluation.results.items():
        values = result.as_dict()
        rows.append([name] + [_cell(values[key], fmt) for key, _, fmt in COLUMNS])
    return rows


def format_table(evaluation: Evaluation) -> str:
    rows = table_rows(evaluation)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(evaluation: Evaluation) -> str:
    rows = table_rows(evaluation)
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(out)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/NaN; an infinite PSNR means identical volumes
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def write_json(evaluation: Evaluation, path: str | os.PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    path = Path(path)
    with atomic_file(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(_json_safe(evaluation.as_dict(extra)), indent=2) + "\n")
    return path


def write_summary(evaluation: Evaluation, path: str | os.PathLike, command: str = "", figures: Iterable[str] = ()) -> Path:
    """``summary.md``: the case, the protocol in one paragraph, the table, the figures."""
    case = evaluation.case.describe()
    machine = machine_description()
    lines = [
        f"# Evaluation: {case['name'] or evaluation.case.kind}",
        "",
        f"- case: {case['kind']}; thick {case['thick']['slices']} slices every {case['thick']['spacing_mm']:g} mm "
        f"(slab {case['thick']['thickness_mm']:g} mm) -> reference {case['reference']['slices']} slices every "
        f"{case['reference']['spacing_mm']:g} mm, {case['evaluated_slices']} scored after dropping "
        f"{metrics.EDGE_SLICES} at each end",
        f"- metrics: RPLHR-CT protocol (HU [-1024, 2048] -> [0, 1], whole field of view, SSIM 2-D per axial slice, "
        f"11x11 Gaussian sigma 1.5); PSNR 40/400 = soft-tissue window; PSNR body = inside the body mask "
        f"(reference > {metrics.BODY_THRESHOLD_HU:g} HU); thick MAE = |input thick - output re-averaged by the slab model|; "
        f"flat texture = local std (5x5x5) of the output over the reference's where the reference is flat soft tissue "
        f"(std < {metrics.FLAT_STD_HU:g} HU, in 40/400): above 1 is invented texture; z-gradient = energy of the "
        f"slice-to-slice differences over the reference's: 1 is the truth, below blur, above noise",
        f"- machine: {machine['cpu_count']} CPU cores, {machine.get('memory_gib', '?')} GiB, {machine['processor']}, "
        f"{'GPU ' + str(machine['cuda']) if machine.get('cuda') else 'no GPU used'}; times include only the interpolation",
    ]
    if evaluation.reference_consistency_mae_hu is not None:
        lines.append(f"- the real thin reference itself, re-averaged into {case['thick']['thickness_mm']:g} mm slabs, differs from "
                     f"the real thick slices by {evaluation.reference_consistency_mae_hu:.2f} HU (thick MAE of the truth)")
    if command:
        lines.append(f"- command: `{command}`")
    lines += ["", markdown_table(evaluation), ""]
    for figure in figures:
        name = Path(figure).name
        lines += [f"![{Path(name).stem}]({name})", ""]
    path = Path(path)
    with atomic_file(path, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines))
    return path
