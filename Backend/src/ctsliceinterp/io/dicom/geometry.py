"""Geometry of one series: named checks that the planes form one regular grid, the LPS Geometry they
span, and the de-tilted grid of a gantry-tilted series.

LPS as DICOM: direction columns = row direction, column direction, their cross product (the normal);
origin = ImagePositionPatient of the first plane after sorting along the normal."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...core.errors import GeometryError, InputError
from ...core.volume import Geometry
from .scan import Slice

# Tolerances on slice positions (IPP is often written with 2 decimals).
POSITION_TOLERANCE_MM = 0.02
SPACING_RELATIVE_TOLERANCE = 0.01
# In-plane drift of the slice origins, as a fraction of the pixel size, that still counts as no tilt.
TILT_TOLERANCE_PIXELS = 0.1


@dataclass(frozen=True)
class Tilt:
    """How far each plane's origin drifts within the slice plane: a sheared (gantry-tilted) grid."""

    shift_columns: np.ndarray  # per plane, in pixels along the row direction (i)
    shift_rows: np.ndarray  # per plane, in pixels along the column direction (j)
    drift_mm: float
    span_mm: float
    gantry_tag: str  # GantryDetectorTilt as written, for the message

    @property
    def degrees(self) -> float:
        return float(np.degrees(np.arctan2(self.drift_mm, self.span_mm)))

    def describe(self) -> str:
        return (f"gantry tilt: the slices shift {self.drift_mm:.2f} mm within their plane over {self.span_mm:.1f} mm "
                f"(about {self.degrees:.1f} degrees; GantryDetectorTilt {self.gantry_tag})")


# ---------------------------------------------------------------------------------------------
# Checks on each plane, and between planes
# ---------------------------------------------------------------------------------------------
def check_plane_geometry_present(slices: list[Slice]) -> None:
    for s in slices:
        if s.position is None or s.orientation is None:
            raise InputError(
                f"{s.display} has no ImagePositionPatient/ImageOrientationPatient: "
                "not a CT slice with geometry (secondary capture or scout?)"
            )


def check_same_image_size(slices: list[Slice], source: str) -> None:
    first = slices[0]
    for s in slices:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(
                f"mixed image sizes in one series of {source}: {first.name} is "
                f"{first.columns}x{first.rows}, {s.name} is {s.columns}x{s.rows}"
            )


def check_same_orientation(slices: list[Slice], source: str) -> None:
    first = slices[0]
    for s in slices:
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise GeometryError(
                f"mixed orientations in one series of {source}: {first.name} has "
                f"ImageOrientationPatient {list(first.orientation)}, {s.name} has {list(s.orientation)}"
            )


def check_same_pixel_spacing(slices: list[Slice], source: str) -> None:
    first = slices[0]
    for s in slices:
        if s.pixel_spacing is None or s.pixel_spacing != first.pixel_spacing:
            raise GeometryError(
                f"missing or mixed PixelSpacing in one series of {source} ({first.name}: "
                f"{first.pixel_spacing}, {s.name}: {s.pixel_spacing})"
            )


def slice_axes(orientation: tuple[float, ...], source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row direction, column direction and normal; refuses an orientation that is not two
    orthonormal vectors."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(np.dot(row, col)) > 1e-3:
        raise GeometryError(f"ImageOrientationPatient {list(orientation)} in {source} is not two orthonormal vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def check_not_single(slices: list[Slice], source: str) -> None:
    if len(slices) < 2:
        first = slices[0]
        raise InputError(f"{source} holds a single slice ({first.columns}x{first.rows}): a 2-D image; a 3-D CT series is needed")


def check_no_duplicate_positions(slices: list[Slice], positions: np.ndarray, source: str) -> None:
    duplicates = np.flatnonzero(np.diff(positions) < POSITION_TOLERANCE_MM)
    if duplicates.size:
        k = int(duplicates[0])
        raise GeometryError(
            f"duplicate slice position {positions[k]:.2f} mm in {source}: {slices[k].name} and "
            f"{slices[k + 1].name} (two acquisitions mixed in one series?)"
        )


def spacing_problem(slices: list[Slice], positions: np.ndarray, source: str) -> str | None:
    """What is wrong with the steps between positions (a missing slice, or non-uniform spacing), or None."""
    steps = np.diff(positions)
    spacing = float(np.median(steps))
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * spacing)
    bad = np.flatnonzero(np.abs(steps - spacing) > tolerance)
    if not bad.size:
        return None
    k = int(bad[0])
    ratio = steps[k] / spacing
    if abs(ratio - round(ratio)) * spacing <= tolerance and round(ratio) >= 2:
        return (
            f"missing slice in {source}: a gap of {steps[k]:.3g} mm between positions {positions[k]:.2f} "
            f"and {positions[k + 1]:.2f} mm ({slices[k].name}, {slices[k + 1].name}) "
            f"where the spacing is {spacing:.3g} mm ({int(round(ratio)) - 1} slice(s) missing)"
        )
    return (
        f"non-uniform slice spacing in {source}: steps from {steps.min():.3g} to {steps.max():.3g} mm "
        f"(median {spacing:.3g} mm; first irregular step between {slices[k].name} and "
        f"{slices[k + 1].name}); resample to a uniform spacing first"
    )


def measure_tilt(slices: list[Slice], axes, positions: np.ndarray) -> Tilt | None:
    """The in-plane drift of the plane origins as the position advances, or None when it stays
    within a tenth of a pixel (and 0.02 mm)."""
    row, col, normal = axes
    origins = np.array([s.position for s in slices], float)
    offsets = origins - origins[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    row_spacing, column_spacing = slices[0].pixel_spacing  # DICOM: between rows (y), between columns (x)
    if drift <= max(POSITION_TOLERANCE_MM, TILT_TOLERANCE_PIXELS * min(row_spacing, column_spacing)):
        return None
    return Tilt(
        shift_columns=in_plane @ row / column_spacing,
        shift_rows=in_plane @ col / row_spacing,
        drift_mm=drift,
        span_mm=float(positions[-1] - positions[0]),
        gantry_tag=str(slices[0].header.get("GantryDetectorTilt", "not given")),
    )


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def series_geometry(slices: list[Slice], source: str, detilt: bool = False) -> tuple[list[Slice], Geometry, Tilt | None]:
    """Sort the planes along the normal and check that they form one regular grid. A tilted grid is
    refused unless ``detilt``: then the Tilt comes back with the de-tilted Geometry (see ``detilted``)."""
    check_plane_geometry_present(slices)
    check_same_image_size(slices, source)
    check_same_orientation(slices, source)
    check_same_pixel_spacing(slices, source)
    axes = slice_axes(slices[0].orientation, source)
    normal = axes[2]
    slices = sorted(slices, key=lambda s: float(np.dot(normal, s.position)))
    check_not_single(slices, source)
    positions = np.array([np.dot(normal, s.position) for s in slices])
    check_no_duplicate_positions(slices, positions, source)
    problem = spacing_problem(slices, positions, source)
    tilt = measure_tilt(slices, axes, positions)
    if problem:
        raise GeometryError(problem + (f"; the series also has {tilt.describe()}" if tilt else ""))
    if tilt and not detilt:
        raise GeometryError(
            f"{tilt.describe()} in {source}: the slice grid is sheared; pass --detilt to resample it onto "
            "an orthogonal grid along the slice normal (as dcm2niix does), or de-tilt it first"
        )
    first = slices[0]
    row_spacing, column_spacing = first.pixel_spacing
    geometry = Geometry(
        shape=(len(slices), first.rows, first.columns),
        spacing=(column_spacing, row_spacing, float((positions[-1] - positions[0]) / (len(positions) - 1))),
        origin=tuple(first.position),
        direction=tuple(np.column_stack(axes).ravel()),
    )
    return slices, (detilted(geometry, tilt) if tilt else geometry), tilt


def detilt_extent(shifts: np.ndarray) -> tuple[int, int]:
    """(first, count) of the extra pixels along one in-plane axis that hold every shifted plane: the
    grid stays on the first plane's pixels (whole-pixel steps), as dcm2niix's ``_Tilt_1`` output."""
    low = math.floor(min(0.0, float(shifts.min())) + 1e-6)
    high = math.ceil(max(0.0, float(shifts.max())) - 1e-6)
    return low, high - low


def detilted(sheared: Geometry, tilt: Tilt) -> Geometry:
    """The orthogonal grid for a sheared series: the same planes (one per slice, along the true normal,
    at the measured spacing), the same in-plane axes and pixel size, widened to hold every plane."""
    first_column, extra_columns = detilt_extent(tilt.shift_columns)
    first_row, extra_rows = detilt_extent(tilt.shift_rows)
    d = sheared.direction_matrix
    origin = (np.asarray(sheared.origin) + first_column * sheared.spacing[0] * d[:, 0]
              + first_row * sheared.spacing[1] * d[:, 1])
    n, rows, columns = sheared.shape
    return Geometry((n, rows + extra_rows, columns + extra_columns), sheared.spacing, tuple(origin), sheared.direction)
