"""The one image type used everywhere in the backend.

Convention (the same as ITK and DICOM):
- physical space is LPS, in millimetres;
- ``array`` is indexed ``[k, j, i]`` (slice, row, column), i.e. numpy order z, y, x;
- ``spacing`` and ``origin`` are given in ITK order (i, j, k) / (x, y, z);
- ``origin`` is the centre of voxel (0, 0, 0);
- ``direction`` is a 3x3 matrix whose *columns* are the unit vectors of the i, j and k axes,
  so ``point = origin + direction @ (spacing * (i, j, k))``;
- the slice normal is the k column of ``direction``. A slice position is the physical
  coordinate of a slice centre along that normal (``normal . point``), never an index.

Format adapters convert to and from ``Volume`` at the edges; methods only see ``Volume``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CTSliceInterpError, GeometryError, InputError

# Slices whose positions differ by less than this (relative to the spacing) count as uniform.
SPACING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Geometry:
    """A regular voxel grid in LPS space (see the module docstring for the convention)."""

    shape: tuple[int, int, int]  # (nz, ny, nx)
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    origin: tuple[float, float, float]  # LPS mm, centre of voxel (0, 0, 0)
    direction: tuple[float, ...]  # 9 numbers, row-major 3x3, columns = axis unit vectors

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        object.__setattr__(self, "direction", tuple(direction.ravel().tolist()))
        if len(self.shape) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise GeometryError("geometry must be 3-D (shape, spacing and origin of length 3)")
        if any(s <= 0 or not np.isfinite(s) for s in self.spacing):
            raise GeometryError(f"voxel spacing must be positive and finite, got {self.spacing}")
        if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
            raise GeometryError("direction matrix is singular or not finite")

    # --- derived quantities -------------------------------------------------------------
    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def normal(self) -> np.ndarray:
        """Unit vector of the slice (k) axis in LPS."""
        k = self.direction_matrix[:, 2]
        return k / np.linalg.norm(k)

    @property
    def slice_spacing(self) -> float:
        return self.spacing[2]

    def index_to_physical(self, index_ijk: Any) -> np.ndarray:
        """Continuous (i, j, k) index, shape (..., 3), to LPS points."""
        affine = self.affine
        return np.asarray(index_ijk, dtype=float) @ affine[:3, :3].T + affine[:3, 3]

    def slice_positions(self) -> np.ndarray:
        """Position of each slice centre along the normal, in mm."""
        first = float(np.dot(self.normal, self.origin))
        return first + np.arange(self.shape[0]) * self.spacing[2]

    def with_slices(self, first_position: float, count: int, spacing: float) -> "Geometry":
        """Same in-plane grid and direction, ``count`` slices from ``first_position`` (mm along
        the normal) every ``spacing`` mm."""
        shift = first_position - float(np.dot(self.normal, self.origin))
        origin = np.asarray(self.origin) + shift * self.normal
        return Geometry(
            shape=(count, self.shape[1], self.shape[2]),
            spacing=(self.spacing[0], self.spacing[1], spacing),
            origin=tuple(origin),
            direction=self.direction,
        )

    def same_in_plane_grid(self, other: "Geometry", tolerance_mm: float = 1e-2) -> bool:
        """True when both grids have the same rows, columns, pixel spacing, direction, and their
        slices lie in parallel planes through the same in-plane lattice."""
        if self.shape[1:] != other.shape[1:]:
            return False
        if not np.allclose(self.spacing[:2], other.spacing[:2], rtol=1e-4, atol=1e-5):
            return False
        if not np.allclose(self.direction_matrix, other.direction_matrix, atol=1e-4):
            return False
        # The other origin must lie on our slice axis through our origin (no in-plane shift).
        delta = np.asarray(other.origin) - np.asarray(self.origin)
        in_plane = delta - np.dot(delta, self.normal) * self.normal
        return bool(np.linalg.norm(in_plane) <= tolerance_mm)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix taking a voxel index (i, j, k, 1) to its LPS position in mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing)  # column k: axis k times its spacing
        affine[:3, 3] = self.origin
        return affine

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, list]:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, value: Any, name: str = "geometry") -> "Geometry":
        """The inverse of ``to_dict``, strict: anything else is an ``InputError`` that says what
        is wrong with ``name`` (the field the dict came from, e.g. ``target``)."""
        fields = ("shape", "spacing", "origin", "direction")
        if not isinstance(value, dict):
            raise InputError(f"{name} must be an object with shape, spacing, origin and direction")
        missing = [k for k in fields if k not in value]
        if missing:
            raise InputError(f"{name} is missing {', '.join(missing)}")
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise InputError(f"{name} has unknown fields: {', '.join(unknown)}")
        try:
            integers = all(isinstance(v, int) and not isinstance(v, bool) for v in value["shape"])
            shape = [int(v) for v in value["shape"]] if integers else None
            numbers = [[float(v) for v in value[k]] for k in fields[1:]]
        except (TypeError, ValueError):
            raise InputError(f"{name} shape, spacing, origin and direction must be lists of numbers") from None
        if shape is None or len(shape) != 3 or any(n < 1 for n in shape):
            raise InputError(f"{name} shape must be 3 positive integers (nz, ny, nx)")
        spacing, origin, direction = numbers
        if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
            raise InputError(f"{name} spacing and origin need 3 numbers, direction 9")
        if not all(math.isfinite(v) for v in spacing + origin + direction):
            raise InputError(f"{name} geometry must be finite numbers")
        try:
            return cls(tuple(shape), tuple(spacing), tuple(origin), tuple(direction))
        except CTSliceInterpError as exc:
            raise InputError(f"invalid {name} geometry: {exc}") from None

    def describe(self) -> str:
        return (
            f"size (x,y,z) {self.shape[2]}x{self.shape[1]}x{self.shape[0]}, "
            f"spacing {self.spacing[0]:.4g} x {self.spacing[1]:.4g} x {self.spacing[2]:.4g} mm, "
            f"origin ({self.origin[0]:.2f}, {self.origin[1]:.2f}, {self.origin[2]:.2f}) LPS"
        )


@dataclass(frozen=True)
class Volume:
    """A scalar CT volume in Hounsfield units with its geometry.

    ``metadata`` carries what format adapters want to keep (DICOM tags for write-back,
    SliceThickness, window/level...). Methods must not rely on anything in it except the
    documented keys: ``slice_thickness`` (mm, acquisition slab width) and ``dicom`` (dict of
    patient/study tags to carry over on DICOM export).
    """

    array: np.ndarray
    geometry: Geometry
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"expected a 3-D scalar volume, got an array of shape {self.array.shape}")
        if tuple(self.array.shape) != tuple(self.geometry.shape):
            raise GeometryError(
                f"array shape {self.array.shape} does not match geometry shape {self.geometry.shape}"
            )

    # --- convenience ------------------------------------------------------------------
    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=tuple(np.eye(3).ravel()),
        metadata: dict[str, Any] | None = None,
    ) -> "Volume":
        array = np.asarray(array)
        geometry = Geometry(tuple(array.shape), spacing, origin, direction)
        return cls(array, geometry, dict(metadata or {}))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.geometry.origin

    @property
    def direction(self) -> tuple[float, ...]:
        return self.geometry.direction

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def slice_thickness(self) -> float:
        """Acquisition slab width in mm: DICOM SliceThickness when known, else the spacing."""
        value = self.metadata.get("slice_thickness")
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = 0.0
        return value if value > 0 else self.geometry.spacing[2]

    def replace(self, array: np.ndarray | None = None, geometry: Geometry | None = None, **metadata) -> "Volume":
        meta = dict(self.metadata)
        meta.update(metadata)
        return dataclasses.replace(
            self,
            array=self.array if array is None else array,
            geometry=self.geometry if geometry is None else geometry,
            metadata=meta,
        )

    def derived(self, array: np.ndarray, geometry: Geometry, **metadata) -> "Volume":
        """A volume computed from this one on another grid (an interpolation, its uncertainty).
        The one rule for its metadata: this volume's (DICOM tags for write-back...) without
        ``slice_thickness``, which describes this acquisition only, plus ``metadata``."""
        kept = {key: value for key, value in self.metadata.items() if key != "slice_thickness"}
        return Volume(array, geometry, {**kept, **metadata})

    def check_finite(self) -> None:
        if np.issubdtype(self.array.dtype, np.floating) and not np.all(np.isfinite(self.array)):
            bad = int(np.size(self.array) - np.count_nonzero(np.isfinite(self.array)))
            raise InputError(f"the volume contains {bad} NaN or infinite voxels")
