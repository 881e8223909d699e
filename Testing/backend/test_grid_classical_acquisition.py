"""Thin-grid geometry, classical interpolation and the acquisition model."""

import numpy as np
import pytest
from scipy import ndimage

from testsupport import oblique_direction
from ctsliceinterp.core.acquisition import consistency_mae, reaverage, simulate_thick, slab_weights
from ctsliceinterp.core.classical import interpolate_classical, interpolation_matrix
from ctsliceinterp.core.errors import GeometryError, InputError
from ctsliceinterp.core.grid import like_grid, thin_grid
from ctsliceinterp.core.volume import Geometry


@pytest.mark.parametrize("thick,thin,count", [(5.0, 1.25, 109), (3.0, 1.0, 82), (2.5, 1.0, 68), (5.0, 1.0, 136)])
def test_thin_grid_spans_first_to_last_thick_centre(thick, thin, count):
    g = Geometry((28, 4, 4), (0.5, 0.5, thick), (1.0, 2.0, 3.0), oblique_direction(25))
    t = thin_grid(g, thin)
    assert t.shape[0] == count
    assert t.spacing == (0.5, 0.5, thin)
    assert t.direction == g.direction
    pos = t.slice_positions()
    assert pos[0] == pytest.approx(g.slice_positions()[0])
    assert pos[-1] <= g.slice_positions()[-1] + 1e-6
    assert g.slice_positions()[-1] - pos[-1] < thin
    # Origin moves only along the normal: voxel (i, j) of slice 0 is the same physical point.
    assert np.allclose(t.index_to_physical([3, 2, 0]), g.index_to_physical([3, 2, 0]))


def test_thin_grid_known_physical_positions_oblique():
    d = oblique_direction(30, flip_y=True)
    g = Geometry((3, 2, 2), (1.0, 1.0, 5.0), (10.0, -5.0, 7.0), d)
    t = thin_grid(g, 1.0)
    # Slice 5 of the thin grid is exactly thick slice 1 in space.
    assert np.allclose(t.index_to_physical([1, 1, 5]), g.index_to_physical([1, 1, 1]))
    assert np.allclose(t.index_to_physical([0, 0, 10]), g.index_to_physical([0, 0, 2]))


def test_already_thin_is_refused():
    g = Geometry((10, 4, 4), (0.5, 0.5, 1.0), (0, 0, 0), np.eye(3).ravel())
    with pytest.raises(InputError, match="already at or below"):
        thin_grid(g, 1.0)


def test_like_grid_requires_same_in_plane_grid():
    g = Geometry((10, 4, 4), (0.5, 0.5, 5.0), (0, 0, 0), np.eye(3).ravel())
    ref = Geometry((40, 4, 4), (0.5, 0.5, 1.0), (0, 0, -2.0), np.eye(3).ravel())
    assert np.allclose(like_grid(g, ref).slice_positions(), ref.slice_positions())
    shifted = Geometry((40, 4, 4), (0.5, 0.5, 1.0), (3.0, 0, -2.0), np.eye(3).ravel())
    with pytest.raises(GeometryError, match="in-plane"):
        like_grid(g, shifted)
    tilted = Geometry((40, 4, 4), (0.5, 0.5, 1.0), (0, 0, 0), oblique_direction(10))
    with pytest.raises(GeometryError):
        like_grid(g, tilted)


@pytest.mark.parametrize("method,order", [("linear", 1), ("bspline", 3)])
def test_classical_matches_scipy_1d(method, order, make_volume):
    v = make_volume(shape=(9, 6, 5), direction=oblique_direction(15))
    target = thin_grid(v.geometry, 1.0)
    out = interpolate_classical(v, target, method)
    x = (target.slice_positions() - v.geometry.slice_positions()[0]) / v.spacing[2]
    zz, yy, xx = np.meshgrid(x, np.arange(6), np.arange(5), indexing="ij")
    ref = ndimage.map_coordinates(v.array.astype(float), [zz, yy, xx], order=order, mode="mirror")
    assert np.allclose(out.array, ref, atol=1e-3)
    assert out.geometry == target


@pytest.mark.parametrize("method", ["linear", "bspline", "lanczos"])
def test_classical_reproduces_acquired_slices_and_constants(method):
    for n in (2, 3, 7):
        w = interpolation_matrix(method, n, np.arange(n, dtype=float))
        assert np.allclose(w, np.eye(n), atol=1e-9)
        w = interpolation_matrix(method, n, np.linspace(0, n - 1, 5 * n))
        assert np.allclose(w.sum(axis=1), 1.0, atol=1e-9)


def test_slab_weights_partial_voxels():
    # 1.25 mm thin voxels, 5 mm slab centred between two slices: 4 full voxels.
    w = slab_weights(np.arange(10) * 1.25, 1.25, np.array([1.875 + 1.25]), 5.0)
    assert np.allclose(w[0, 1:5], 0.25) and np.isclose(w.sum(), 1)
    # Slab centred on a slice: 3 full + 2 half voxels.
    w = slab_weights(np.arange(10) * 1.25, 1.25, np.array([5.0]), 5.0)
    assert np.allclose(w[0, 2:7], [0.125, 0.25, 0.25, 0.25, 0.125])


def test_simulate_thick_geometry_and_values(make_volume):
    thin = make_volume(shape=(20, 6, 5), spacing=(0.8, 0.8, 1.0), direction=oblique_direction(20))
    thick = simulate_thick(thin, 5.0)
    assert thick.shape[0] == 4
    assert thick.spacing[2] == 5.0
    # First slab covers thin slices 0..4, centred on slice 2.
    assert np.allclose(thick.geometry.index_to_physical([0, 0, 0]), thin.geometry.index_to_physical([0, 0, 2]))
    assert np.allclose(thick.array[0], thin.array[0:5].mean(axis=0), atol=1e-3)
    assert consistency_mae(thick, thin) == pytest.approx(0.0, abs=1e-3)
    again = reaverage(thin, thick.geometry, 5.0)
    assert np.allclose(again.array, thick.array)


def test_acquisition_model_on_real_phantom_pair(shared_data):
    from ctsliceinterp.io import read_volume

    thick = read_volume(shared_data("volumes/phantom_head_thick_5mm.nii.gz"))
    thin = read_volume(shared_data("volumes/phantom_head_thin_1mm.nii.gz"))
    mae = consistency_mae(thick, thin, 5.0)
    # Nearest-slice baseline: the thin slice at each thick centre.
    nearest = like_grid(thin.geometry, thick.geometry)
    idx = np.rint((nearest.slice_positions() - thin.geometry.slice_positions()[0])).astype(int)
    nearest_mae = float(np.mean(np.abs(thin.array[idx].astype(float) - thick.array)))
    assert mae < 30.0, mae  # README: about 24 HU
    assert nearest_mae > 3 * mae
