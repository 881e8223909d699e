"""DICOM reading and writing: ordering, rescale, series choice, case layout, geometry checks,
bad files, the derived-series writer, and the real ZIPs in ../shared/data.

Synthetic series are written here with pydicom directly (not with our writer), so the reader is
tested against files built from first principles."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from testsupport import oblique_direction
from ctsliceinterp.core.errors import GeometryError, InputError
from ctsliceinterp.io import read_volume, write_volume
from ctsliceinterp.io.dicom import read_dicom, write_dicom_series
from ctsliceinterp.core.volume import Volume

CT = "1.2.840.10008.5.1.4.1.1.2"


def ct_slice(pixels, position, orientation, pixel_spacing, series_uid, *, instance=1, slope=1.0,
             intercept=-1024.0, signed=False, thickness=5.0, description="AXIAL 5mm", study_uid="1.2.3.4",
             frame_uid="1.2.3.5", samples=1, photometric="MONOCHROME2"):
    """One CT image dataset built by hand (pixels are stored values, rows x columns)."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID, ds.PatientSex = "Doe^Jane", "P123", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDescription, ds.SeriesDescription, ds.SeriesNumber = "HEAD", description, 3
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = [str(pixel_spacing[0]), str(pixel_spacing[1])]
    ds.SliceThickness = str(thickness)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 16 if samples == 1 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    dtype = np.uint8 if samples > 1 else (np.int16 if signed else np.uint16)
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    return ds


def write_series(folder: Path, hu: np.ndarray, spacing=(0.7, 0.8, 5.0), origin=(-10.0, 20.0, 100.0),
                 direction=None, names=None, instances=None, positions=None, series_uid=None, **kwargs) -> list[Path]:
    """Write ``hu`` (z, y, x) as single-frame CT files; stored = HU + 1024 (uint16, intercept -1024).

    ``positions`` overrides the slice offsets along the normal (mm) to make broken series."""
    folder.mkdir(parents=True, exist_ok=True)
    d = np.asarray(direction if direction is not None else np.eye(3).ravel(), float).reshape(3, 3)
    row, col = d[:, 0], d[:, 1]
    normal = np.cross(row, col)
    series_uid = series_uid or generate_uid()
    positions = positions if positions is not None else [k * spacing[2] for k in range(hu.shape[0])]
    paths = []
    for k in range(hu.shape[0]):
        position = np.asarray(origin) + positions[k] * normal
        ds = ct_slice(hu[k] + 1024, position, [*row, *col], (spacing[1], spacing[0]), series_uid,
                      instance=(instances[k] if instances is not None else k + 1), **kwargs)
        path = folder / (names[k] if names is not None else f"slice{k:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def hu_volume(shape=(6, 10, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=shape).astype(np.int16)


def physically_same(a: Volume, b: Volume, atol=1e-3) -> None:
    """Same voxels at the same LPS points; a reversed slice axis (DICOM orders along r x c) is allowed."""
    if not np.allclose(a.geometry.normal, b.geometry.normal, atol=1e-4):
        b = Volume(b.array[::-1], b.geometry.__class__(
            b.shape, b.spacing, b.geometry.index_to_physical((0, 0, b.shape[0] - 1)),
            tuple((b.geometry.direction_matrix @ np.diag([1, 1, -1])).ravel())))
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.geometry.direction_matrix, b.geometry.direction_matrix, atol=1e-5)
    np.testing.assert_array_equal(a.array, b.array)


# --- ordering, rescale, geometry -------------------------------------------------------------
@pytest.mark.parametrize("flip_y", [False, True])
def test_order_by_position_not_name_or_instance_number(tmp_path, flip_y):
    hu = hu_volume()
    direction = oblique_direction(25, flip_y=flip_y)
    rng = np.random.default_rng(1)
    names = [f"IM{n:04d}.dcm" for n in rng.permutation(hu.shape[0])]
    instances = list(rng.permutation(hu.shape[0]) + 1)
    write_series(tmp_path / "s", hu, (0.7, 0.8, 2.5), (-10, 20, 100), direction, names=names, instances=instances)
    volume = read_volume(tmp_path / "s")
    d = np.asarray(direction).reshape(3, 3)
    normal = np.cross(d[:, 0], d[:, 1])
    np.testing.assert_allclose(volume.geometry.direction_matrix, np.column_stack([d[:, 0], d[:, 1], normal]), atol=1e-6)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    np.testing.assert_allclose(volume.origin, (-10, 20, 100), atol=1e-5)
    np.testing.assert_array_equal(volume.array, hu)
    # The voxel (i, j, k) sits where the scanner put it: IPP_k + i * sx * row + j * sy * col.
    expected = np.array([-10, 20, 100]) + 3 * 0.7 * d[:, 0] + 2 * 0.8 * d[:, 1] + 4 * 2.5 * normal
    np.testing.assert_allclose(volume.geometry.index_to_physical((3, 2, 4)), expected, atol=1e-5)
    assert volume.metadata["slice_thickness"] == 5.0


def test_slices_listed_in_reverse_order_come_back_ascending(tmp_path):
    hu = hu_volume()
    positions = [100 - 5.0 * k for k in range(hu.shape[0])]  # IPP moves against the normal
    write_series(tmp_path / "s", hu, positions=positions, origin=(0, 0, 0))
    volume = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, hu[::-1])
    assert volume.origin[2] == pytest.approx(100 - 5.0 * (hu.shape[0] - 1))
    assert volume.spacing[2] == pytest.approx(5.0)


def test_rescale_signed_storage_and_fractional_slope(tmp_path):
    hu = hu_volume()
    write_series(tmp_path / "a", hu - 1024, signed=True, intercept=0.0)  # int16 stored = HU
    assert read_volume(tmp_path / "a").array.dtype == np.int16
    np.testing.assert_array_equal(read_volume(tmp_path / "a").array, hu)
    stored = (hu + 1024).astype(np.int64) * 2  # slope 0.5 -> HU from doubled values
    write_series(tmp_path / "b", (stored - 1024).astype(np.int32), slope=0.5, intercept=-1024)
    volume = read_volume(tmp_path / "b")
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, hu.astype(np.float32))
    write_series(tmp_path / "c", hu, slope=0.25, intercept=-1024.5)
    np.testing.assert_allclose(read_volume(tmp_path / "c").array, (hu + 1024) * 0.25 - 1024.5)


def test_single_file_reads_its_series(tmp_path):
    hu = hu_volume()
    paths = write_series(tmp_path / "s", hu)
    write_series(tmp_path / "s", hu_volume(seed=3), names=[f"other{k}.dcm" for k in range(6)], origin=(0, 0, 0))
    volume = read_volume(paths[2])
    np.testing.assert_array_equal(volume.array, hu)
    bare = write_series(tmp_path / "bare", hu, names=[f"IM{k}" for k in range(6)])  # no extension
    np.testing.assert_array_equal(read_volume(bare[0]).array, hu)


# --- several series, case layout -------------------------------------------------------------
def test_several_series_are_listed_and_chosen_by_uid(tmp_path):
    write_series(tmp_path / "mix", hu_volume(), series_uid="1.2.826.0.1.1", description="BONE")
    write_series(tmp_path / "mix", hu_volume((9, 10, 12), 2), (0.7, 0.8, 1.25), series_uid="1.2.826.0.1.2",
                 names=[f"b{k}.dcm" for k in range(9)], description="SOFT")
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "mix")
    message = str(err.value)
    assert "2 series" in message and "--series-uid" in message
    assert "1.2.826.0.1.1" in message and "1.2.826.0.1.2" in message and "'SOFT'" in message and "9 files" in message
    assert "1.25 mm" in message
    assert read_volume(tmp_path / "mix", series_uid="1.2.826.0.1.2").shape == (9, 10, 12)
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 9.9"):
        read_volume(tmp_path / "mix", series_uid="9.9")


def _case(root: Path) -> tuple[np.ndarray, np.ndarray]:
    thick, thin = hu_volume((4, 10, 12), 5), hu_volume((16, 10, 12), 6)
    write_series(root / "case_x" / "1", thick, (0.7, 0.8, 5.0), description="5mm")
    write_series(root / "case_x" / "2", thin, (0.7, 0.8, 1.0), origin=(-10, 20, 98.0), thickness=1.0, description="1mm")
    return thick, thin


def test_case_layout_folder_and_zip(tmp_path):
    thick, thin = _case(tmp_path / "folder")
    archive = tmp_path / "case_x.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((tmp_path / "folder").rglob("*.dcm")):
            z.write(path, path.relative_to(tmp_path / "folder").as_posix())
    for source in (tmp_path / "folder", tmp_path / "folder" / "case_x", archive):
        with pytest.raises(InputError, match="--series thick or --series thin"):
            read_volume(source)
        np.testing.assert_array_equal(read_volume(source, series="thick").array, thick)
        thin_volume = read_volume(source, series="thin")
        np.testing.assert_array_equal(thin_volume.array, thin)
        assert thin_volume.origin[2] == pytest.approx(98.0) and thin_volume.metadata["slice_thickness"] == 1.0
    with pytest.raises(InputError, match="not one"):
        read_volume(tmp_path / "folder" / "case_x" / "1", series="thick")


# --- broken geometry ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "positions, pattern",
    [
        ([0, 5, 10, 20, 25, 30], "missing slice.*gap of 10 mm"),
        ([0, 5, 10, 14, 19, 24], "non-uniform slice spacing"),
        ([0, 5, 10, 10, 15, 20], "duplicate slice position 110.00 mm"),
    ],
)
def test_irregular_slice_positions_are_named(tmp_path, positions, pattern):
    write_series(tmp_path / "s", hu_volume(), positions=positions)
    with pytest.raises(GeometryError, match=pattern):
        read_volume(tmp_path / "s")


def test_gantry_tilt_is_refused(tmp_path):
    hu = hu_volume()
    folder = tmp_path / "tilt"
    paths = write_series(folder, hu)
    shear = np.tan(np.deg2rad(15))
    for k, path in enumerate(paths):  # IPP moves along y as well as z: a 15 degree tilted gantry
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [-10, 20 + shear * 5.0 * k, 100 + 5.0 * k]
        ds.GantryDetectorTilt = 15
        ds.save_as(path)
    with pytest.raises(GeometryError, match="gantry tilt.*about 15.0 degrees.*--detilt"):
        read_volume(folder)


def test_mixed_sizes_and_orientations_in_one_series(tmp_path):
    uid = generate_uid()
    write_series(tmp_path / "size", hu_volume(), series_uid=uid)
    write_series(tmp_path / "size", hu_volume((1, 8, 12)), series_uid=uid, names=["odd.dcm"], positions=[30])
    with pytest.raises(InputError, match="mixed image sizes"):
        read_volume(tmp_path / "size")
    write_series(tmp_path / "orient", hu_volume(), series_uid=uid)
    write_series(tmp_path / "orient", hu_volume((1, 10, 12)), series_uid=uid, names=["odd.dcm"], positions=[30],
                 direction=oblique_direction(10))
    with pytest.raises(GeometryError, match="mixed orientations"):
        read_volume(tmp_path / "orient")


# --- bad files ---------------------------------------------------------------------------------
def test_corrupted_and_truncated_files_are_named(tmp_path):
    write_series(tmp_path / "s", hu_volume())
    (tmp_path / "s" / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    with pytest.raises(InputError, match="broken.dcm"):
        read_volume(tmp_path / "s")
    (tmp_path / "s" / "broken.dcm").write_bytes(b"not DICOM at all, but named .dcm")  # fails the probe: still named
    with pytest.raises(InputError, match="broken.dcm is not a DICOM file"):
        read_volume(tmp_path / "s")
    paths = write_series(tmp_path / "t", hu_volume())
    paths[3].write_bytes(paths[3].read_bytes()[:-100])  # pixel data cut short
    with pytest.raises(InputError, match=r"cannot decode the pixels of .*slice003.dcm"):
        read_volume(tmp_path / "t")
    paths[4].write_bytes(paths[4].read_bytes()[:-500])  # cut inside the header
    with pytest.raises(InputError, match=r"slice004.dcm .*corrupted or truncated"):
        read_volume(tmp_path / "t")


def test_non_dicom_files_in_a_folder_are_ignored(tmp_path):
    write_series(tmp_path / "s", hu_volume())
    (tmp_path / "s" / "README.txt").write_text("exported by PACS\n")
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\x00\x01junk")
    assert read_volume(tmp_path / "s").shape == (6, 10, 12)


def test_zip_without_dicom_and_bad_zip(tmp_path):
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes/readme.txt", "no images here")
    with pytest.raises(InputError, match="no DICOM images found in the ZIP"):
        read_volume(archive)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(InputError, match="not a valid ZIP"):
        read_volume(bad)


def test_single_slice_colour_and_multiframe_are_refused(tmp_path):
    write_series(tmp_path / "one", hu_volume((1, 10, 12)))
    with pytest.raises(InputError, match="2-D image"):
        read_volume(tmp_path / "one")
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    uid = generate_uid()
    for k in range(3):
        pixels = np.zeros((10, 12, 3), np.uint8)
        ct_slice(pixels, (0, 0, 5.0 * k), (1, 0, 0, 0, 1, 0), (1, 1), uid, samples=3, photometric="RGB",
                 intercept=0).save_as(rgb / f"c{k}.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="colour image.*RGB"):
        read_volume(rgb)
    frames = tmp_path / "mf"
    paths = write_series(frames, hu_volume((2, 10, 12)))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
        ds.save_as(path)
    with pytest.raises(InputError, match="multi-frame image .* without per-frame functional groups"):
        read_volume(frames)  # Enhanced CT (with functional groups) is read: test_dicom_series_rules.py


# --- writer --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip_y", [False, True])
def test_written_series_reads_back_with_the_same_geometry(tmp_path, flip_y):
    import SimpleITK as sitk

    rng = np.random.default_rng(2)
    array = rng.normal(0, 600, (5, 9, 11)).astype(np.float32)
    volume = Volume.from_array(array, (0.6, 0.9, 1.0), (-30.5, 12.25, 77.0), oblique_direction(30, flip_y=flip_y),
                               {"slice_thickness": 1.0, "method": "bspline"})
    out = write_volume(volume, tmp_path / "series")
    expected = Volume(np.rint(array).astype(np.int16), volume.geometry)  # HU rounded to integers
    physically_same(expected, read_dicom(out))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out)))
    image = reader.Execute()
    via_itk = Volume(sitk.GetArrayFromImage(image).astype(np.int16),
                     volume.geometry.__class__(image.GetSize()[::-1], image.GetSpacing(), image.GetOrigin(), image.GetDirection()))
    physically_same(expected, via_itk, atol=1e-3)


def test_written_series_carries_patient_and_study_tags(tmp_path):
    hu = hu_volume((4, 10, 12))
    write_series(tmp_path / "src", hu, (0.7, 0.8, 5.0), description="AXIAL 5mm")
    source = read_volume(tmp_path / "src")
    thin = Volume.from_array(np.repeat(source.array, 5, axis=0)[:16].astype(np.float32) + 0.4,
                             (0.7, 0.8, 1.0), source.origin, source.direction,
                             {**{k: v for k, v in source.metadata.items() if k != "slice_thickness"}, "method": "lanczos"})
    out = write_volume(thin, tmp_path / "thin")
    files = sorted(out.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    first = datasets[0]
    assert len(files) == 16
    assert str(first.PatientName) == "Doe^Jane" and first.PatientID == "P123" and first.PatientSex == "F"
    assert first.StudyInstanceUID == "1.2.3.4" and first.FrameOfReferenceUID == "1.2.3.5"
    assert first.SeriesInstanceUID != source.metadata["series_instance_uid"]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 16
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert first.SeriesDescription == "AXIAL 5mm thin 1mm (CTSliceInterp)"
    assert float(first.SliceThickness) == 1.0 and float(first.SpacingBetweenSlices) == 1.0
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 17))
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == pytest.approx([100 + k for k in range(16)])
    assert "lanczos" in first.DerivationDescription
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, np.rint(thin.array))
    assert back.metadata["dicom"]["StudyInstanceUID"] == "1.2.3.4"


def test_writer_moves_the_intercept_for_wide_hu_and_refuses_what_int16_cannot_hold(tmp_path):
    array = np.linspace(-1024, 40000, 2 * 4 * 5).reshape(2, 4, 5)
    write_dicom_series(Volume.from_array(array), tmp_path)
    back = read_dicom(tmp_path)
    np.testing.assert_array_equal(back.array, np.rint(array))
    assert float(pydicom.dcmread(sorted(tmp_path.glob("*.dcm"))[0]).RescaleIntercept) != 0
    from ctsliceinterp.core.errors import OutputError

    with pytest.raises(OutputError, match="does not fit 16-bit DICOM"):
        write_dicom_series(Volume.from_array(np.array([-70000.0, 1.0] * 10).reshape(2, 2, 5)), tmp_path / "x")


# --- the real ZIPs in ../shared/data ------------------------------------------------------------
def test_real_phantom_case_zip_matches_the_nifti_copies(shared_data):
    import SimpleITK as sitk

    archive = shared_data("ape_layout/APE/case_phantom.zip")
    with pytest.raises(InputError, match="--series thick or --series thin"):
        read_volume(archive)
    for series, reference, thickness in (("thick", "phantom_head_thick_5mm", 5.0), ("thin", "phantom_head_thin_1mm", 1.0)):
        volume = read_volume(archive, series=series)
        image = sitk.ReadImage(str(shared_data(f"volumes/{reference}.nii.gz")))
        np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
        np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(volume.direction, image.GetDirection(), atol=1e-6)
        assert volume.metadata["slice_thickness"] == thickness
        assert volume.metadata["dicom"]["PatientID"] == "PLASTIC"


def test_real_jpeg_lossless_zip(shared_data):
    import SimpleITK as sitk

    volume = read_volume(shared_data("dicom_chest_ricord000082_24slices_jpeg_lossless.zip"))
    assert volume.metadata["transfer_syntax"] == "1.2.840.10008.1.2.4.70"
    assert volume.shape == (24, 512, 512)
    np.testing.assert_allclose(volume.spacing, (0.703125, 0.703125, 1.25), atol=1e-4)
    np.testing.assert_allclose(volume.geometry.normal, (0, 0, 1), atol=1e-6)
    a = volume.array
    assert a.dtype == np.int16 and a.min() == -3024  # padding outside the scan circle, kept as is
    assert -1100 < np.percentile(a[a > -2000], 5) < -700 and a.max() > 500  # lungs/air and bone in HU
    # The 24 slices are the middle of the series stored whole as NIfTI: find them by position.
    image = sitk.ReadImage(str(shared_data("volumes/chest_ricord000082_1p25mm.nii.gz")))
    index = np.asarray(image.TransformPhysicalPointToContinuousIndex(volume.origin))
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    k = int(round(index[2]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[k : k + 24], a)
