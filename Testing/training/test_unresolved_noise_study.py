"""The study's thin-slice noise that thick slices hide (Training/unresolved_noise_study.py): its level,
its invisibility in the thick slices."""

import sys
from pathlib import Path

import numpy as np
import pytest

from testsupport import oblique_direction
from ctsliceinterp.core.acquisition import reaverage
from ctsliceinterp.core.grid import thin_grid
from ctsliceinterp.core.volume import Volume

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Training"))
from unresolved_noise_study import high_pass_rms, noise_sigma_map, unresolved_noise  # noqa: E402


def _thick(noise_hu: float, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    array = (40 + rng.normal(0, noise_hu, (6, 64, 64))).astype(np.float32)
    array[:, :16] = -3024.0  # padding outside the scan circle: no noise there
    return Volume.from_array(array, (0.7, 0.7, 5.0), (-40.0, 12.5, 300.0), oblique_direction(25.0), {"slice_thickness": 5.0})


def test_noise_level_is_read_from_the_thick_slices_and_is_zero_in_padding():
    quiet, loud = noise_sigma_map(_thick(5.0).array), noise_sigma_map(_thick(20.0).array)
    assert np.all(quiet[:, :8] == 0) and np.all(loud[:, :8] == 0)
    assert loud[:, 32:].mean() / quiet[:, 32:].mean() == pytest.approx(4.0, rel=0.1)


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_noise_hides_from_the_thick_slices_at_the_calibrated_level(fraction):
    thick = _thick(10.0)
    target = thin_grid(thick.geometry, 1.0)
    noise = unresolved_noise(thick, target, fraction, np.random.default_rng(1))
    assert noise.shape == (target.shape[0],) + thick.shape[1:] and noise.dtype == np.float32
    reaveraged = reaverage(Volume(noise, target, {}), thick.geometry, 5.0).array
    assert np.abs(reaveraged[1:-1]).max() < 1e-3  # re-averaged, it adds nothing to the thick slices
    assert np.all(noise[:, :8] == 0)
    # variance fraction * (n - 1) * sigma_T^2 left after the slab means go (n = 5 thin slices per slab)
    level = np.median(high_pass_rms(noise[5:-5])[:, 32:]) / np.median(noise_sigma_map(thick.array)[:, 32:])
    assert level == pytest.approx(np.sqrt(fraction * 4), rel=0.15)


def test_no_noise_at_fraction_zero_and_the_same_noise_for_the_same_seed():
    thick = _thick(10.0)
    target = thin_grid(thick.geometry, 1.0)
    assert not unresolved_noise(thick, target, 0.0, np.random.default_rng(0)).any()
    a, b = (unresolved_noise(thick, target, 0.5, np.random.default_rng(7)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, unresolved_noise(thick, target, 0.5, np.random.default_rng(8)))
