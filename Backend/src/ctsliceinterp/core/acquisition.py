"""Acquisition model: a thick CT slice is the mean of the thin slab it covers.

Validated on the real phantom pair (see README): the slab mean of the 1 mm series matches the
scanner's own 5 mm slices far better than the nearest thin slice does. Used to make training
and evaluation pairs from thin CT, to score an output against the thick slices
(``consistency_mae``) and to correct it towards them (``consistency_correction``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .errors import InputError
from .progress import Reporter
from .volume import Geometry, Volume


def slab_weights(thin_positions: np.ndarray, thin_spacing: float, centres: np.ndarray, thickness: float) -> np.ndarray:
    """Matrix A (n_thick, n_thin): thick = A @ thin, each row the overlap of the slab
    [c - T/2, c + T/2] with each thin voxel [p - s/2, p + s/2], normalised to sum 1.

    Slabs reaching past the thin coverage are averaged over the covered part only."""
    thin_positions = np.asarray(thin_positions, dtype=float)
    centres = np.asarray(centres, dtype=float)
    lo = np.maximum(centres[:, None] - thickness / 2, thin_positions[None, :] - thin_spacing / 2)
    hi = np.minimum(centres[:, None] + thickness / 2, thin_positions[None, :] + thin_spacing / 2)
    weights = np.clip(hi - lo, 0.0, None)
    totals = weights.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        raise InputError("a thick slab lies entirely outside the thin volume")
    return weights / totals


def apply_along_slices(matrix: np.ndarray, array: np.ndarray, chunk_voxels: int = 1 << 22) -> np.ndarray:
    """out[k] = sum_j matrix[k, j] * array[j], in float32, in column chunks to bound memory."""
    n_in = array.shape[0]
    flat = array.reshape(n_in, -1)
    out = np.empty((matrix.shape[0], flat.shape[1]), dtype=np.float32)
    m = matrix.astype(np.float32)
    step = max(1, chunk_voxels // max(1, n_in))
    for start in range(0, flat.shape[1], step):
        stop = min(flat.shape[1], start + step)
        np.matmul(m, flat[:, start:stop].astype(np.float32, copy=False), out=out[:, start:stop])
    return out.reshape((matrix.shape[0],) + array.shape[1:])


def thick_geometry_for(thin: Geometry, thickness: float, spacing: float | None = None) -> Geometry:
    """Geometry of simulated thick slices: slabs fully inside the thin coverage, every
    ``spacing`` mm (default: the thickness, i.e. contiguous slabs)."""
    spacing = float(thickness if spacing is None else spacing)
    if thickness <= thin.slice_spacing * (1 + 1e-3):
        raise InputError(
            f"thickness {thickness:g} mm is not larger than the thin spacing {thin.slice_spacing:g} mm"
        )
    positions = thin.slice_positions()
    first = positions[0] - thin.slice_spacing / 2 + thickness / 2
    last_allowed = positions[-1] + thin.slice_spacing / 2 - thickness / 2
    if last_allowed < first - 1e-6:
        raise InputError(f"the thin volume ({len(positions)} slices) is shorter than one {thickness:g} mm slab")
    count = int(math.floor((last_allowed - first) / spacing + 1e-6)) + 1
    return thin.with_slices(first, count, spacing)


def simulate_thick(thin: Volume, thickness: float, spacing: float | None = None) -> Volume:
    """Thick slices of ``thickness`` mm simulated as slab means of a thin volume."""
    target = thick_geometry_for(thin.geometry, thickness, spacing)
    return reaverage(thin, target, thickness)


def reaverage(thin: Volume, thick: Geometry, thickness: float) -> Volume:
    """Slab means of ``thin`` centred on the slices of ``thick`` (same in-plane grid)."""
    weights = slab_weights(thin.geometry.slice_positions(), thin.geometry.slice_spacing, thick.slice_positions(), thickness)
    array = apply_along_slices(weights, thin.array)
    return thin.derived(array, thick, slice_thickness=float(thickness))


def covered_slabs(thin: Geometry, centres: np.ndarray, thickness: float) -> np.ndarray:
    """Which thick slabs (centred on ``centres``) lie entirely inside the thin coverage. Only
    those can be compared with a thin volume: a partly covered slab's measured mean includes
    tissue the thin volume does not have."""
    positions = thin.slice_positions()
    lo = positions[0] - thin.slice_spacing / 2 - 1e-6
    hi = positions[-1] + thin.slice_spacing / 2 + 1e-6
    centres = np.asarray(centres, dtype=float)
    return (centres - thickness / 2 >= lo) & (centres + thickness / 2 <= hi)


def consistency_mae(thick: Volume, thin: Volume, thickness: float | None = None) -> float:
    """Mean absolute HU difference between measured thick slices and the thin volume re-averaged
    by the acquisition model. Thick slabs not fully covered by the thin volume are skipped."""
    thickness = float(thickness or thick.slice_thickness)
    thin_pos = thin.geometry.slice_positions()
    centres = thick.geometry.slice_positions()
    inside = covered_slabs(thin.geometry, centres, thickness)
    if not np.any(inside):
        # Fall back to partially covered slabs (thin grid spanning only thick centres).
        half = thin.geometry.slice_spacing / 2 + 1e-6
        inside = (centres >= thin_pos[0] - half) & (centres <= thin_pos[-1] + half)
    if not np.any(inside):
        raise InputError("the thin volume does not cover any thick slice")
    weights = slab_weights(thin_pos, thin.geometry.slice_spacing, centres[inside], thickness)
    reavg = apply_along_slices(weights, thin.array)
    return float(np.mean(np.abs(reavg - thick.array[inside].astype(np.float32))))


def consistency_correction(
    thin: np.ndarray,
    thin_geometry: Geometry,
    thick: np.ndarray,
    thick_geometry: Geometry,
    thickness: float,
    tolerance_hu: float = 1.0,
    max_iterations: int = 50,
    reporter: Optional[Reporter] = None,
) -> tuple[np.ndarray, list[float]]:
    """Make an interpolated thin volume agree with the measured thick slices (iterative
    back-projection through the acquisition model).

    A (n_thick, n_thin) is the acquisition model (slab means). Each iteration re-averages the
    thin volume, takes the residual r = thick - A @ thin and adds pinv(A) @ r, the smallest
    change that explains it (for non-overlapping slabs: the slab's residual spread evenly over
    its thin slices). Stops when the mean |r| <= ``tolerance_hu``. Only ``covered_slabs`` are
    used: matching a partly covered slab would push error into the end slices.
    Returns the corrected volume and the residual history."""
    reporter = reporter or Reporter()
    centres = thick_geometry.slice_positions()
    inside = covered_slabs(thin_geometry, centres, thickness)
    out = np.array(thin, dtype=np.float32, copy=True)
    if not np.any(inside):
        return out, []
    measured = np.asarray(thick, dtype=np.float32)[inside]
    acquisition = slab_weights(thin_geometry.slice_positions(), thin_geometry.slice_spacing, centres[inside], thickness)
    back_projection = np.linalg.pinv(acquisition)
    history: list[float] = []
    for iteration in range(max_iterations):
        residual = measured - apply_along_slices(acquisition, out)
        history.append(float(np.mean(np.abs(residual))))
        reporter.update("consistency", iteration + 1, max_iterations)
        if history[-1] <= tolerance_hu:
            break
        out += apply_along_slices(back_projection, residual)
    reporter.update("consistency", max_iterations, max_iterations)
    return out, history
