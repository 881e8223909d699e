"""PNG figures: the same anatomy through several volumes, in axial, coronal and sagittal views.

Volumes may sit on different slice grids (thick input, thin outputs): every view is drawn in
physical millimetres along the slice normal, so a 5 mm input looks blocky next to a 1 mm output
instead of squashed."""

from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np

from .io.atomic import atomic_file
from .volume import Volume

SOFT_TISSUE_WINDOW = (40.0, 400.0)  # centre, width (HU)


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
    vmin, vmax = window[0] - window[1] / 2, window[0] + window[1] / 2
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
