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

from testsupport import SHARED_DATA, oblique_direction, shared_file  # noqa: E402,F401  (re-exported)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on 1 thread for a module of small-model tests: on a shared 2-core machine, 2 OpenMP
    threads spin against other work (3 s per tiny step instead of 0.05 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data():
    return shared_file


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def make_volume():
    """Factory for small synthetic CT-like volumes with arbitrary geometry."""
    from ctsliceinterp.core.volume import Volume

    def _make(shape=(8, 24, 20), spacing=(0.8, 0.7, 5.0), origin=(-10.0, 20.0, 100.0), direction=None, dtype=np.int16, seed=0):
        rng = np.random.default_rng(seed)
        z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (min(shape[1:]) / 2.5) ** 2
        array = np.where(body, 40 + 30 * np.sin(z / 2.0) + rng.normal(0, 10, shape), -1000).astype(dtype)
        return Volume.from_array(array, spacing, origin, direction or tuple(np.eye(3).ravel()))

    return _make
