"""Writes on a full disk, a read-only file system and past a file-size limit, made for real.

Each case runs the real command line in a subprocess and checks what a user sees: a non-zero exit,
one line naming the problem, the previous output byte for byte, and no temporary file left behind.
The full disk is a 12 MB tmpfs and the read-only file system a tmpfs remounted read-only (both need
root and permission to mount; they skip with the reason otherwise); the file-size limit is
``RLIMIT_FSIZE`` in the child, which needs neither, so CI always runs that part."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctsliceinterp.core.errors import OutputError
from ctsliceinterp.core.volume import Volume
from ctsliceinterp.io import read_volume, write_volume
from ctsliceinterp.io.atomic import atomic_directory, atomic_file
from testsupport import mounted_tmpfs, remount_read_only

REPO_ROOT = Path(__file__).resolve().parents[2]
# 30 thick slices of 224 x 224 -> 146 thin slices at 1 mm: 29 MB as float32, 14.6 MB as a DICOM series,
# more than the 12 MB tmpfs holds in every format (the noise does not compress).
THICK_SHAPE = (30, 224, 224)
OUTPUTS = ["out.nii", "out.nii.gz", "out.nrrd", "out.mha", "out.mhd", "out.nhdr", "series/"]


def _volume(shape, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume.from_array(rng.integers(-1000, 1500, shape).astype(np.int16), (0.8, 0.8, 5.0), (0.0, 0.0, 100.0))


@pytest.fixture(scope="module")
def thick_input(tmp_path_factory) -> Path:
    return write_volume(_volume(THICK_SHAPE), tmp_path_factory.mktemp("input") / "thick.nrrd")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 12 MB tmpfs: a full disk once the output is bigger, or a read-only one once remounted."""
    with mounted_tmpfs(tmp_path / "tiny") as folder:
        yield folder


def _previous_output(folder: Path, name: str) -> dict[str, str]:
    """A small earlier output at the same path; returns the hash of every file, to compare after."""
    write_volume(_volume((4, 16, 16), seed=7), folder / name)
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _interpolate(thick: Path, output: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "Backend" / "src"), OMP_NUM_THREADS="1")

    def limit():  # in the child only; CPython ignores SIGXFSZ, so writes past it fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    target = str(output) + ("/" if output.name == "series" else "")
    return subprocess.run(
        [sys.executable, "-m", "ctsliceinterp.cli", "interpolate", str(thick), "-o", target, "--method", "bspline",
         "--no-progress"],
        env=env, capture_output=True, text=True, timeout=180, preexec_fn=limit if file_size_limit else None,
    )


def _assert_refused(done: subprocess.CompletedProcess, output: Path, problem: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, f"exit {done.returncode}, stdout {done.stdout!r}, stderr {done.stderr!r}"
    assert "wrote" not in done.stdout
    assert len(lines) == 1, f"the error is not one line: {done.stderr!r}"
    assert lines[0].startswith(f"ctsliceinterp: error: cannot write {output}"), lines[0]
    assert problem in lines[0], lines[0]


@pytest.mark.parametrize("name", OUTPUTS)
def test_full_disk_refuses_and_keeps_the_previous_output(thick_input, small_tmpfs, name):
    before = _previous_output(small_tmpfs, name)
    output = small_tmpfs / name.rstrip("/")
    done = _interpolate(thick_input, output)
    _assert_refused(done, output, "no space left on the device (ENOSPC)")
    assert "unchanged" in done.stderr
    assert _snapshot(small_tmpfs) == before  # the old output byte for byte, no partial file left
    read_volume(output if name.endswith("/") else small_tmpfs / name)


@pytest.mark.parametrize("name", ["out.nii", "out.nrrd", "series/"])
def test_read_only_file_system_refuses_and_keeps_the_previous_output(thick_input, small_tmpfs, name):
    before = _previous_output(small_tmpfs, name)
    remount_read_only(small_tmpfs)
    output = small_tmpfs / name.rstrip("/")
    done = _interpolate(thick_input, output)
    _assert_refused(done, output, "read-only file system (EROFS)")
    assert _snapshot(small_tmpfs) == before


def test_read_only_folder_without_root(thick_input, tmp_path):
    """Where a tmpfs cannot be mounted (not root), a folder without write permission."""
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions: the read-only tmpfs test covers this as root")
    folder = tmp_path / "locked"
    folder.mkdir()
    before = _previous_output(folder, "out.nii")
    folder.chmod(0o555)
    try:
        done = _interpolate(thick_input, folder / "out.nii")
    finally:
        folder.chmod(0o755)
    _assert_refused(done, folder / "out.nii", "permission denied (EACCES)")
    assert _snapshot(folder) == before


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz", "out.nrrd", "out.mha", "out.nhdr"])
def test_file_size_limit_refuses_and_keeps_the_previous_output(thick_input, tmp_path, name):
    """Without root: the child may write no file over 4 MB (the thin volume needs 29 MB)."""
    folder = tmp_path / "limited"
    folder.mkdir()
    before = _previous_output(folder, name)
    output = folder / name
    done = _interpolate(thick_input, output, file_size_limit=4 * 1024 * 1024)
    _assert_refused(done, output, "file-size limit (ulimit -f) allows (EFBIG)")
    assert _snapshot(folder) == before


def test_the_same_write_succeeds_with_room(thick_input, tmp_path):
    """The control: the faults above are what makes those writes fail."""
    done = _interpolate(thick_input, tmp_path / "out.nii")
    assert done.returncode == 0, done.stderr
    assert read_volume(tmp_path / "out.nii").geometry.shape == (146, 224, 224)


@pytest.mark.parametrize("library", ["safetensors", "torch.save"])
def test_a_library_error_on_a_full_disk_names_the_disk(small_tmpfs, library):
    """Model checkpoints (safetensors) and training states (torch.save) raise their own error types,
    not OSError, on a full disk."""
    import torch
    from safetensors.torch import save_file

    weights = {"w": torch.zeros(4 * 1024 * 1024)}  # 16 MB
    with pytest.raises(OutputError, match=r"^cannot write .*weights: no space left on the device \(ENOSPC\)$"):
        if library == "safetensors":
            with atomic_directory(small_tmpfs / "weights") as tmp:
                save_file(weights, str(tmp / "vae.safetensors"))
        else:
            with atomic_file(small_tmpfs / "weights") as tmp:
                torch.save(weights, tmp)
    assert list(small_tmpfs.iterdir()) == []
