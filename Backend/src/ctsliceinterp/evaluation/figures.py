"""PNG figures: the same anatomy through several volumes, in axial, coronal and sagittal views.

Volumes may sit on different slice grids (thick input, thin outputs): every view is drawn in
physical millimetres along the slice normal, so a 5 mm input looks blocky next to a 1 mm output
instead of squashed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..core.volume import Volume
from ..io.atomic import atomic_file
from .metrics import SOFT_TISSUE_WINDOW, window_bounds


def _views(volume: Volume, position: float, row: int, col: int):
    """Axial slice nearest ``position`` (mm along the normal), coronal row, sagittal column."""
    positions = volume.geometry.slice_positions()
    k = int(np.argmin(np.abs(positions - position)))
    return volume.array[k], volume.array[:, row, :], volume.array[:, :, col]


def comparison_figure(
    volumes: Mapping[str, Volume],
    path: str | os.PathLike,
    window: tuple[float, float] = SOFT_TISSUE_WINDOW,
    title: Optional[str] = None,
    errors_against: Optional[str] = None,
) -> str:
    """One column per named volume, rows axial / coronal / sagittal. All volumes must share the
    in-plane grid. With ``errors_against`` (a name in ``volumes``), a last row shows
    |volume - reference| axially for volumes on the reference's grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(volumes)
    first = volumes[names[0]]
    ny, nx = first.shape[1:]
    sx, sy = first.spacing[:2]
    # Centre of the overlap of all volumes along the normal.
    lo = max(v.geometry.slice_positions()[0] for v in volumes.values())
    hi = min(v.geometry.slice_positions()[-1] for v in volumes.values())
    centre = (lo + hi) / 2 if hi >= lo else float(np.mean(first.geometry.slice_positions()))
    vmin, vmax = window_bounds(window)
    rows = 3 + (1 if errors_against else 0)
    fig, axes = plt.subplots(rows, len(names), figsize=(3.2 * len(names), 3.2 * rows), squeeze=False)
    reference = volumes.get(errors_against) if errors_against else None
    for c, name in enumerate(names):
        v = volumes[name]
        axial, coronal, sagittal = _views(v, centre, ny // 2, nx // 2)
        z = v.geometry.slice_positions()
        zlo, zhi = z[0] - v.spacing[2] / 2, z[-1] + v.spacing[2] / 2
        kw = dict(cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[0, c].imshow(axial, extent=(0, nx * sx, ny * sy, 0), **kw)
        axes[1, c].imshow(coronal, extent=(0, nx * sx, zlo, zhi), origin="lower", **kw)
        axes[2, c].imshow(sagittal, extent=(0, ny * sy, zlo, zhi), origin="lower", **kw)
        axes[0, c].set_title(f"{name}\n{v.shape[0]} x {v.spacing[2]:g} mm", fontsize=9)
        for r in range(3):
            axes[r, c].set_ylim(*(axes[r, c].get_ylim() if r == 0 else (lo - 5, hi + 5)))
        if reference is not None:
            ax = axes[3, c]
            if v.shape == reference.shape and name != errors_against:
                k = int(np.argmin(np.abs(reference.geometry.slice_positions() - centre)))
                err = np.abs(v.array[k].astype(np.float32) - reference.array[k].astype(np.float32))
                im = ax.imshow(err, cmap="magma", vmin=0, vmax=200, extent=(0, nx * sx, ny * sy, 0))
                ax.set_title(f"|{name} - {errors_against}| (HU)", fontsize=8)
            else:
                ax.set_visible(False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for r, label in enumerate(["axial", "coronal", "sagittal", "abs. error"][:rows]):
        axes[r, 0].set_ylabel(label)
    fig.suptitle(title or f"window {window[0]:g}/{window[1]:g} HU", fontsize=10)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return str(path)


# --- evaluation report figures -----------------------------------------------------------
VIEWS = ("axial", "coronal", "sagittal")
ERROR_RANGE_HU = 200.0


def _axial_position(thick: Volume, reference: Volume) -> float:
    """A reference slice near the middle that lies as far as possible from any thick centre:
    the slice where interpolation has the most to do."""
    positions = reference.geometry.slice_positions()
    centres = thick.geometry.slice_positions()
    n = len(positions)
    middle = positions[n // 3 : max(n // 3 + 1, 2 * n // 3)]
    distance = np.min(np.abs(middle[:, None] - centres[None, :]), axis=1)
    # Prefer the farthest; among ties, the one closest to the centre.
    order = np.lexsort((np.abs(middle - positions[n // 2]), -np.round(distance, 3)))
    return float(middle[order[0]])


def _section(volume: Volume, view: str, position: float, row: int, col: int):
    """2-D image and its extent in mm (left, right, bottom, top) for imshow with origin='lower'
    along z; axial images are drawn top-down."""
    g = volume.geometry
    ny, nx = g.shape[1:]
    sx, sy, sz = g.spacing
    z = g.slice_positions()
    zlo, zhi = z[0] - sz / 2, z[-1] + sz / 2
    if view == "axial":
        k = int(np.argmin(np.abs(z - position)))
        return volume.array[k], (0, nx * sx, ny * sy, 0), float(z[k])
    if view == "coronal":
        return volume.array[:, row, :], (0, nx * sx, zlo, zhi), None
    return volume.array[:, :, col], (0, ny * sy, zlo, zhi), None


def _body_box(reference: Volume, margin: int = 8) -> tuple[slice, slice]:
    """Rows and columns holding anything above -500 HU in the middle slice (crop the air)."""
    middle = reference.array[reference.shape[0] // 2]
    ys, xs = np.nonzero(middle > -500)
    if ys.size == 0:
        return slice(None), slice(None)
    ny, nx = middle.shape
    return (slice(max(0, ys.min() - margin), min(ny, ys.max() + margin + 1)),
            slice(max(0, xs.min() - margin), min(nx, xs.max() + margin + 1)))


def evaluation_figures(
    thick: Volume,
    outputs: Mapping[str, Volume],
    reference: Volume,
    directory: str | os.PathLike,
    window: tuple[float, float] = SOFT_TISSUE_WINDOW,
    error_range: float = ERROR_RANGE_HU,
    title: Optional[str] = None,
    dpi: int = 80,
) -> list[str]:
    """``axial.png``, ``coronal.png`` and ``sagittal.png`` in ``directory``. Columns: the thick
    input, each method's output, the reference; second row: |output - reference| in HU. Every
    volume shares the reference's in-plane grid; views are in millimetres, cropped to the body."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    rows_box, cols_box = _body_box(reference)
    row = (rows_box.start or 0) + ((rows_box.stop or reference.shape[1]) - (rows_box.start or 0)) // 2
    col = (cols_box.start or 0) + ((cols_box.stop or reference.shape[2]) - (cols_box.start or 0)) // 2
    position = _axial_position(thick, reference)
    z = reference.geometry.slice_positions()
    zlo, zhi = z[0] - reference.spacing[2] / 2, z[-1] + reference.spacing[2] / 2
    sx, sy = reference.spacing[:2]
    panels = {"input (thick)": thick, **outputs, "reference (thin)": reference}
    vmin, vmax = window_bounds(window)
    written = []
    for view in VIEWS:
        if view == "axial":
            xlim = ((cols_box.start or 0) * sx, (cols_box.stop or reference.shape[2]) * sx)
            ylim = ((rows_box.stop or reference.shape[1]) * sy, (rows_box.start or 0) * sy)
        else:
            box = cols_box if view == "coronal" else rows_box
            step = sx if view == "coronal" else sy
            n = reference.shape[2] if view == "coronal" else reference.shape[1]
            xlim = ((box.start or 0) * step, (box.stop or n) * step)
            ylim = (zlo, zhi)
        aspect = abs(ylim[1] - ylim[0]) / max(1e-6, abs(xlim[1] - xlim[0]))
        width = 2.6
        fig, axes = plt.subplots(2, len(panels), figsize=(width * len(panels), 2 * width * aspect + 1.0), squeeze=False)
        ref_image = _section(reference, view, position, row, col)[0].astype(np.float32)
        error_image = None
        for c, (name, volume) in enumerate(panels.items()):
            image, extent, at = _section(volume, view, position, row, col)
            origin = "upper" if view == "axial" else "lower"
            ax = axes[0, c]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, extent=extent, origin=origin, interpolation="nearest")
            label = f"{name}\n{volume.shape[0]} x {volume.spacing[2]:g} mm"
            if view == "axial" and at is not None:
                label += f", z={at:.1f}"
            ax.set_title(label, fontsize=8)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            err_ax = axes[1, c]
            if volume is not reference and volume is not thick and volume.shape == reference.shape:
                err = np.abs(image.astype(np.float32) - ref_image)
                error_image = err_ax.imshow(err, cmap="magma", vmin=0, vmax=error_range, extent=extent, origin=origin, interpolation="nearest")
                err_ax.set_title(f"|{name} - reference|\nmean {err.mean():.0f} HU", fontsize=8)  # long names fit
                err_ax.set_xlim(*xlim)
                err_ax.set_ylim(*ylim)
            else:
                err_ax.axis("off")
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        if error_image is not None:
            fig.colorbar(error_image, ax=axes[1, -1], fraction=0.046, pad=0.04, label="HU")
            axes[1, -1].axis("off")
        fig.suptitle(f"{title + ' - ' if title else ''}{view}, window {window[0]:g}/{window[1]:g} HU, errors 0-{error_range:g} HU", fontsize=9)
        fig.tight_layout()
        path = directory / f"{view}.png"
        _save_small_png(fig, path, dpi)
        plt.close(fig)
        written.append(str(path))
    return written


def reliability_figure(reliability: Mapping[str, dict], path: str | os.PathLike, title: Optional[str] = None,
                       dpi: int = 80) -> str:
    """RMS error against the predicted standard deviation, per std decile (``metrics.uncertainty_reliability``),
    one line per method; the diagonal is a calibrated uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    top = 1.0
    for name, values in reliability.items():
        std = [b["mean_std_hu"] for b in values["bins"]]
        rms = [b["rms_error_hu"] for b in values["bins"]]
        top = max([top, *std, *rms])
        ax.plot(std, rms, "o-", label=f"{name} (r = {values['correlation']:.2f})")
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="calibrated")
    ax.set_xlabel("predicted standard deviation (HU), decile mean")
    ax.set_ylabel("RMS error (HU)")
    ax.legend(fontsize=7)
    ax.set_title(f"{title + chr(10) if title else ''}uncertainty reliability (body)", fontsize=7)
    fig.tight_layout()
    _save_small_png(fig, Path(path), dpi)
    plt.close(fig)
    return str(path)


def _save_small_png(fig, path: Path, dpi: int) -> None:
    """Save with a 256-colour palette: CT noise makes true-colour PNGs of a report several
    times larger, and a grey ramp plus one colour map fit in 256 colours."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_file(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", optimize=True)
