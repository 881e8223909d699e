"""Classical interpolation along the slice axis only: linear, cubic B-spline, Lanczos.

Each method is a small dense matrix W (n_out, n_in) built from the slice positions; the output
is W @ input with every in-plane pixel a column. That is one BLAS call per chunk, instead of a
generic 3-D resample that evaluates a 3-D kernel per voxel. Boundaries are mirrored (the kernel
sees d c b | a b c d | c b a), and targets outside the input's slice range are clamped to it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import InputError
from .grid import fractional_indices
from .progress import Reporter, as_reporter
from .volume import Geometry, Volume

LANCZOS_A = 3


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _kernel_matrix(x: np.ndarray, n_in: int, radius: int, kernel) -> np.ndarray:
    """Rows: sum over taps floor(x)-radius+1 .. floor(x)+radius of kernel(x - tap), mirrored."""
    base = np.floor(x).astype(int)
    weights = np.zeros((len(x), n_in))
    rows = np.arange(len(x))
    for offset in range(-radius + 1, radius + 1):
        tap = base + offset
        w = kernel(x - tap)
        np.add.at(weights, (rows, _mirror(tap, n_in)), w)
    return weights


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def _linear(t: np.ndarray) -> np.ndarray:
    return np.clip(1 - np.abs(t), 0.0, None)


def _lanczos(t: np.ndarray) -> np.ndarray:
    return np.where(np.abs(t) < LANCZOS_A, np.sinc(t) * np.sinc(t / LANCZOS_A), 0.0)


def _bspline_matrix(n_in: int, x: np.ndarray) -> np.ndarray:
    # Interpolating cubic B-spline: basis weights applied to prefiltered coefficients.
    prefilter = ndimage.spline_filter1d(np.eye(n_in), order=3, axis=0, mode="mirror")
    return _kernel_matrix(x, n_in, 2, _cubic_bspline) @ prefilter


def _lanczos_matrix(n_in: int, x: np.ndarray) -> np.ndarray:
    w = _kernel_matrix(x, n_in, LANCZOS_A, _lanczos)
    return w / w.sum(axis=1, keepdims=True)  # windowed sinc does not sum to 1 exactly


# How each classical method of ``ctsliceinterp.api.METHODS`` builds its matrix.
MATRIX_BUILDERS = {
    "linear": lambda n_in, x: _kernel_matrix(x, n_in, 1, _linear),
    "bspline": _bspline_matrix,
    "lanczos": _lanczos_matrix,
}


def interpolation_matrix(method: str, n_in: int, x: np.ndarray) -> np.ndarray:
    """W such that out = W @ in for continuous source indices ``x`` (clamped to [0, n_in-1])."""
    x = np.clip(np.asarray(x, dtype=float), 0.0, n_in - 1.0)
    if method not in MATRIX_BUILDERS:
        raise InputError(f"unknown classical method {method!r}; choose one of {', '.join(MATRIX_BUILDERS)}")
    return MATRIX_BUILDERS[method](n_in, x)


def interpolate_classical(volume: Volume, target: Geometry, method: str = "bspline", progress=None) -> Volume:
    """Interpolate ``volume`` onto ``target`` (same in-plane grid) along the slice axis."""
    reporter: Reporter = as_reporter(progress)
    weights = interpolation_matrix(method, volume.shape[0], fractional_indices(volume.geometry, target))
    # The B-spline prefilter's far-reaching weights decay to ~1e-45: denormal in float32, where
    # they make BLAS several times slower while adding nothing (< 1e-9 HU).
    weights = np.where(np.abs(weights) < 1e-12, 0.0, weights).astype(np.float32)
    n_pixels = volume.shape[1] * volume.shape[2]
    # One float32 copy of the (small) thick input, then BLAS writes straight into contiguous
    # blocks of output slices: no temporaries the size of the output, no strided copies.
    flat = np.ascontiguousarray(volume.array.reshape(volume.shape[0], n_pixels), dtype=np.float32)
    out = np.empty((target.shape[0], n_pixels), dtype=np.float32)
    chunks = min(8, target.shape[0])
    bounds = np.linspace(0, target.shape[0], chunks + 1).astype(int)
    reporter.update("interpolate", 0, chunks)
    for c in range(chunks):
        lo, hi = bounds[c], bounds[c + 1]
        np.matmul(weights[lo:hi], flat, out=out[lo:hi])
        reporter.update("interpolate", c + 1, chunks)
    return volume.derived(out.reshape(target.shape), target, method=method)
