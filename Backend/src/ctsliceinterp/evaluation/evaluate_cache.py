"""Evaluate methods on every case of a training-cache split (``ctsliceinterp evaluate --cache
CACHE --split test``): one report with JSON, CSV, PNG figures and a Markdown summary.

Each cached case holds its thick and thin series with their LPS geometry (``cache.py``); the
methods interpolate the thick series onto the **cached thin slice positions** (the real thin
grid), and the thin series is the reference. Pairing is by physical position along the normal,
exactly as for a single case (``evaluate.real_pair_case``): the reference keeps the thin slices
between the first and last thick-slice centre, and the metrics drop ``metrics.EDGE_SLICES`` at
each end. A simulated case (thin-only source; thick = slab means) is scored the same way, with
its own slab width, and labelled "simulated" in the report.

Per-case scoring, tables and figures are those of ``evaluate.py`` / ``metrics.py`` /
``figures.py``; this module only loops over cases, keeps going past a bad case, and aggregates.

Report folder::

    REPORT/
        report.json          every case (scores per method, case description), the means, protocol, machine
        report.csv           one row per case and method, then one "mean" row per method
        summary.md           per-case table and mean table (Markdown), links to the figures
        psnr_by_method.png   PSNR of every case per method, with the mean
        cases/<category>/<case_id>/{axial,coronal,sagittal}.png, scores.json
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ..data import cache as cache_format
from . import metrics
from ..core.errors import CTSliceInterpError, InputError
from .evaluate import (
    COLUMNS,
    Evaluation,
    EvaluationCase,
    _cell,
    _json_safe,
    covered_reference,
    evaluate_methods,
    machine_description,
    real_pair_case,
)
from .evaluate import write_json as write_case_json
from ..io.atomic import atomic_file
from ..api import DIFFUSION_METHOD, load_model
from ..core.volume import Geometry, Volume

SCORE_KEYS = [key for key, _, _ in COLUMNS]


@dataclass
class CaseOutcome:
    key: str
    origin: str = ""
    evaluation: Optional[Evaluation] = None
    figures: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.evaluation is not None


@dataclass
class SplitReport:
    cache: str
    split: str
    methods: list[str]
    outcomes: list[CaseOutcome]
    crop: Optional[int] = None

    @property
    def evaluated(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.ok]

    def means(self) -> dict[str, dict[str, Optional[float]]]:
        """Mean of each score over the evaluated cases, per method (None when no case has it)."""
        out: dict[str, dict[str, Optional[float]]] = {}
        for method in self.methods:
            rows = [o.evaluation.results[method].as_dict() for o in self.evaluated if method in o.evaluation.results]
            out[method] = {}
            for key in SCORE_KEYS:
                values = [r[key] for r in rows if r.get(key) is not None]
                out[method][key] = float(np.mean(values)) if values else None
            out[method]["cases"] = len(rows)
        return out


# --- cases -----------------------------------------------------------------------------------
def crop_in_plane(volume: Volume, size: int) -> Volume:
    """A centred ``size`` x ``size`` in-plane crop with its geometry (the origin moves to the
    crop's first voxel); all slices kept. A quick look, not the full field of view."""
    g = volume.geometry
    ny, nx = g.shape[1:]
    sy, sx = min(size, ny), min(size, nx)
    y0, x0 = (ny - sy) // 2, (nx - sx) // 2
    origin = tuple(g.index_to_physical([x0, y0, 0]))
    geometry = Geometry((g.shape[0], sy, sx), g.spacing, origin, g.direction)
    return Volume(volume.array[:, y0 : y0 + sy, x0 : x0 + sx], geometry, dict(volume.metadata))


def evaluation_case(case: cache_format.CachedCase, crop: Optional[int] = None) -> EvaluationCase:
    """The cached pair as an ``EvaluationCase``: thick in, the thin series (on its own cached
    slice positions, inside the thick range) as the reference."""
    thick, thin = case.volume("thick"), case.volume("thin")  # memory-mapped int16 HU
    if crop:
        thick, thin = crop_in_plane(thick, crop), crop_in_plane(thin, crop)
    if case.manifest.get("origin") == "simulated":
        thickness = float(case.manifest["thick"]["slice_thickness_mm"])
        return EvaluationCase(thick, covered_reference(thick, thin), thickness, "simulated", case.key)
    return real_pair_case(thick, thin, case.key)


# --- running ---------------------------------------------------------------------------------
def evaluate_split(
    cache: str | os.PathLike,
    split: str,
    methods: Iterable[str],
    report_dir: str | os.PathLike,
    options: Optional[Mapping[str, Any]] = None,
    crop: Optional[int] = None,
    figures: bool = True,
    progress=None,
    command: str = "",
    on_case=None,
) -> SplitReport:
    """Run ``methods`` on every case of ``split`` and write the report into ``report_dir``.

    A case that cannot be evaluated (too few slices, no overlap...) is reported with its reason
    and the others continue. ``options``: ``InterpolationRequest`` fields for the diffusion
    method (model, steps, sampler, device, seed). ``on_case(outcome)`` after each case."""
    methods = list(methods)
    cases = cache_format.open_split(cache, split)
    if not cases:
        raise InputError(f"the {split!r} split of {cache} holds no cases: nothing to evaluate")
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    report = SplitReport(str(cache), split, methods, [], crop)
    interpolator = None
    if DIFFUSION_METHOD in methods:  # load the model once for the whole split
        opts = dict(options or {})
        interpolator = load_model(DIFFUSION_METHOD, opts.get("model"), device=opts.get("device", "auto"))
    for case in cases:
        outcome = CaseOutcome(case.key, str(case.manifest.get("origin", "")))
        try:
            evaluation = evaluate_methods(evaluation_case(case, crop), methods, options, progress=progress, keep_outputs=figures,
                                          interpolator=interpolator)
            folder = report_dir / "cases" / case.key
            folder.mkdir(parents=True, exist_ok=True)
            write_case_json(evaluation, folder / "scores.json", {"cache_case": case.key, "crop": crop})
            if figures:
                from .figures import evaluation_figures

                outputs = {m: r.output for m, r in evaluation.results.items()}
                outcome.figures = evaluation_figures(evaluation.case.thick, outputs, evaluation.case.reference, folder, title=case.key)
                for result in evaluation.results.values():
                    result.output = None  # free the volumes before the next case
            outcome.evaluation = evaluation
        except (CTSliceInterpError, KeyError, ValueError) as exc:  # one bad case must not stop the split
            outcome.error = str(exc).splitlines()[0]
        report.outcomes.append(outcome)
        if on_case is not None:
            on_case(outcome)
    write_report(report, report_dir, command)
    return report


# --- report ----------------------------------------------------------------------------------
def report_dict(report: SplitReport, command: str = "") -> dict[str, Any]:
    cases = []
    for o in report.outcomes:
        entry: dict[str, Any] = {"key": o.key, "origin": o.origin, "status": "ok" if o.ok else "failed"}
        if o.ok:
            data = o.evaluation.as_dict()
            entry.update(methods=data["methods"], case=data["case"])
        else:
            entry["reason"] = o.error
        cases.append(entry)
    first = report.evaluated[0].evaluation.as_dict() if report.evaluated else {}
    return {
        "cache": report.cache,
        "split": report.split,
        "methods": report.methods,
        "in_plane_crop": report.crop,
        "cases_total": len(report.outcomes),
        "cases_evaluated": len(report.evaluated),
        "mean": report.means(),
        "cases": cases,
        "protocol": first.get("protocol", {"edge_slices_dropped": metrics.EDGE_SLICES}),
        "pairing": "thick interpolated onto the cached thin slice positions (physical position along the normal), "
                   "reference restricted to the thin slices between the first and last thick centre",
        "machine": machine_description(),
        **({"command": command} if command else {}),
    }


def csv_text(report: SplitReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "kind", "method", *SCORE_KEYS, "evaluated_slices"])
    for o in report.evaluated:
        d = o.evaluation.case.describe()
        for method, result in o.evaluation.results.items():
            values = result.as_dict()
            writer.writerow([o.key, d["kind"], method, *(_csv_value(values[k]) for k in SCORE_KEYS), d["evaluated_slices"]])
    for method, values in report.means().items():
        writer.writerow(["mean", f"{values['cases']} cases", method, *(_csv_value(values[k]) for k in SCORE_KEYS), ""])
    return buffer.getvalue()


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return str(value)


def _markdown(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows[1:]]


def summary_markdown(report: SplitReport, command: str = "", figure_names: Iterable[str] = (), report_dir: Optional[Path] = None) -> str:
    machine = machine_description()
    titles = [title for _, title, _ in COLUMNS]
    lines = [
        f"# Evaluation: split '{report.split}' of {Path(report.cache).name}",
        "",
        f"- cases: {len(report.evaluated)} evaluated of {len(report.outcomes)} in the split; methods: {', '.join(report.methods)}",
        "- pairing: each method interpolates the cached thick series onto the cached thin slice positions (physical "
        "position along the normal); the reference is the thin series between the first and last thick centre, "
        f"{metrics.EDGE_SLICES} slices dropped at each end",
        f"- metrics: RPLHR-CT protocol (HU [-1024, 2048] -> [0, 1], SSIM 2-D per axial slice); PSNR 40/400 = soft-tissue "
        f"window; PSNR body = inside the body mask (reference > {metrics.BODY_THRESHOLD_HU:g} HU); thick MAE = |input "
        "thick - output re-averaged by the slab model|",
        f"- machine: {machine['cpu_count']} CPU cores, {machine.get('memory_gib', '?')} GiB, {machine['processor']}, "
        f"{'GPU ' + str(machine['cuda']) if machine.get('cuda') else 'no GPU used'}; times are the interpolation only "
        "(the diffusion model is loaded once, before the first case)",
    ]
    if report.crop:
        lines.append(f"- **in-plane crop**: a centred {report.crop} x {report.crop} crop of every case (a quick look; "
                     "not comparable to full field-of-view scores)")
    if command:
        lines.append(f"- command: `{command}`")
    lines += ["", "## Mean over cases", ""]
    mean_rows = [["method", "cases", *titles]]
    for method, values in report.means().items():
        mean_rows.append([method, str(values["cases"]), *(_cell(values[k], fmt) for k, _, fmt in COLUMNS)])
    lines += _markdown(mean_rows)
    lines += ["", "## Per case", ""]
    case_rows = [["case", "method", *titles, "real thin: thick MAE (HU)"]]
    for o in report.evaluated:
        reference_mae = o.evaluation.reference_consistency_mae_hu
        for method, result in o.evaluation.results.items():
            values = result.as_dict()
            case_rows.append([o.key, method, *(_cell(values[k], fmt) for k, _, fmt in COLUMNS), _cell(reference_mae, "{:.2f}")])
    lines += _markdown(case_rows)
    failed = [o for o in report.outcomes if not o.ok]
    if failed:
        lines += ["", "## Not evaluated", ""] + [f"- {o.key}: {o.error}" for o in failed]
    lines += [""]
    for name in figure_names:
        lines += [f"![{Path(name).stem}]({name})", ""]
    for o in report.evaluated:
        if o.figures:
            links = ", ".join(f"[{Path(f).stem}]({Path(os.path.relpath(f, report_dir or '.')).as_posix()})" for f in o.figures)
            lines.append(f"- figures of {o.key}: {links}")
    return "\n".join(lines) + "\n"


def psnr_figure(report: SplitReport, path: str | os.PathLike) -> Optional[str]:
    """PSNR of every evaluated case per method (dots) and the mean (bar)."""
    if not report.evaluated:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(report.methods) + 2, 3.2))
    means = report.means()
    for i, method in enumerate(report.methods):
        values = [o.evaluation.results[method].scores.psnr for o in report.evaluated if method in o.evaluation.results]
        values = [v for v in values if math.isfinite(v)]
        if means[method]["psnr"] is not None and math.isfinite(means[method]["psnr"]):
            ax.bar(i, means[method]["psnr"], color="#c8d7e8", width=0.6)
        ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [i] * len(values),
                   values, s=12, color="#1f4e79", zorder=3)
    finite = [v for o in report.evaluated for r in o.evaluation.results.values() for v in [r.scores.psnr] if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) - 2, max(finite) + 2)
    ax.set_xticks(range(len(report.methods)), report.methods)
    ax.set_ylabel("PSNR (dB), RPLHR-CT protocol")
    ax.set_title(f"split '{report.split}': {len(report.evaluated)} case(s), bar = mean", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return str(path)


def write_report(report: SplitReport, report_dir: str | os.PathLike, command: str = "") -> dict[str, Path]:
    report_dir = Path(report_dir)
    paths = {"json": report_dir / "report.json", "csv": report_dir / "report.csv", "summary": report_dir / "summary.md"}
    with atomic_file(paths["json"], suffix=".json") as tmp:
        tmp.write_text(json.dumps(_json_safe(report_dict(report, command)), indent=2) + "\n")
    with atomic_file(paths["csv"], suffix=".csv") as tmp:
        tmp.write_text(csv_text(report))
    figure = psnr_figure(report, report_dir / "psnr_by_method.png")
    if figure:
        paths["figure"] = Path(figure)
    with atomic_file(paths["summary"], suffix=".md") as tmp:
        tmp.write_text(summary_markdown(report, command, [Path(figure).name] if figure else [], report_dir))
    return paths
