"""The wire format: NRRD bytes <-> Volume, geometry exact (oblique, flipped, RAS headers),
cross-checked against SimpleITK's NRRD reader and writer, and every malformed header refused
with an InputError naming the problem (fuzzed with hypothesis)."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testsupport import oblique_direction
from ctsliceinterp.core.errors import InputError
from ctsliceinterp.core.volume import Geometry
from ctsliceinterp.serving.nrrd_bytes import volume_from_nrrd_bytes, volume_to_nrrd_bytes
from ctsliceinterp.core.volume import Volume


def corners(volume: Volume) -> np.ndarray:
    nz, ny, nx = volume.shape
    ijk = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], dtype=float)
    return volume.geometry.index_to_physical(ijk)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_keeps_voxels_and_physical_geometry(make_volume, dtype, compress):
    volume = make_volume(shape=(5, 7, 6), direction=oblique_direction(25, flip_y=True), dtype=np.int16)
    volume = volume.replace(array=np.abs(volume.array).astype(dtype), slice_thickness=5.0, dicom={"PatientName": "DOE^JANE"})
    data = volume_to_nrrd_bytes(volume, gzip=compress)
    back = volume_from_nrrd_bytes(data)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(corners(back), corners(volume), atol=1e-9)
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-12)
    assert back.metadata == {"slice_thickness": 5.0}  # geometry only: no DICOM tags cross the wire
    assert b"DOE" not in (gzip.decompress(data[data.index(b"\n\n") + 2:]) if compress else data)


def test_matches_simpleitk_reader_and_writer(make_volume, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    from ctsliceinterp.io.itk import volume_from_sitk, volume_to_sitk

    volume = make_volume(shape=(4, 6, 5), spacing=(0.6, 0.9, 3.0), origin=(-12.5, 40.0, 7.25), direction=oblique_direction(35))
    # Ours -> file -> SimpleITK.
    path = tmp_path / "ours.nrrd"
    path.write_bytes(volume_to_nrrd_bytes(volume))
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(image.GetOrigin(), volume.origin, atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing, atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), volume.direction, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.array)
    # SimpleITK -> file -> ours (its header spelling, compressed and not).
    for compress in (True, False):
        path = tmp_path / f"itk{compress}.nrrd"
        sitk.WriteImage(volume_to_sitk(volume), str(path), useCompression=compress)
        back = volume_from_nrrd_bytes(path.read_bytes())
        ref = volume_from_sitk(sitk.ReadImage(str(path)))
        np.testing.assert_allclose(corners(back), corners(ref), atol=1e-9)
        np.testing.assert_array_equal(back.array, ref.array)


def header(**fields) -> bytes:
    base = {
        "type": "short", "dimension": "3", "space": "left-posterior-superior", "sizes": "2 3 4",
        "space directions": "(1,0,0) (0,1,0) (0,0,5)", "endian": "little", "encoding": "raw", "space origin": "(0,0,0)",
    }
    base.update({k.replace("_", " "): v for k, v in fields.items()})
    lines = ["NRRD0004"] + [f"{k}: {v}" for k, v in base.items() if v is not None]
    return ("\n".join(lines) + "\n\n").encode()


def raw(n: int = 24, itemsize: int = 2) -> bytes:
    return bytes(n * itemsize)


def test_ras_header_is_converted_to_lps():
    data = header(space="right-anterior-superior", space_origin="(10,20,30)", space_directions="(2,0,0) (0,3,0) (0,0,5)") + raw()
    volume = volume_from_nrrd_bytes(data)
    assert volume.origin == (-10.0, -20.0, 30.0)
    assert volume.spacing == (2.0, 3.0, 5.0)
    np.testing.assert_allclose(volume.geometry.direction_matrix, np.diag([-1, -1, 1]))
    # Physical point of voxel (i=1, j=0, k=0): 2 mm along R, i.e. -2 in L.
    np.testing.assert_allclose(volume.geometry.index_to_physical([1, 0, 0]), [-12.0, -20.0, 30.0])


def test_big_endian_and_spacings_without_space():
    values = np.arange(24, dtype=">i2")
    data = header(endian="big", space=None, space_directions=None, space_origin=None, spacings="1 2 3") + values.tobytes()
    volume = volume_from_nrrd_bytes(data)
    np.testing.assert_array_equal(volume.array.ravel(), np.arange(24))
    assert volume.spacing == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    "data, words",
    [
        (header(dimension="2", sizes="2 3") + raw(6), "dimension"),
        (header(type="block") + raw(), "type"),
        (header(type="rgb") + raw(), "type"),
        (header(space_directions="(1,0,0) (0,0,0) (0,0,5)") + raw(), "spacing must be > 0"),
        (header(spacings="1 0 1", space=None, space_directions=None, space_origin=None) + raw(), "spacings must be > 0"),
        (header(space_directions="(1,0,0) (0,1,0) none") + raw(), "none"),
        (header(space_directions="(1,0,0) (2,0,0) (0,0,5)") + raw(), "singular"),
        (header(sizes="2000 2000 2000") + raw(), "limit"),
        (header(sizes="-2 3 4") + raw(), "positive"),
        (header() + raw()[:-3], "truncated"),
        (header() + raw() + b"xx", "more than"),
        (header(encoding="gzip") + gzip.compress(raw())[:-12], "truncated"),
        (header(encoding="gzip") + gzip.compress(raw(1000)), "more voxels"),
        (header(encoding="gzip") + b"not gzip at all", "corrupted"),
        (header(encoding="bzip2") + raw(), "encoding"),
        (header(data_file="../../etc/passwd"), "detached"),
        (header(space="scanner-flat") + raw(), "space"),
        (header(space_origin="(nan,0,0)") + raw(), "finite"),
        (header(type="float") + np.full(24, np.nan, np.float32).tobytes(), "NaN"),
        (b"P6\n3 2\n255\n\n" + raw(), "not a NRRD"),
        (b"NRRD0004\ntype: short\n", "incomplete"),
        (b"NRRD0004\n\xff\xfe: x\n\n", "non-ASCII"),
        (b"NRRD0004\n" + b"# " + b"x" * 70000 + b"\n\n", "longer than"),
    ],
)
def test_malformed_headers_are_refused_with_the_problem_named(data, words):
    with pytest.raises(InputError, match=words):
        volume_from_nrrd_bytes(data, max_voxels=10_000_000)


def test_geometry_dict_round_trip_and_validation(make_volume):
    geometry = make_volume(direction=oblique_direction(15)).geometry
    assert Geometry.from_dict(geometry.to_dict()) == geometry
    for bad, words in [
        ({"shape": [1, 2], "spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": list(np.eye(3).ravel())}, "shape"),
        ({"shape": [2, 2, 2], "spacing": [1, -1, 1], "origin": [0, 0, 0], "direction": list(np.eye(3).ravel())}, "spacing"),
        ({"shape": [2, 2, 2], "spacing": [1, 1, 1], "origin": [0, 0, 0]}, "missing direction"),
        ({"shape": [2, 2, 2], "spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": [0] * 9}, "singular"),
        ([1, 2, 3], "object"),
    ]:
        with pytest.raises(InputError, match=words):
            Geometry.from_dict(bad)


VALID = header() + raw()
FIELD_LINES = st.sampled_from(
    [b"type: ", b"dimension: ", b"sizes: ", b"space directions: ", b"space origin: ", b"encoding: ", b"endian: ",
     b"space: ", b"spacings: ", b"kinds: ", b"thicknesses: ", b"byte skip: ", b"key:="]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda b: b"NRRD0004\n" + b, st.binary(max_size=300)),
        st.builds(lambda pos, junk: VALID[:pos] + junk + VALID[pos:], st.integers(0, len(VALID)), st.binary(max_size=8)),
        st.builds(lambda pos: VALID[:pos], st.integers(0, len(VALID))),
        st.builds(
            lambda lines, tail: b"NRRD0005\n" + b"\n".join(k + v for k, v in lines) + b"\n\n" + tail,
            st.lists(st.tuples(FIELD_LINES, st.text("0123456789 (),.-enaiflotgzpwrsh", max_size=30).map(str.encode)), max_size=9),
            st.binary(max_size=64),
        ),
        st.builds(lambda n: header(encoding="gzip") + zlib.compress(raw(n)), st.integers(0, 40)),
    )
)
def test_fuzzed_input_only_ever_raises_input_error(data):
    try:
        volume = volume_from_nrrd_bytes(data, max_voxels=1_000_000)
    except InputError:
        return
    assert volume.array.ndim == 3 and all(s > 0 for s in volume.spacing)


def test_receive_buffers_are_read_without_copy_and_late_nan_is_found(make_volume):
    """A numpy uint8 buffer or a memoryview (the client's receive buffer) parses like bytes, and
    the volume shares its memory; NaN far past the first check block is still refused."""
    volume = make_volume(shape=(5, 300, 300), dtype=np.float32)
    data = volume_to_nrrd_bytes(volume, gzip=False)
    buffer = np.frombuffer(bytearray(data), dtype=np.uint8)
    for source in (buffer, memoryview(buffer)):
        back = volume_from_nrrd_bytes(source)
        np.testing.assert_array_equal(back.array, volume.array)
        assert np.shares_memory(back.array, buffer) and back.array.flags.writeable
    bad = volume.array.copy()
    bad[-1, -1, -1] = np.inf
    with pytest.raises(InputError, match="1 NaN or infinite"):
        volume_from_nrrd_bytes(volume_to_nrrd_bytes(volume.replace(array=bad), gzip=False))


def test_scanner_xyz_space_is_read_as_itk_reads_it(tmp_path):
    """ITK (and so the CLI's file reader) treats scanner-xyz as LPS; the upload parser must agree."""
    import SimpleITK as sitk

    from ctsliceinterp.serving.nrrd_bytes import volume_from_nrrd_bytes

    data = np.arange(2 * 3 * 4, dtype=np.int16).tobytes()
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: scanner-xyz\nsizes: 4 3 2\n"
              "space directions: (1,0,0) (0,1,0) (0,0,2)\nspace origin: (1,2,3)\nendian: little\nencoding: raw\n\n")
    path = tmp_path / "scanner.nrrd"
    path.write_bytes(header.encode() + data)
    ours = volume_from_nrrd_bytes(path.read_bytes())
    image = sitk.ReadImage(str(path))
    assert ours.origin == pytest.approx(image.GetOrigin())
    assert ours.direction == pytest.approx(image.GetDirection())
