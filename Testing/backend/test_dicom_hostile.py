"""Hostile DICOM and ZIP input: declared sizes that do not match the image, members that inflate past
their declared size, and large files of zeros without a .dcm suffix.

Each read runs in a child process with an address-space limit and a timeout, so a regression fails the
test (MemoryError, a kill or a timeout) instead of taking the machine's memory or the suite's time."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from test_io_dicom import ct_slice, hu_volume, write_series

REPO = Path(__file__).resolve().parents[2]
MEMORY_LIMIT_GIB = 1.5  # a normal small read peaks under 1 GiB of address space (numpy, pydicom, SimpleITK)
HUGE = 2**31 - 2  # the declared PixelData of the hostile member: 2 GiB for a 512 x 512 image


def read_bounded(path: Path, timeout_s: float = 60.0) -> dict:
    """``read_volume(path)`` in a child process under RLIMIT_AS; returns what it did and how long it took."""
    code = textwrap.dedent(f"""
        import json, resource, sys, time
        limit = int({MEMORY_LIMIT_GIB} * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.path.insert(0, {str(REPO / "Backend" / "src")!r})
        from ctsliceinterp.io import read_volume
        start = time.perf_counter()
        try:
            volume = read_volume({str(path)!r})
            result = {{"shape": list(volume.shape)}}
        except BaseException as exc:
            result = {{"error": type(exc).__name__, "message": str(exc)}}
        result["seconds"] = time.perf_counter() - start
        print(json.dumps(result))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"the reader died (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def dicom_header(rows=512, columns=512, series_uid="1.2.826.0.1.9", position=(0.0, 0.0, 0.0)) -> bytes:
    """A CT slice's bytes up to (not including) its PixelData element."""
    ds = ct_slice(np.zeros((rows, columns), np.uint16), position, (1, 0, 0, 0, 1, 0), (0.5, 0.5), series_uid)
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pixel_data_element(length: int) -> bytes:
    return b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", length)  # explicit VR little endian


def deflated_zeros_after(prefix: bytes, zeros: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``prefix`` + ``zeros`` zero bytes, and its CRC-32, without holding the
    zeros: a 16 MiB block of zeros compresses once and repeats (each block after a full flush)."""
    block = 16 << 20
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(prefix)
    count, rest = divmod(zeros, block)
    if count:
        zero_block = bytes(block)
        repeat = zlib.compressobj(9, zlib.DEFLATED, -15)
        compressed_block = repeat.compress(zero_block) + repeat.flush(zlib.Z_FULL_FLUSH)
        parts.append(compressed_block * count)
        for _ in range(count):
            crc = zlib.crc32(zero_block, crc)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts.append(tail.compress(bytes(rest)) + tail.flush())
    return b"".join(parts), zlib.crc32(bytes(rest), crc)


def write_zip(path: Path, members: list[tuple[str, bytes, int, int]]) -> None:
    """A ZIP of already deflated members (name, raw deflate stream, CRC-32, declared size): zipfile
    cannot store precompressed data, and the lying-header case needs a declared size of our choosing."""
    with open(path, "wb") as f:
        central = []
        for name, data, crc, size in members:
            offset = f.tell()
            encoded = name.encode()
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), size, len(encoded), 0))
            f.write(encoded)
            f.write(data)
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(data), size,
                                       len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
        start = f.tell()
        f.write(b"".join(central))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), f.tell() - start, start, 0))


def honest_members(tmp_path: Path, count: int = 3) -> list[tuple[str, bytes, int, int]]:
    """A good 3-slice series (512 x 512, as the hostile member claims to be), as deflated members."""
    members = []
    for k in range(count):
        data = dicom_header(position=(0.0, 0.0, 5.0 * k)) + pixel_data_element(512 * 512 * 2) + bytes(512 * 512 * 2)
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        members.append((f"series/IM{k:04d}.dcm", compressor.compress(data) + compressor.flush(), zlib.crc32(data), len(data)))
    return members


def test_a_member_declaring_2_gib_of_pixels_is_refused_before_inflating(tmp_path):
    header = dicom_header(position=(0.0, 0.0, 15.0))
    stream, crc = deflated_zeros_after(header + pixel_data_element(HUGE), HUGE)
    archive = tmp_path / "hostile.zip"
    write_zip(archive, honest_members(tmp_path) + [("series/IM0003.dcm", stream, crc, len(header) + 12 + HUGE)])
    assert archive.stat().st_size < 8 << 20  # a few MB on disk, 2 GiB inflated
    result = read_bounded(archive)
    assert result.get("error") == "InputError", result
    assert "IM0003.dcm" in result["message"] and "512 x 512" in result["message"], result["message"]
    assert result["seconds"] < 20


def test_a_member_that_inflates_past_its_declared_size_is_stopped(tmp_path):
    """The local and central headers say one normal slice; the deflate stream holds 2 GiB."""
    header = dicom_header(position=(0.0, 0.0, 15.0))
    stream, crc = deflated_zeros_after(header + pixel_data_element(512 * 512 * 2), HUGE)
    declared = len(header) + 12 + 512 * 512 * 2
    archive = tmp_path / "lying.zip"
    write_zip(archive, honest_members(tmp_path) + [("series/IM0003.dcm", stream, crc, declared)])
    result = read_bounded(archive)
    assert result.get("error") == "InputError", result
    assert "IM0003.dcm" in result["message"] and "declared size" in result["message"], result["message"]
    assert result["seconds"] < 20


def test_a_sparse_2_gib_file_in_a_folder_is_refused_before_reading(tmp_path):
    folder = tmp_path / "s"
    write_series(folder, hu_volume((3, 512, 512)))
    header = dicom_header(rows=512, columns=512, series_uid=pydicom.dcmread(folder / "slice000.dcm").SeriesInstanceUID,
                          position=(-10.0, 20.0, 115.0))
    with open(folder / "slice003.dcm", "wb") as f:
        f.write(header + pixel_data_element(HUGE))
        f.truncate(len(header) + 12 + HUGE)  # sparse: no disk used
    result = read_bounded(folder)
    assert result.get("error") == "InputError", result
    assert "slice003.dcm" in result["message"] and "512 x 512" in result["message"], result["message"]


@pytest.mark.parametrize("where", ["zip", "folder"])
def test_large_files_of_zeros_without_dcm_suffix_are_skipped_quickly(tmp_path, where):
    """A file that is neither named .dcm nor has the DICM marker is probed (its first elements) before
    pydicom parses it; 32 MiB of zeros took 27 s to force-parse."""
    folder = tmp_path / "s"
    write_series(folder, hu_volume())
    zeros = 32 << 20
    if where == "zip":
        source = tmp_path / "a.zip"
        with zipfile.ZipFile(source, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(folder.glob("*.dcm")):
                z.write(path, f"s/{path.name}")
            z.writestr("s/IM_NOISE", bytes(zeros))
    else:
        source = folder
        with open(folder / "IM_NOISE", "wb") as f:
            f.truncate(zeros)
    result = read_bounded(source)
    assert result.get("shape") == [6, 10, 12], result
    assert result["seconds"] < 8


def test_the_probe_still_reads_dicom_without_preamble(tmp_path):
    """Raw (no preamble, implicit VR) DICOM files without a suffix are still found by the probe."""
    folder = tmp_path / "s"
    paths = write_series(folder, hu_volume())
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(folder / f"IM{k}", ds, implicit_vr=True, little_endian=True)  # starts (0008,0016)
        path.unlink()
    assert (folder / "IM0").read_bytes()[:4] == b"\x08\x00\x16\x00"
    start = time.perf_counter()
    from ctsliceinterp.io import read_volume

    assert read_volume(folder).shape == (6, 10, 12)
    assert time.perf_counter() - start < 10
