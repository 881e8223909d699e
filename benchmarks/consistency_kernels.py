"""Which back-projection should the consistency correction use? Both variants, measured.

    .venv/bin/python benchmarks/consistency_kernels.py --json docs/quality/consistency_kernels.json \
        --figure docs/quality/consistency_kernels.png

The correction adds to the interpolated thin volume the change that makes its slab means equal
the measured thick slices (residual r = thick - A @ thin on the fully covered slabs):
- ``slab`` (shipped, ``core.acquisition.consistency_correction``): pinv(A) @ r, the smallest change,
  i.e. each slab's residual spread evenly over its thin slices; exact, but it can step at slab edges;
- ``smooth``: the residual carried by cubic B-spline coefficients on the thick grid,
  B (A B)^-1 r: equally exact, but smooth along the slices.
Each is also tried at half strength (``*0.5``), for real thick slices that are not exact slab means.

Cases: the validation chest (``chest_lungfcp-0001_1mm``: no network was trained on it; simulated
5 mm -> 1 mm) and the real phantom pair (real 5 mm -> 1 mm; in the network's training set), after
B-spline and after the shipped ``regression`` network. The choice is made on these; the held-out
chest is not used for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Backend" / "src"))
SHARED = REPO.parent / "shared" / "data"
VALIDATION = REPO / "runs" / "data" / "extra" / "chest_lungfcp-0001_1mm.nii.gz"


def smooth_back_projection(target, thick_geometry, inside: np.ndarray, thickness: float) -> np.ndarray:
    from ctsliceinterp.core.acquisition import slab_weights
    from ctsliceinterp.core.classical import interpolation_matrix
    from ctsliceinterp.core.grid import fractional_indices

    centres = thick_geometry.slice_positions()[inside]
    acquisition = slab_weights(target.slice_positions(), target.slice_spacing, centres, thickness)
    covered = thick_geometry.with_slices(float(centres[0]), len(centres), thick_geometry.slice_spacing)
    spline = interpolation_matrix("bspline", len(centres), fractional_indices(covered, target))
    return spline @ np.linalg.inv(acquisition @ spline)


def corrected(thin: np.ndarray, target, thick, kind: str, strength: float) -> np.ndarray:
    from ctsliceinterp.core.acquisition import apply_along_slices, covered_slabs, slab_weights

    thickness = float(thick.slice_thickness)
    inside = covered_slabs(target, thick.geometry.slice_positions(), thickness)
    acquisition = slab_weights(target.slice_positions(), target.slice_spacing, thick.geometry.slice_positions()[inside],
                               thickness)
    residual = np.asarray(thick.array, np.float32)[inside] - apply_along_slices(acquisition, thin)
    back = np.linalg.pinv(acquisition) if kind == "slab" else smooth_back_projection(target, thick.geometry, inside, thickness)
    return thin + strength * apply_along_slices(back, residual)


def cases():
    from ctsliceinterp.evaluation.evaluate import real_pair_case, simulated_case
    from ctsliceinterp.io import read_volume

    if VALIDATION.exists():
        yield "validation chest (simulated 5 mm -> 1 mm)", simulated_case(read_volume(VALIDATION), 5.0)
    else:
        print(f"skipping the validation chest: {VALIDATION} missing (../shared/data/extra/extract.sh makes it)")
    yield "phantom (real 5 mm -> 1 mm, in training)", real_pair_case(
        read_volume(SHARED / "volumes" / "phantom_head_thick_5mm.nii.gz"),
        read_volume(SHARED / "volumes" / "phantom_head_thin_1mm.nii.gz"))


def main(argv=None) -> int:
    from ctsliceinterp.core.acquisition import consistency_mae
    from ctsliceinterp.core.classical import interpolate_classical
    from ctsliceinterp.core.volume import Volume
    from ctsliceinterp.evaluation import metrics
    from ctsliceinterp.pipelines.regression import RegressionInterpolator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--figure", help="coronal/sagittal views of the phantom after each variant")
    args = parser.parse_args(argv)
    network = RegressionInterpolator.load("regression", device="cpu")
    report, figure_volumes = [], {}
    for label, case in cases():
        target = case.reference.geometry
        bases = {"bspline": interpolate_classical(case.thick, target, "bspline").array,
                 "regression": network.run(case.thick, target, consistency=False).array}
        for base_name, base in bases.items():
            variants = {"none": base}
            for kind in ("slab", "smooth"):
                for strength in (1.0, 0.5):
                    variants[kind + ("" if strength == 1.0 else f"*{strength:g}")] = corrected(base, target, case.thick, kind, strength)
            for name, array in variants.items():
                s = metrics.score(array, case.reference.array)
                row = {"case": label, "base": base_name, "correction": name, "psnr": s.psnr, "ssim": s.ssim,
                       "psnr_soft_tissue": s.psnr_soft_tissue,
                       "consistency_mae_hu": consistency_mae(case.thick, Volume(array, target, {}), case.thickness)}
                report.append(row)
                print(f"{label:45s} {base_name:10s} {name:10s} PSNR {s.psnr:6.2f}  40/400 {s.psnr_soft_tissue:6.2f}  "
                      f"SSIM {s.ssim:.4f}  thick MAE {row['consistency_mae_hu']:.2f} HU")
                if label.startswith("phantom") and base_name == "bspline" and name in ("none", "slab", "smooth"):
                    figure_volumes[f"B-spline + {name}"] = Volume(array, target, {})
        if label.startswith("phantom"):
            figure_volumes["reference (1 mm)"] = case.reference
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "results": report}, indent=1) + "\n")
    if args.figure and figure_volumes:
        from ctsliceinterp.evaluation.figures import comparison_figure

        comparison_figure(figure_volumes, args.figure, title="consistency back-projection: slab (pinv) vs smooth (B-spline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
