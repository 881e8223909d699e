"""Render docs/images/slicer-side-by-side.png: the module's review layout, drawn from real data.

This is a *rendering*, not a screenshot of 3D Slicer (Slicer cannot run on the machine that
made it). It shows what the module's "Side by side" layout puts on screen after a run: the
thick input in the Red view on the left, the thin output in the Yellow view on the right, the
same plane in both (the views are linked). The data is real: the bundled 5 mm head phantom
(``samples/phantom_head_thick_5mm.nii.gz``), interpolated to 1 mm by the command line with
``--method bspline``. The plane is coronal, where the slice direction runs top to bottom, so
the 5 mm slabs of the input (drawn without display interpolation) are visible. Window/level
400/40 HU, as the module copies from the input.

    .venv/bin/python docs/images/make_slicer_side_by_side.py [--out docs/images/slicer-side-by-side.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "phantom_head_thick_5mm.nii.gz"
WINDOW, LEVEL = 400.0, 40.0
# Slicer's view colours (qMRMLSliceControllerWidget: Red #f34a33, Yellow #edd54c).
RED_VIEW, YELLOW_VIEW = "#f34a33", "#edd54c"


def read(path: Path):
    """(array [z, y, x] in HU, spacing (x, y, z) mm) of an axis-aligned volume."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.eye(3), atol=1e-6):
        raise SystemExit(f"{path} is not axis-aligned; this rendering handles axial volumes only")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    for axis, sign in enumerate(np.diag(direction)):  # LPS axes increasing: i to L, j to P, k to S
        if sign < 0:
            array = np.flip(array, axis=2 - axis)
    return array, image.GetSpacing()


def coronal(array: np.ndarray, row: int) -> np.ndarray:
    """The coronal plane at row ``row`` (j), superior at the top, patient right on the left."""
    return array[::-1, row, :]


def draw_view(axes, plane, spacing_x, spacing_z, colour, title, height_mm):
    """One slice view. Heights are physical: the first input slice centre is at 0 mm in both,
    and each slice covers its spacing around its centre."""
    low, high = LEVEL - WINDOW / 2, LEVEL + WINDOW / 2
    width = plane.shape[1] * spacing_x
    bottom, top = -spacing_z / 2, (plane.shape[0] - 0.5) * spacing_z
    axes.imshow(plane, cmap="gray", vmin=low, vmax=high, interpolation="nearest",
                extent=(0, width, bottom, top), aspect="equal")
    axes.set_ylim(*height_mm)  # the same physical range in both views, as linked views show
    axes.set_facecolor("black")
    axes.set_xticks([])
    axes.set_yticks([])
    for side in axes.spines.values():
        side.set_color(colour)
        side.set_linewidth(2)
    axes.set_title(title, loc="left", fontsize=9, color="black", backgroundcolor=colour, pad=4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "slicer-side-by-side.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as folder:
        thin_path = Path(folder) / "phantom_head_thin_1mm.nrrd"
        subprocess.run([sys.executable, "-m", "ctsliceinterp.cli", "interpolate", str(SAMPLE), "-o", str(thin_path),
                        "--method", "bspline", "--spacing", "1"], check=True)
        thick, thick_spacing = read(SAMPLE)
        thin, thin_spacing = read(thin_path)
    row = thick.shape[1] // 2
    height_mm = (-thick_spacing[2] / 2, (thick.shape[0] - 0.5) * thick_spacing[2])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6), facecolor="#3c3c3c")
    draw_view(left, coronal(thick, row), thick_spacing[0], thick_spacing[2], RED_VIEW,
              f" Red: input, {thick.shape[0]} slices x {thick_spacing[2]:g} mm ", height_mm)
    draw_view(right, coronal(thin, row), thin_spacing[0], thin_spacing[2], YELLOW_VIEW,
              f" Yellow: output (B-spline), {thin.shape[0]} slices x {thin_spacing[2]:g} mm ", height_mm)
    figure.text(0.5, 0.02, "Rendered with matplotlib from the bundled head phantom by "
                "docs/images/make_slicer_side_by_side.py; not a Slicer screenshot.\n"
                "The module's side-by-side layout, linked views, coronal plane, W/L 400/40 HU.",
                ha="center", fontsize=8, color="white")
    figure.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.11, wspace=0.04)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110, facecolor=figure.get_facecolor())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
