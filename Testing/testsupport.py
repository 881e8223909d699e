"""Helpers shared by the test folders: import them with ``from testsupport import ...``.

(Not ``from conftest import``: each test folder may have its own conftest.py, and which one
Python calls ``conftest`` depends on collection order.)"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTSLICEINTERP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real CT data not available: {path} is missing (set CTSLICEINTERP_SHARED_DATA to ../shared/data)")
    return path


def oblique_direction(angle_deg: float = 20.0, flip_y: bool = False) -> tuple:
    """A right-handed (or flipped) oblique direction: rotations about two axes."""
    a = np.deg2rad(angle_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(a / 2), -np.sin(a / 2), 0], [np.sin(a / 2), np.cos(a / 2), 0], [0, 0, 1]])
    d = rz @ rx
    if flip_y:
        d = d @ np.diag([1, -1, 1])
    return tuple(d.ravel())


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str = "size=12m"):
    """A small tmpfs at ``folder``: a disk that fills up (or, remounted, turns read-only) for real.
    Mounting needs root and a system that allows it; the test skips with the reason otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or f'mount exited {done.returncode}'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount_read_only(folder: Path) -> None:
    """Turn a ``mounted_tmpfs`` read-only (root ignores file permissions, not a read-only mount)."""
    done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
