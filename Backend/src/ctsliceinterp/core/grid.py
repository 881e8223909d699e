"""Target grids for interpolation: a thin grid from the thick geometry, or a reference's grid.

Both keep the thick volume's in-plane grid and direction; only the slice positions along the
normal change. Positions are physical (mm along the normal), so thick and thin volumes are
paired by where their slices are, never by index.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import GeometryError, InputError
from .volume import Geometry

DEFAULT_SPACING_MM = 1.0


def check_slices(thick: Geometry) -> None:
    """Interpolation along the slice axis needs at least 2 input slices (the one check, made where
    the target grid is built: every method gets its target here)."""
    if thick.shape[0] < 2:
        raise InputError("the input has a single slice: a 3-D volume with at least 2 slices is needed")


def thin_grid(thick: Geometry, spacing: float = DEFAULT_SPACING_MM) -> Geometry:
    """Slices every ``spacing`` mm from the first to the last thick-slice centre."""
    spacing = float(spacing)
    if not (spacing > 0 and math.isfinite(spacing)):
        raise InputError(f"target spacing must be a positive number of mm, got {spacing}")
    check_slices(thick)
    if thick.slice_spacing <= spacing * (1 + 1e-3):
        raise InputError(
            f"the input slice spacing ({thick.slice_spacing:g} mm) is already at or below the "
            f"target spacing ({spacing:g} mm): nothing to interpolate"
        )
    span = (thick.shape[0] - 1) * thick.slice_spacing
    intervals = span / spacing
    if not intervals < 1e9:  # also inf: a spacing like 5e-324 would overflow the slice count
        raise InputError(f"target spacing {spacing:g} mm is far too small for a {span:g} mm span")
    count = int(math.floor(intervals + 1e-6)) + 1
    first = float(thick.slice_positions()[0])
    return thick.with_slices(first, count, spacing)


def like_grid(thick: Geometry, reference: Geometry) -> Geometry:
    """The reference volume's slice positions on the thick volume's in-plane grid.

    The reference must have parallel slices and the same in-plane grid (rows, columns, pixel
    spacing, direction, no in-plane shift); a real thick/thin pair from one scan has that.
    """
    check_slices(thick)
    if not np.allclose(np.abs(np.dot(thick.normal, reference.normal)), 1.0, atol=1e-4):
        raise GeometryError("the reference slices are not parallel to the input slices")
    if not thick.same_in_plane_grid(reference):
        raise GeometryError(
            "the reference does not share the input's in-plane grid (rows, columns, pixel spacing, "
            f"direction and in-plane position): input {thick.describe()}; reference {reference.describe()}"
        )
    target = thick.with_slices(float(reference.slice_positions()[0]), reference.shape[0], reference.slice_spacing)
    _check_overlap(thick, target)
    return target


def _check_overlap(thick: Geometry, target: Geometry) -> None:
    """Refuse a target whose slices all lie outside the slabs the input covers (each thick slice
    covers half its spacing on either side): every output slice would be a copy of an end slice."""
    half = thick.slice_spacing / 2
    positions = thick.slice_positions()
    low, high = float(positions[0]) - half, float(positions[-1]) + half
    first = float(target.slice_positions()[0])
    last = first + (target.shape[0] - 1) * target.spacing[2]
    if last < low or first > high:
        raise GeometryError(
            f"the target slices ({first:.1f} to {last:.1f} mm along the slice normal) do not overlap the input "
            f"({low:.1f} to {high:.1f} mm): choose a reference grid from the same scan"
        )


def fractional_indices(source: Geometry, target: Geometry) -> np.ndarray:
    """For each target slice, its continuous index in the source's slice axis."""
    return (target.slice_positions() - source.slice_positions()[0]) / source.slice_spacing
