"""The fast case reader used by preprocessing (``io.dicom.read_case``): the same volumes as
``read_dicom`` for each series, numpy pixel decoding identical to pydicom's (unused high bits,
signed storage, implicit VR), stored and deflated ZIP members, a corrupted member named."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctsliceinterp.core.errors import InputError
from ctsliceinterp.io import write_volume
from ctsliceinterp.io.dicom import read_case, read_dicom
from ctsliceinterp.data.preprocess import CaseSource, PreprocessOptions, process_case
from ctsliceinterp.core.volume import Volume


def _series(folder: Path, shape, spacing, origin, seed) -> list[Path]:
    rng = np.random.default_rng(seed)
    volume = Volume.from_array(rng.integers(-1000, 2000, shape).astype(np.int16), spacing, origin)
    write_volume(volume, str(folder) + "/")
    return sorted(folder.glob("*.dcm"))


def _case_zip(path: Path, tmp: Path, compression=zipfile.ZIP_DEFLATED) -> Path:
    thick = _series(tmp / "thick", (5, 12, 10), (0.8, 0.8, 5.0), (1.0, 2.0, 100.0), 0)
    thin = _series(tmp / "thin", (21, 12, 10), (0.8, 0.8, 1.0), (1.0, 2.0, 100.0), 1)
    with zipfile.ZipFile(path, "w", compression) as archive:
        for folder, files in (("case_a/1", thick), ("case_a/2", thin)):
            for f in files:
                archive.write(f, f"{folder}/{f.name}")
        archive.writestr("case_a/README.txt", "not a series")
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_read_case_matches_read_dicom(tmp_path, compression):
    case = _case_zip(tmp_path / "case_a.zip", tmp_path, compression)
    thick, thin = read_case(case)
    for volume, series in ((thick, "thick"), (thin, "thin")):
        expected = read_dicom(case, series=series)
        assert volume.geometry == expected.geometry and volume.metadata == expected.metadata
        assert volume.array.dtype == expected.array.dtype and np.array_equal(volume.array, expected.array)
    assert thick.shape == (5, 12, 10) and thin.shape == (21, 12, 10)


def test_read_case_without_isal_and_from_a_folder(tmp_path, monkeypatch):
    import zlib

    case = _case_zip(tmp_path / "case_a.zip", tmp_path)
    fast_thick, fast_thin = read_case(case)
    from ctsliceinterp.io.dicom import sources

    monkeypatch.setattr(sources, "_inflate", lambda: (zlib.decompressobj, zlib.crc32))  # a machine without isal
    thick, thin = read_case(case)
    assert np.array_equal(thick.array, fast_thick.array) and np.array_equal(thin.array, fast_thin.array)
    with zipfile.ZipFile(case) as archive:
        archive.extractall(tmp_path / "unzipped")
    thick, thin = read_case(tmp_path / "unzipped" / "case_a")
    assert np.array_equal(thin.array, fast_thin.array) and thin.geometry == fast_thin.geometry


def test_a_corrupted_member_is_named(tmp_path):
    case = _case_zip(tmp_path / "case_a.zip", tmp_path)
    data = bytearray(case.read_bytes())
    with zipfile.ZipFile(case) as archive:
        info = next(i for i in archive.infolist() if i.filename.startswith("case_a/2/"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + info.compress_size // 2, start + info.compress_size // 2 + 8):
        data[k] ^= 0xFF  # damage the deflated stream in the middle of one thin file
    bad = tmp_path / "bad" / "case_a.zip"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match=info.filename):
        read_case(bad)
    result = process_case(CaseSource("x", "case_a", str(bad), "pair"), str(tmp_path / "cache"), PreprocessOptions())
    assert result.status == "failed" and info.filename in result.reason


def _rewrite(path: Path, stored: np.ndarray, bits_stored: int, signed: bool, implicit: bool, intercept: int) -> None:
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    ds.RescaleIntercept = str(intercept)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("signed,implicit", [(False, False), (True, False), (False, True)])
def test_native_pixels_decode_like_pydicom(tmp_path, signed, implicit):
    """12 bits stored in 16: unsigned values with junk in the unused high bits (masked), signed
    values stored as plain int16 (sign kept); the HU must equal pydicom's pixel_array path."""
    files = _series(tmp_path / "s", (4, 8, 6), (0.7, 0.7, 2.0), (0.0, 0.0, 0.0), 3)
    rng = np.random.default_rng(5)
    for f in files:
        if signed:
            stored = rng.integers(-2048, 2048, (8, 6))
        else:
            stored = rng.integers(0, 4096, (8, 6)) | (rng.integers(0, 2, (8, 6)) << 13)  # junk bit 13
        _rewrite(f, stored, 12, signed, implicit, -1024)
    volume = read_dicom(tmp_path / "s")
    assert volume.metadata["transfer_syntax"] == (pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian)
    reference = []
    for f in files:
        ds = pydicom.dcmread(f)
        reference.append((float(ds.ImagePositionPatient[2]), ds.pixel_array.astype(np.int32) - 1024))
    expected = np.stack([a for _, a in sorted(reference, key=lambda t: t[0])])
    assert np.array_equal(volume.array, expected)
    if not signed:
        assert volume.array.max() < 4096 - 1024  # the junk bit is gone


def test_pixels_of_a_compressed_syntax_still_go_through_pydicom(shared_data):
    # JPEG Lossless: the numpy path must step aside (it would read compressed bytes as pixels).
    volume = read_dicom(shared_data("dicom_chest_ricord000082_24slices_jpeg_lossless.zip"))
    with zipfile.ZipFile(shared_data("dicom_chest_ricord000082_24slices_jpeg_lossless.zip")) as archive:
        name = sorted(n for n in archive.namelist() if not n.endswith("/"))[0]
        ds = pydicom.dcmread(io.BytesIO(archive.read(name)))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    position = float(np.dot(volume.geometry.normal, [float(v) for v in ds.ImagePositionPatient]))
    k = int(np.argmin(np.abs(volume.geometry.slice_positions() - position)))
    assert np.array_equal(volume.array[k], hu)
