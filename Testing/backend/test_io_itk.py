"""NRRD / NIfTI / MHA round trips with full geometry, and what validate_ct refuses."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from testsupport import oblique_direction
from ctsliceinterp.core.errors import InputError, OutputError
from ctsliceinterp.io import read_volume, write_volume
from ctsliceinterp.io.validate import label_map_reason, validate_ct
from ctsliceinterp.core.volume import Volume

SUFFIXES = [".nrrd", ".nii", ".nii.gz", ".mha"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("flip_y", [False, True])
def test_geometry_round_trip(tmp_path, make_volume, suffix, flip_y):
    volume = make_volume(direction=oblique_direction(20, flip_y=flip_y)).replace(slice_thickness=5.0)
    path = write_volume(volume, tmp_path / f"v{suffix}")
    back = read_volume(path)
    assert back.shape == volume.shape and back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, volume.array)
    # NIfTI stores the geometry as float32 quaternions: allow its rounding, nothing more.
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
    np.testing.assert_allclose(back.geometry.direction_matrix, volume.geometry.direction_matrix, atol=1e-5)
    # A known voxel lands at the same LPS point.
    np.testing.assert_allclose(back.geometry.index_to_physical((3, 5, 7)), volume.geometry.index_to_physical((3, 5, 7)), atol=1e-3)
    if suffix in (".nrrd", ".mha"):  # formats with free-text header keys keep the slab width
        assert back.slice_thickness == 5.0


@pytest.mark.parametrize("suffix, data", [(".mhd", "a.zraw"), (".nhdr", "a.raw.gz")])
def test_detached_header_formats_name_their_data_file(tmp_path, make_volume, suffix, data):
    volume = make_volume(direction=oblique_direction(15))
    back = read_volume(write_volume(volume, tmp_path / f"a{suffix}"))
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.geometry.direction_matrix, volume.geometry.direction_matrix, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"a{suffix}", data])


def test_float_hu_are_kept(tmp_path, make_volume):
    volume = make_volume(dtype=np.float32)
    volume = volume.replace(array=volume.array + np.float32(0.25))
    back = read_volume(write_volume(volume, tmp_path / "f.nrrd"))
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, volume.array)


def test_write_is_atomic_and_refuses_the_input(tmp_path, make_volume):
    volume = make_volume()
    path = write_volume(volume, tmp_path / "a.nrrd")
    before = path.read_bytes()
    with pytest.raises(OutputError, match="is the input"):
        write_volume(volume, path, inputs=[path])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nrrd"]  # no partial files left
    with pytest.raises(OutputError, match="does not exist"):
        write_volume(volume, tmp_path / "missing" / "b.nrrd")


def test_two_d_and_vector_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="2-D image"):
        read_volume(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([16, 16, 1], sitk.sitkInt16), str(tmp_path / "one.nrrd"))
    with pytest.raises(InputError, match="2-D image"):
        read_volume(tmp_path / "one.nrrd")
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="3 components per voxel"):
        read_volume(tmp_path / "rgb.nrrd")


def test_nan_voxels_are_refused(tmp_path, make_volume):
    volume = make_volume(dtype=np.float32)
    array = volume.array.copy()
    array[1, 2, 3] = np.nan
    array[2, 2, 3] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="2 NaN or infinite voxels"):
        read_volume(tmp_path / "nan.nrrd")


def test_label_maps_are_refused(tmp_path):
    labels = np.zeros((6, 12, 12), np.uint8)
    labels[2:4, 3:8, 3:8] = 1
    labels[3:5, 5:9, 6:10] = 7
    with pytest.raises(InputError, match="looks like a label map.*3 distinct.*a CT in HU is needed"):
        validate_ct(Volume.from_array(labels))
    with pytest.raises(InputError, match="label map"):
        validate_ct(Volume.from_array(labels.astype(np.float32)))
    with pytest.raises(InputError, match="label map"):
        validate_ct(Volume.from_array(labels.astype(bool)))
    # A Slicer segmentation NRRD is refused by its header even with many labels.
    many = np.arange(6 * 12 * 12, dtype=np.int16).reshape(6, 12, 12) % 200
    image = sitk.GetImageFromArray(many)
    image.SetMetaData("Segment0_ID", "Segment_1")
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    sitk.WriteImage(image, str(tmp_path / "seg.seg.nrrd"))
    with pytest.raises(InputError, match="Slicer segmentation"):
        read_volume(tmp_path / "seg.seg.nrrd")


def test_ct_like_volumes_are_not_label_maps(make_volume):
    assert label_map_reason(make_volume()) is None  # air at -1000
    # Raw unsigned storage (no air below zero) still has far more than 64 values.
    raw = np.random.default_rng(0).integers(0, 4000, (6, 12, 12)).astype(np.uint16)
    assert label_map_reason(Volume.from_array(raw)) is None


def test_every_real_volume_passes_validation(shared_data):
    import glob

    folder = shared_data("volumes")
    for path in sorted(glob.glob(str(folder / "*.nii.gz"))):
        image = sitk.ReadImage(path)
        volume = Volume.from_array(sitk.GetArrayViewFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        validate_ct(volume, source=path)


def test_atomic_outputs_get_normal_permissions_not_private_temp_ones(tmp_path):
    import os
    import stat

    from ctsliceinterp.io.atomic import atomic_directory, atomic_file

    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "out.nrrd") as tmp:
            tmp.write_bytes(b"x")
        with atomic_directory(tmp_path / "series") as folder:
            (folder / "a.dcm").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.nrrd").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "series").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "series" / "a.dcm").stat().st_mode) == 0o644


def test_sheared_grid_is_refused_for_nifti_but_kept_by_nrrd(tmp_path):
    import numpy as np
    import pytest

    from ctsliceinterp.core.errors import OutputError
    from ctsliceinterp.io import read_volume, write_volume
    from ctsliceinterp.core.volume import Volume

    tilt = np.deg2rad(15)
    direction = (1, 0, 0, 0, 1, np.sin(tilt), 0, 0, np.cos(tilt))  # k axis tilted towards j
    volume = Volume.from_array(np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5) - 1000, (0.5, 0.5, 5.0),
                               (1.0, 2.0, 3.0), direction)
    with pytest.raises(OutputError, match="not orthogonal"):
        write_volume(volume, tmp_path / "tilted.nii.gz")
    assert not any(tmp_path.iterdir())
    write_volume(volume, tmp_path / "tilted.nrrd")
    assert np.allclose(read_volume(tmp_path / "tilted.nrrd").direction, direction, atol=1e-6)
