"""Shared pytest fixtures.

Tests import the package from this checkout's ``Backend/src`` (so a worktree tests its own code)
and find the real CT data in ``../shared/data`` next to the checkout; tests that need it skip
with a reason when it is absent (a user's clone does not have it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "Backend" / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(os.environ.get("CTSLICEINTERP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real CT data not available: {path} is missing (set CTSLICEINTERP_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture
def shared_data():
    return shared_file


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def oblique_direction(angle_deg: float = 20.0, flip_y: bool = False) -> tuple:
    """A right-handed (or flipped) oblique direction: rotations about two axes."""
    a = np.deg2rad(angle_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(a / 2), -np.sin(a / 2), 0], [np.sin(a / 2), np.cos(a / 2), 0], [0, 0, 1]])
    d = rz @ rx
    if flip_y:
        d = d @ np.diag([1, -1, 1])
    return tuple(d.ravel())


@pytest.fixture
def make_volume():
    """Factory for small synthetic CT-like volumes with arbitrary geometry."""
    from ctsliceinterp.volume import Volume

    def _make(shape=(8, 24, 20), spacing=(0.8, 0.7, 5.0), origin=(-10.0, 20.0, 100.0), direction=None, dtype=np.int16, seed=0):
        rng = np.random.default_rng(seed)
        z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (min(shape[1:]) / 2.5) ** 2
        array = np.where(body, 40 + 30 * np.sin(z / 2.0) + rng.normal(0, 10, shape), -1000).astype(dtype)
        return Volume.from_array(array, spacing, origin, direction or tuple(np.eye(3).ravel()))

    return _make
